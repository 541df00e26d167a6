"""Measuring memory: the peak that a piece of work really needs.

On CUDA the caching allocator keeps an exact peak counter. On CPU there is no counter
for tensors, so we use the operating system's: Linux records the process's peak
resident set size (VmHWM) and lets a process reset it (`/proc/self/clear_refs`), so
the peak of `fn` minus the resident size at its start is the memory `fn` added,
allocator and library overheads included (`follow_live_memory` keeps glibc from adding
freed blocks it holds on to).
"""

import ctypes
import json
import re
import resource
from dataclasses import dataclass
from pathlib import Path

import torch


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset Linux's peak-RSS counter to the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand memory that the C allocator keeps after frees back to the OS (glibc only).

    Otherwise `fn` may reuse pages that are already resident and its peak would read low.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def follow_live_memory(threshold_bytes: int = 64 * 1024) -> bool:
    """Make this process's resident memory follow its live tensors (glibc); False elsewhere.

    By default glibc serves most tensor-sized blocks from heaps it keeps after a free (its
    mmap threshold grows up to 32 MB as blocks are freed), so the resident size, and the
    peaks `measure_peak` reads on CPU, carry hundreds of MB of freed activations. With a
    fixed threshold every block of at least `threshold_bytes` gets its own mapping, given
    back at `free`: peaks become exact to a few MB. The price is a page fault for each new
    page (training steps of the embedded model take about a third longer), for the rest of
    the process: call it in a process that measures memory, not in one that races the clock.
    """
    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1
    except (OSError, AttributeError):
        return False


def measure_peak(fn, *, device: torch.device | str | None = None):
    """Run `fn()` and return `(result, peak_bytes)`: the peak memory `fn` added.

    CUDA: `torch.cuda.max_memory_allocated` above the allocation at the start.
    CPU on Linux: peak RSS during `fn` above the RSS at the start. Elsewhere the
    lifetime peak RSS (ru_maxrss) is all there is, so a peak lower than an earlier
    one reads as 0: the result is a lower bound.
    """
    if not callable(fn):
        raise TypeError(f"measure_peak runs fn(): pass a function (e.g. a lambda), got {type(fn).__name__}")
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start

    _release_free_memory()
    if _reset_peak_rss():
        start_kb = _proc_status_kb("VmRSS")
        result = fn()
        return result, (_proc_status_kb("VmHWM") - start_kb) * 1024
    scale = 1 if torch.backends.mps.is_available() else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn()
    return result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * scale


