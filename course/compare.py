"""Full fine-tuning, LoRA and QLoRA on one model, one task, one budget: one measured row each.

The comparative study of QLoRA, LoRA and standard fine-tuning that the course promises,
done on the embedded model. Each method is a *builder* that loads the model
and makes some of it trainable; everything else (data, training loop, measures) is shared,
so the rows differ only in the method:

    full           every weight trains (fp32, AdamW)
    lora           peft LoRA on all linear layers of the fp32 model
    qlora_nf4      peft LoRA on the bitsandbytes 4-bit model: NF4 + double quantization
    qlora_fp4      the same with bitsandbytes' FP4 code (QLoRA paper, Table 4: NF4 vs FP4)
    qlora_by_hand  course.quant.Linear4bit (NF4 + double quant) + course.lora.LoRALinear

`run_method` trains one method and returns a MethodRun whose `.row` has the keys of ROW_KEYS
(one row of benchmarks/results/comparison.json). The benchmark
(benchmarks/comparison.py, the full budget) and notebook 08 (a quick budget) both call it.

Peak training memory = the bytes of the model's tensors (weights, 4-bit quantization
constants, adapters: `model_bytes`) + the peak that training added on top of them (gradients,
optimizer states, activations, allocator overheads: `course.train.train`'s measured peak).
Loading is left out on purpose: transformers may briefly hold fp32 copies while it quantizes,
which says nothing about what training needs.
"""

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from course.data import exact_match_hits, load_task
from course.env import seed_everything
from course.lora import add_lora, count_parameters, save_adapter
from course.memory import release_memory, storage_bytes
from course.models import EMBEDDED_MODEL, load_model
from course.quant import dequantize_linear_layers, quantize_linear_layers
from course.stats import Rate, rate_from
from course.train import answer_nll, evaluate_exact_match, train

METHODS = ("full", "lora", "qlora_nf4", "qlora_fp4", "qlora_by_hand")
ROW_KEYS = (
    "method",
    "trainable_params",
    "peak_memory_bytes",
    "seconds_per_step",
    "tokens_per_second",
    "adapter_bytes",
    "exact_match",
    "perplexity",
    "train_seconds",
    "steps",
)
TASK = "event_extraction"
TARGETS = "all-linear"  # QLoRA paper: adapting every linear layer is what matches full fine-tuning


@dataclass(frozen=True)
class Budget:
    """What every method gets: the same data order, steps, batch, schedule (linear decay to 0), memory savers."""

    steps: int = 15  # half again notebook 03's 10 steps of 8, which reach >= 80%: a margin for every method
    batch_size: int = 8
    lr: float = 2e-3  # LoRA and QLoRA: only A and B move, from B = 0 (notebook 03's recipe)
    # Full fine-tuning moves every pretrained weight: AdamW's step is about lr per weight whatever
    # the gradient's size, and 2e-3 on weights of size ~0.02-0.05 would overwrite the model. 1e-4
    # (20x smaller) is the usual range for supervised fine-tuning of small models.
    full_lr: float = 1e-4
    r: int = 16
    alpha: float = 32
    # The QLoRA recipe's memory savers, the same for every row. Without them what autograd saves for
    # batch 8 (about 1 GB at 135M parameters, notebook 08 section 4) would outweigh the weights.
    gradient_checkpointing: bool = True  # keep each layer's input only; recompute the rest in backward
    answer_logits_only: bool = True  # vocabulary logits at answer tokens only (course.train.answer_loss)
    test_examples: int | None = None  # exact match on the first n test examples (None: all 100)
    validation_examples: int | None = None  # perplexity on the first n validation examples (None: all 60)
    seed: int = 0

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.r) <= 0 or min(self.lr, self.full_lr, self.alpha) <= 0:
            raise ValueError(f"steps, batch_size, r, lr, full_lr and alpha must be positive, got {self}")
        for n in (self.test_examples, self.validation_examples):
            if n is not None and n <= 0:
                raise ValueError(f"test_examples and validation_examples must be positive or None, got {n}")


# --- the five builders: (model, tokenizer, save) with only the trained part requiring grad ------------


def _peft_lora(model, budget: Budget):
    import warnings

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=budget.r, lora_alpha=budget.alpha, target_modules=TARGETS, lora_dropout=0.0)
    with warnings.catch_warnings():  # peft 0.21.2 reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


def _save_pretrained(model, folder: Path) -> None:
    model.save_pretrained(folder)  # full: the whole model; peft: adapter_model.safetensors + config


def build_full(name: str, budget: Budget):
    model, tokenizer = load_model(name, dtype=torch.float32)
    model.requires_grad_(True)
    return model, tokenizer, _save_pretrained


def build_lora(name: str, budget: Budget):
    model, tokenizer = load_model(name, dtype=torch.float32)
    return _peft_lora(model, budget), tokenizer, _save_pretrained


