"""course.memory: model configs, the training-memory estimate, and what autograd saves."""

import subprocess
import sys

import pytest
import torch

import course
from course import memory
from course.lora import add_lora, count_parameters

# Parameter counts published with the models (model cards / papers), not derived by us.
PUBLISHED = {"smollm2-135m": 134_515_008, "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320}


def test_every_shipped_config_loads_and_says_where_it_comes_from():
    names = memory.known_model_configs()
    assert names == ["llama-2-13b", "llama-2-7b", "llama-65b", "smollm2-135m"]
    for name in names:
        config = memory.load_model_config(name)
        assert config.source.startswith("https://huggingface.co/")
        assert config.hidden_size % config.num_attention_heads == 0


def test_a_config_without_the_needed_numbers_is_refused():
    with pytest.raises(ValueError, match="missing or not int: \\['intermediate_size'\\]"):
        memory.ModelConfig.from_any(
            {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 9}
        )


def test_unknown_config_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown model config 'gpt-5'.*llama-2-7b"):
        memory.load_model_config("gpt-5")


@pytest.mark.parametrize(("name", "count"), PUBLISHED.items())
def test_parameter_count_from_config_matches_the_published_one(name, count):
    assert memory.load_model_config(name).num_parameters() == count


def test_llama_65b_is_65_billion_parameters():
    assert 65.2e9 < memory.load_model_config("llama-65b").num_parameters() < 65.3e9


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_from_a_transformers_config_matches_the_model(tie):
    model = course.models.tiny_model(seed=0, tie_word_embeddings=tie, num_key_value_heads=1)
    config = memory.ModelConfig.from_any(model.config)
    assert config.num_parameters() == count_parameters(model)[1]


@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj"], ["k_proj"], ["gate_proj", "up_proj", "down_proj"], "all-linear"]
)
@pytest.mark.parametrize("r", [1, 4])
def test_lora_parameter_count_from_config_matches_add_lora(targets, r):
    model = course.models.tiny_model(seed=0, num_key_value_heads=1)  # GQA: k and v are narrower
    add_lora(model, targets, r=r, alpha=8)
    assert memory.ModelConfig.from_any(model.config).lora_parameters(r, targets) == count_parameters(model)[0]