def rss_bytes() -> int | None:
    """The process's resident set size now (Linux: VmRSS), or None where /proc is missing."""
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def release_memory() -> None:
    """Collect garbage, then hand freed heap pages back to the OS (as `measure_peak` does first).

    Freed tensors often stay resident in the allocator's heap. Call this before reading
    `rss_bytes()` for what stays allocated after a piece of work (gradients, optimizer states).
    """
    import gc

    gc.collect()
    _release_free_memory()


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`: views and shared (tied) tensors count once."""
    seen: dict[tuple, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen.setdefault((tensor.device, storage.data_ptr()), storage.nbytes())
    return sum(seen.values())


def saved_tensor_bytes(fn, *, exclude=()):
    """Run `fn()` and return `(result, bytes)`: what autograd saved for the backward pass.

    Counts each storage once (views share one) and skips the tensors in `exclude`
    (pass `model.parameters()`: weights are saved by reference, not copied). This is the
    "activations" part of training memory, measured exactly, independent of the allocator.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, sum(seen.values())


def bytes_kept_for_backward(fn, *, device: torch.device | str | None = None):
    """Run `fn()` (a forward pass) and return `(result, bytes)`: memory that stays allocated after it,
    beyond the result's own tensors. That is what the backward pass will need, whoever holds it.

    `saved_tensor_bytes` sees only what autograd saves through `save_for_backward`; a custom
    autograd Function may also keep tensors as plain attributes of its context (bitsandbytes'
    `MatMul4Bit` keeps `ctx.tensors`, ours `ctx.layer`), which no hook sees. Memory sees every
    reference. On CUDA this reads the allocator's counter (exact). On CPU it reads the resident
    set size, after `follow_live_memory()` so that blocks freed inside the forward pass leave the
    process at once (it switches that on for the rest of the process); exact to a few pages, so
    use it on tensors of at least a few hundred KiB. `fn` runs once before the measurement,
    so that one-time allocations (lazily built tables, caches) are not counted as kept.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    if not cuda and (rss_bytes() is None or not follow_live_memory()):
        raise RuntimeError("bytes_kept_for_backward on CPU needs Linux with glibc (/proc and mallopt)")

    def allocated() -> int:
        release_memory()
        return torch.cuda.memory_allocated(device) if cuda else rss_bytes()

    del_me = fn()  # warm-up: one-time allocations happen here
    del del_me
    before = allocated()
    result = fn()
    after = allocated()
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    own = storage_bytes(t for t in outputs if isinstance(t, torch.Tensor))
    return result, after - before - own


# --- estimating training memory from a model config --------------------------------------

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "data" / "model_configs"
METHODS = ("full", "lora", "qlora")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Optimizer state bytes per trainable parameter. AdamW keeps two fp32 moments (m, v): 8 bytes.
# bitsandbytes' 8-bit AdamW keeps them in uint8 plus one fp32 absmax per block of 256 each
# (tensors under 4,096 elements stay fp32; ignored here). SGD without momentum keeps nothing.
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2 + 2 * 4 / 256, "sgd": 0.0}
ADAPTER_BYTES = 4  # peft and course.lora keep LoRA weights (hence their grads) in fp32
LOGIT_BYTES = 4  # transformers computes the cross-entropy on fp32 logits
# Activations autograd saves per token in one Llama decoder layer, in values: counted with
# `saved_tensor_bytes` on SmolLM2 (transformers 5.24, sdpa attention, full fine-tuning):
# 8 hidden-sized tensors (norm inputs/outputs, q and the attention output, ...), 2 key/value-
# sized (k, v) and 4 MLP-sized (gate, up, silu(gate), their product). LoRA keeps about 10%
# less (frozen layers need no copy of their input for a weight gradient) plus r values per
# adapted layer (the output of A); we keep the full fine-tuning count as a slight overestimate.
ACT_HIDDEN, ACT_KV, ACT_MLP = 8, 2, 4


@dataclass(frozen=True)
class ModelConfig:
    """The numbers of a Llama-style decoder that decide its memory (names as in config.json)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    source: str = ""

    @classmethod
    def from_any(cls, config) -> "ModelConfig":
        """A ModelConfig from itself, a name in data/model_configs/, a dict or a transformers config."""
        if isinstance(config, ModelConfig):
            return config
        if isinstance(config, str):
            return load_model_config(config)
        get = (
            config.get
            if isinstance(config, dict)
            else lambda key, default=None: getattr(config, key, default)
        )
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [key for key in required if not isinstance(get(key), int)]
        if missing:
            raise ValueError(
                f"a Llama-style config needs integer {', '.join(required)}; missing or not int: {missing}"
            )
        heads = get("num_attention_heads")
        return cls(
            name=get("name") or get("_name_or_path") or get("model_type") or "model",
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            vocab_size=get("vocab_size"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            head_dim=get("head_dim") or 0,
            source=get("source") or "",
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        head_dim = self.head_dim or h // self.num_attention_heads
        q, kv = self.num_attention_heads * head_dim, self.num_key_value_heads * head_dim
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }  # fmt: skip

    def linear_parameters(self) -> int:
        """Parameters in the decoder layers' linear layers (what QLoRA stores in 4 bits)."""
        return self.num_hidden_layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_parameters(self) -> int:
        """Embedding, untied output head and RMSNorm weights (kept in 16 or 32 bits)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + (2 * self.num_hidden_layers + 1) * self.hidden_size

    def num_parameters(self) -> int:
        return self.linear_parameters() + self.other_parameters()

    def lora_parameters(self, r: int, target_modules="all-linear") -> int:
        """r * (in + out) per adapted layer: A is (r, in), B is (out, r)."""
        targets = _lora_targets(target_modules)
        return self.num_hidden_layers * sum(
            r * (a + b) for n, (a, b) in self.linear_shapes().items() if n in targets
        )


def _lora_targets(target_modules) -> tuple[str, ...]:
    if target_modules == "all-linear":
        return LINEAR_NAMES
    unknown = set(target_modules) - set(LINEAR_NAMES)
    if isinstance(target_modules, str) or unknown or not target_modules:
        raise ValueError(
            f"target_modules must be 'all-linear' or a list of {', '.join(LINEAR_NAMES)}, "
            f"got {target_modules!r}"
        )
    return tuple(target_modules)


def known_model_configs() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def load_model_config(name: str) -> ModelConfig:
    """A shipped config from data/model_configs/ ("smollm2-135m", "llama-2-7b", ...)."""
    path = MODEL_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"Unknown model config {name!r}. Known: {', '.join(known_model_configs())}")
    return ModelConfig.from_any(json.loads(path.read_text()))


def estimate_training_memory(
    config,
    method: str,
    *,
    r: int = 8,
    batch_size: int = 1,
    seq_len: int = 512,
    optimizer: str = "adamw",
    target_modules="all-linear",
    weight_bytes: int = 2,
    gradient_checkpointing: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
) -> dict[str, int]:
    """Bytes of training memory by component: weights, gradients, optimizer, activations.

    config: a ModelConfig, a shipped name, a dict or a transformers config.
    method: "full" (every weight trains), "lora" (frozen base + adapters), "qlora" (the
    decoder's linear layers stored in 4 bits, QLoRA Sec. 3; embeddings and norms stay at
    weight_bytes). weight_bytes: 2 for bf16/fp16 (a GPU), 4 for fp32 (our CPU runs);
    gradients of full fine-tuning share it, activations too (logits are fp32).
    Adapters and their gradients are fp32. `sum(result.values())` is the total.

    Worked example, LLaMA-65B full fine-tuning in 16 bits with AdamW: 65.3 G parameters
    x (2 weights + 2 gradients + 8 Adam) = 783 GB before activations: QLoRA's "more than
    780 GB".
    """
    cfg = ModelConfig.from_any(config)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZER_BYTES)}, got {optimizer!r}")
    if min(r, batch_size, seq_len, weight_bytes) <= 0:
        raise ValueError(
            f"r, batch_size, seq_len and weight_bytes must be positive, got {r}, "
            f"{batch_size}, {seq_len}, {weight_bytes}"
        )
    n_total, n_linear = cfg.num_parameters(), cfg.linear_parameters()
    if method == "full":
        trainable = n_total
        weights = n_total * weight_bytes
        gradients = n_total * weight_bytes
    else:
        trainable = cfg.lora_parameters(r, target_modules)
        if method == "lora":
            base = n_total * weight_bytes
        else:
            from course.quant import qlora_bits_per_param

            bits = qlora_bits_per_param(blocksize, 256 if double_quant else None)
            base = n_linear * bits / 8 + cfg.other_parameters() * weight_bytes
        weights = base + trainable * ADAPTER_BYTES
        gradients = trainable * ADAPTER_BYTES
    optimizer_bytes = trainable * OPTIMIZER_BYTES[optimizer]

    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.linear_shapes()["k_proj"][1]
    per_layer = ACT_HIDDEN * h + ACT_KV * kv + ACT_MLP * i  # values per token
    if method != "full":
        per_layer += r * len(_lora_targets(target_modules))
    tokens = batch_size * seq_len
    if gradient_checkpointing:  # keep each layer's input; recompute one layer at a time in backward
        layer_values = cfg.num_hidden_layers * h + per_layer
    else:
        layer_values = cfg.num_hidden_layers * per_layer
    activations = tokens * (layer_values * weight_bytes + cfg.vocab_size * LOGIT_BYTES)
    return {
        "weights": round(weights),
        "gradients": round(gradients),
        "optimizer": round(optimizer_bytes),
        "activations": round(activations),
    }


# --- per rank, under data parallelism and sharding (notebook 12) ---------------------------

# What each strategy shards across the ranks (ZeRO stages, Rajbhandari et al. 2020, Fig. 1);
# FSDP's FULL_SHARD is stage 3. Activations are never sharded: each rank runs its own batch.
SHARDED = {
    "ddp": (),
    "zero1": ("optimizer",),
    "zero2": ("optimizer", "gradients"),
    "zero3": ("optimizer", "gradients", "weights"),
    "fsdp": ("optimizer", "gradients", "weights"),
}
# meta-llama/Llama-2-70b-hf config.json: the model of the published FSDP + QLoRA anchor
# (Answer.AI, 2024-03-06: Llama-2-70B fine-tuned on two 24 GB GPUs).
LLAMA_2_70B = {
    "name": "llama-2-70b",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "source": "https://huggingface.co/meta-llama/Llama-2-70b-hf/blob/main/config.json",
}


def estimate_per_rank_memory(config, method: str, strategy: str, world_size: int, **kwargs) -> dict[str, int]:
    """`estimate_training_memory` on one of `world_size` ranks: the sharded components / world_size.

    strategy: "ddp" (everything replicated), "zero1", "zero2", "zero3" or "fsdp" (= zero3).
    batch_size in kwargs is the per-rank batch. FSDP + QLoRA is method="qlora",
    strategy="fsdp": the 4-bit weights, stored in a float dtype (`bnb_4bit_quant_storage`),
    are sharded like any other weight. Worked example: Llama-2-70B, QLoRA, FSDP on 2 ranks:
    about 35 GB of 4-bit weights become about 17.5 GB per rank.
    """
    if strategy not in SHARDED:
        raise ValueError(f"strategy must be one of {tuple(SHARDED)}, got {strategy!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    parts = estimate_training_memory(config, method, **kwargs)
    return {
        name: round(value / world_size) if name in SHARDED[strategy] else value
        for name, value in parts.items()
    }