def _build_qlora(quant_type: str):
    def build(name: str, budget: Budget):
        # No prepare_model_for_kbit_training: gradient checkpointing comes from the Budget, as for every
        # other row, and with fp32 compute there is nothing for it to cast.
        model, tokenizer = load_model(name, quantization=quant_type, double_quant=True, dtype=torch.float32)
        return _peft_lora(model, budget), tokenizer, _save_pretrained

    build.__name__ = f"build_qlora_{quant_type}"
    build.__doc__ = f"bitsandbytes {quant_type.upper()} + double quantization, fp32 compute, peft LoRA."
    return build


def build_qlora_by_hand(name: str, budget: Budget):
    model, tokenizer = load_model(name, dtype=torch.float32)
    quantize_linear_layers(model, blocksize=64, quant_type="nf4", double_quant=True)  # QLoRA's storage
    add_lora(model, TARGETS, r=budget.r, alpha=budget.alpha)
    return model, tokenizer, lambda m, folder: save_adapter(m, folder / "adapter.safetensors")


BUILDERS = {
    "full": build_full,
    "lora": build_lora,
    "qlora_nf4": _build_qlora("nf4"),
    "qlora_fp4": _build_qlora("fp4"),
    "qlora_by_hand": build_qlora_by_hand,
}


# --- measures ------------------------------------------------------------------------------


def _tensors(model) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes' quantization constants (kept outside both, on the weight)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        tensors += [state.absmax, state.code]
        if state.state2 is not None:
            tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def model_bytes(model) -> int:
    """Bytes of every tensor the model holds, each storage once (tied embeddings count once).

    Unlike `get_memory_footprint`, this counts bitsandbytes' absmax constants too (FACTS: that
    method counts parameters and buffers only).
    """
    return storage_bytes(_tensors(model))


def _read_once(model) -> None:
    """Read every tensor of `model` once, so that all of it is resident before training is measured.

    transformers memory-maps the safetensors file: a weight that nothing has read yet is not in
    memory, and the first training step would fault all of them in. The peak that training
    adds would then count the weights a second time (they are already in `model_bytes`).
    """
    with torch.no_grad():
        for t in _tensors(model):
            t.sum()


def _weights_bytes(folder: Path) -> int:
    """Bytes of the saved tensors (*.safetensors); configs and model cards are left out (they name local paths)."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


@dataclass
class MethodRun:
    """One method's row plus what the notebook plots beside it."""

    row: dict  # the keys of ROW_KEYS
    losses: list[float]  # one per step
    model_bytes: int  # the part of peak_memory_bytes that the model's tensors take
    hits: list[int]  # per test example: 1 where the greedy answer is an exact match (for paired tests)
    answer_nll: list[float]  # per validation example: mean NLL of its answer tokens (for paired tests)


def run_method(method: str, budget: Budget = Budget(), *, name: str = EMBEDDED_MODEL, progress: bool = True):
    """Build `method`, train it on event_extraction with `budget`, measure everything; returns a MethodRun.

    Exact match on the test split (greedy), perplexity on the validation split. The model is
    freed before returning, so the next method's peak is its own.
    """
    if method not in BUILDERS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    release_memory()
    seed_everything(budget.seed)
    model, tokenizer, save = BUILDERS[method](name, budget)
    if budget.gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers: every decoder layer, use_reentrant=False
    trainable, _ = count_parameters(model)
    weights = model_bytes(model)
    _read_once(model)
    lr = budget.full_lr if method == "full" else budget.lr
    train_set = load_task(TASK, "train")
    result = train(
        model,
        tokenizer,
        train_set,
        steps=budget.steps,
        lr=lr,
        batch_size=budget.batch_size,
        seed=budget.seed,
        progress=progress,
        answer_logits_only=budget.answer_logits_only,
    )
    with tempfile.TemporaryDirectory() as folder:
        save(model, Path(folder))
        adapter_bytes = _weights_bytes(Path(folder))
    if method == "qlora_by_hand":
        # Decode each 4-bit weight once instead of at every generated token: the same arithmetic
        # (Linear4bit's forward is F.linear(x, dequantized W)), only faster to evaluate.
        dequantize_linear_layers(model)
    test_set = _first(load_task(TASK, "test"), budget.test_examples)
    validation_set = _first(load_task(TASK, "validation"), budget.validation_examples)
    scored = evaluate_exact_match(model, tokenizer, test_set, batch_size=50)
    hits = exact_match_hits(scored.predictions, scored.references)
    nll_sums, counts = answer_nll(model, tokenizer, validation_set)
    del model
    release_memory()
    row = {
        "method": method,
        "trainable_params": trainable,
        "peak_memory_bytes": weights + result.peak_memory_bytes,
        "seconds_per_step": result.seconds / result.steps,
        "tokens_per_second": result.tokens_per_second,
        "adapter_bytes": adapter_bytes,
        "exact_match": scored.exact_match,
        "perplexity": math.exp(sum(nll_sums) / sum(counts)),
        "train_seconds": result.seconds,
        "steps": result.steps,
    }
    per_example = [nll / count for nll, count in zip(nll_sums, counts, strict=True)]
    return MethodRun(row=row, losses=result.losses, model_bytes=weights, hits=hits, answer_nll=per_example)