def test_full_finetuning_memory_is_weights_grads_and_adam_states():
    config = memory.load_model_config("smollm2-135m")
    n = config.num_parameters()
    est = memory.estimate_training_memory(config, "full", weight_bytes=4, optimizer="adamw")
    assert (est["weights"], est["gradients"], est["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert memory.estimate_training_memory(config, "full", optimizer="sgd")["optimizer"] == 0


def test_qlora_paper_numbers_for_65b():
    """QLoRA: 16-bit fine-tuning of 65B needs more than 780 GB; QLoRA fits it on one 48 GB GPU
    (r=64 on all linear layers, paged 8-bit AdamW, gradient checkpointing)."""
    full = memory.estimate_training_memory("llama-65b", "full", weight_bytes=2)
    assert 780e9 < full["weights"] + full["gradients"] + full["optimizer"] < 790e9
    qlora = memory.estimate_training_memory(
        "llama-65b", "qlora", r=64, optimizer="adamw8bit", gradient_checkpointing=True, seq_len=512
    )
    assert sum(qlora.values()) < 48e9
    lora16 = memory.estimate_training_memory("llama-65b", "lora", r=64, gradient_checkpointing=True)
    assert sum(lora16.values()) > 130e9  # 16-bit LoRA does not fit: the base alone is 131 GB


def test_qlora_base_weights_use_4_127_bits_on_the_linear_layers():
    config = memory.load_model_config("llama-2-7b")
    lora = memory.estimate_training_memory(config, "lora", r=8)
    qlora = memory.estimate_training_memory(config, "qlora", r=8)
    no_dq = memory.estimate_training_memory(config, "qlora", r=8, double_quant=False)
    saved = lora["weights"] - qlora["weights"]
    assert saved == pytest.approx(config.linear_parameters() * (16 - 4.127) / 8, rel=1e-3)
    assert no_dq["weights"] - qlora["weights"] == pytest.approx(
        config.linear_parameters() * 0.373 / 8, rel=1e-2
    )
    assert qlora["gradients"] == lora["gradients"] and qlora["optimizer"] == lora["optimizer"]


def test_lora_trains_a_tiny_share_so_grads_and_states_shrink():
    full = memory.estimate_training_memory("llama-2-7b", "full")
    lora = memory.estimate_training_memory("llama-2-7b", "lora", r=8, target_modules=["q_proj", "v_proj"])
    assert lora["optimizer"] < full["optimizer"] / 1000
    assert lora["weights"] > full["weights"]  # the base stays whole, plus the adapter


def test_activations_grow_with_tokens_and_shrink_with_checkpointing():
    est = lambda **kw: memory.estimate_training_memory("smollm2-135m", "lora", **kw)["activations"]
    assert est(batch_size=4, seq_len=128) == pytest.approx(2 * est(batch_size=2, seq_len=128))
    assert est(batch_size=2, seq_len=256) == pytest.approx(2 * est(batch_size=2, seq_len=128))
    assert est(batch_size=2, seq_len=128, gradient_checkpointing=True) < est(batch_size=2, seq_len=128) / 3


@pytest.mark.parametrize("method", ["full", "lora"])
def test_activation_estimate_is_close_to_what_autograd_saves(method):
    """The estimate's per-layer count was taken from SmolLM2; it must carry over to other shapes."""
    model = course.models.tiny_model(seed=0, vocab_size=1000, num_hidden_layers=3)
    if method == "lora":
        add_lora(model, "all-linear", r=4, alpha=8)
    else:
        model.requires_grad_(True)
    model.train()
    ids = torch.randint(0, 1000, (2, 32))
    _, saved = memory.saved_tensor_bytes(lambda: model(input_ids=ids, labels=ids), exclude=model.parameters())
    est = memory.estimate_training_memory(model.config, method, r=4, batch_size=2, seq_len=32, weight_bytes=4)
    assert 0.8 < est["activations"] / saved < 1.25, (est["activations"], saved)


def test_saved_tensor_bytes_counts_each_storage_once_and_skips_excluded():
    w = torch.randn(100, requires_grad=True)
    x = torch.randn(100)
    # x * w saves x (for w's gradient); (x * w) * x saves x again: one storage, counted once
    assert memory.saved_tensor_bytes(lambda: (x * w * x).sum())[1] == 100 * 4
    # w * w saves w (twice, one storage); (w * w) * x saves x. Excluding w leaves x.
    assert memory.saved_tensor_bytes(lambda: (w * w * x).sum())[1] == 100 * 4 * 2
    assert memory.saved_tensor_bytes(lambda: (w * w * x).sum(), exclude=[w])[1] == 100 * 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "prefix"}, "method must be one of"),
        ({"optimizer": "adafactor"}, "optimizer must be one of"),
        ({"r": 0}, "positive"),
        ({"batch_size": 0}, "positive"),
        ({"target_modules": ["attn"]}, "target_modules must be"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    arguments = {"method": "lora", **kwargs}
    with pytest.raises(ValueError, match=message):
        memory.estimate_training_memory("smollm2-135m", **arguments)


_FRAGMENT = """
import sys, torch, course
follow = sys.argv[1] == "1"
assert not follow or course.memory.follow_live_memory()
torch.ones(512 * 1024)  # a 2 MiB block, freed at once: glibc then serves smaller blocks from its heap
blocks = [torch.ones(256 * 1024) for _ in range(200)]  # 200 blocks of 1 MiB
before = course.memory.rss_bytes()
del blocks[::2]  # free every other block: holes between live ones
print((before - course.memory.rss_bytes()) / 2**20)
"""


@pytest.mark.skipif(course.memory.rss_bytes() is None, reason="needs /proc (Linux)")
def test_follow_live_memory_gives_freed_blocks_back_at_once():
    freed = {}
    for follow in ("0", "1"):  # a fresh process each: the setting lasts for the process
        out = subprocess.run(
            [sys.executable, "-c", _FRAGMENT, follow], capture_output=True, text=True, check=True
        ).stdout
        freed[follow] = float(out)
    assert freed["1"] > 90, freed  # 100 MiB freed in holes: all of it leaves the resident set
    assert freed["0"] < 50, freed  # glibc's default keeps the holes resident: why the function exists