def _first(dataset, n: int | None):
    return dataset if n is None else dataset.select(range(min(n, len(dataset))))


# --- reading rows --------------------------------------------------------------------------


def memory_ratio(rows: list[dict], method: str, baseline: str) -> float:
    """peak_memory_bytes of `method` divided by that of `baseline` (rows as in comparison.json)."""
    by_method = {row["method"]: row for row in rows}
    missing = [m for m in (method, baseline) if m not in by_method]
    if missing:
        raise ValueError(f"no row for {missing}; rows have {sorted(by_method)}")
    return by_method[method]["peak_memory_bytes"] / by_method[baseline]["peak_memory_bytes"]


# Peak memory is one measurement per method. The three QLoRA rows of comparison.json keep byte-identical
# tensors (179.2 MiB) and train the same adapters, and their peaks spread by 0.5%: run-to-run noise of one
# need. Differences under 2% of the smaller peak are treated as a tie.
MEMORY_NOISE = 0.02


def exact_match_rate(row: dict, n: int) -> Rate:
    """A row's exact match on n test examples, as a Rate with its 95% Wilson interval."""
    return rate_from(row["exact_match"], n)


@dataclass(frozen=True)
class Choice:
    """The outcome of `choose_method`: one method, several that tie within the noise, or none."""

    methods: tuple[str, ...]
    reason: str


def choose_method(
    rows: list[dict], min_exact_match: float, n: int, memory_noise: float = MEMORY_NOISE
) -> Choice:
    """The least-memory method that reaches an exact-match bar, deciding only beyond the noise.

    A method is ruled out only when its whole 95% Wilson interval lies below the bar (on n test
    examples, 94% and 97% cannot be told apart from a 95% bar). Among the others the one with the
    least peak memory wins, unless others are within `memory_noise` (relative) of it: then they tie
    and all are returned. The reason says which, and which of them might still miss the bar.
    """
    if not 0.0 <= min_exact_match <= 1.0:
        raise ValueError(f"min_exact_match must be in [0, 1], got {min_exact_match!r}")
    if memory_noise < 0:
        raise ValueError(f"memory_noise must be >= 0, got {memory_noise!r}")
    rates = {row["method"]: exact_match_rate(row, n) for row in rows}
    candidates = [row for row in rows if rates[row["method"]].interval[1] >= min_exact_match]
    if not candidates:
        return Choice((), f"no method reaches {min_exact_match:.0%}: every interval lies below it")
    least = min(row["peak_memory_bytes"] for row in candidates)
    tied = sorted(
        (row for row in candidates if row["peak_memory_bytes"] <= least * (1 + memory_noise)),
        key=lambda row: row["peak_memory_bytes"],
    )
    methods = tuple(row["method"] for row in tied)
    peaks = ", ".join(f"{row['method']} {row['peak_memory_bytes'] / 2**20:,.0f} MiB" for row in tied)
    if len(methods) == 1:
        reason = f"{methods[0]}: least memory ({peaks}) among those that can reach the bar"
    else:
        reason = f"tie on memory within {memory_noise:.0%}: {peaks}"
    unsure = [m for m in methods if rates[m].interval[0] < min_exact_match]
    if unsure:
        reason += "; the bar lies inside the interval of " + ", ".join(f"{m} {rates[m]}" for m in unsure)
    return Choice(methods, reason)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with each method in `new` replaced (or added), in the order of METHODS."""
    by_method = {row["method"]: row for row in old} | {row["method"]: row for row in new}
    return [by_method[m] for m in METHODS if m in by_method]


def format_table(rows: list[dict], n: int | None = None) -> str:
    """A fixed-width text table of rows (pandas is not a course dependency).

    With `n` (the number of test examples) the exact match carries its 95% Wilson interval.
    """
    exact_width = 26 if n else 6
    header = f"{'method':14s} {'trainable':>12s} {'peak MiB':>9s} {'s/step':>7s} {'tok/s':>6s} "
    header += f"{'saved MB':>9s} {'exact match':>{exact_width}s} {'ppl':>6s} {'steps':>5s}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['method']:14s} {row['trainable_params']:>12,} {row['peak_memory_bytes'] / 2**20:>9,.0f} "
            f"{row['seconds_per_step']:>7.1f} {row['tokens_per_second']:>6.0f} "
            f"{row['adapter_bytes'] / 1e6:>9.1f} "
            f"{str(exact_match_rate(row, n)) if n else format(row['exact_match'], '.0%'):>{exact_width}s} "
            f"{row['perplexity']:>6.3f} "
            f"{row['steps']:>5d}"
        )
    return "\n".join(lines)
