"""LoRA, prompt tuning, prefix tuning, P-tuning and IA3 on one task and one budget.

The glue behind notebook 11's comparison and benchmarks/families.py. Each family is a builder
that wraps a fresh copy of the frozen base model; everything else is shared with the rest of the
course: `course.train.train` (same seeded batches, AdamW, linear decay, answer-only logits),
`course.train.teacher_forced_exact_match` (a lower bound on greedy exact match, from one forward pass),
`course.train.perplexity` (its log is the validation loss), `course.compare.model_bytes` and
the measured peak of `train` for memory, `course.stats` for the intervals.

    lora           peft LoRA on every linear layer (notebook 03's baseline)
    prompt_tuning  course.prompt_tuning.PromptTuning, initialized from the task instruction's tokens
    prefix_tuning  course.prefix_tuning.PrefixTuning with the MLP reparameterization
    p_tuning       course.p_tuning.PTuning with peft's default MLP encoder
    ia3            course.ia3.add_ia3 on k_proj, v_proj, down_proj

The hand-built families are proven equal to peft's (notebook 11, tests). Learning rates differ
by family (Lester et al. 2021 train prompts with lr 0.3; LoRA uses ~1e-3), so `lr_search` trains
each family at a few rates and keeps the one with the lowest validation loss; the test split is
touched once, for the kept run.

The validation-loss curve comes from training in `Setup.evaluations` chunks: `train` with a
checkpoint folder resumes exactly where the previous chunk stopped (optimizer, schedule and
batches included), so a chunked run is the same run, looked at along the way.
"""

import copy
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from course.compare import model_bytes
from course.data import load_task
from course.env import seed_everything
from course.ia3 import add_ia3
from course.memory import release_memory
from course.p_tuning import PTuning
from course.prefix_tuning import PrefixTuning
from course.prompt_tuning import PromptTuning, init_ids_from_text
from course.stats import Rate
from course.train import perplexity, teacher_forced_exact_match, train

FAMILIES = ("lora", "prompt_tuning", "prefix_tuning", "p_tuning", "ia3")
TASK = "ticket_routing"  # a short answer (about 10 tokens) from a short prompt (about 57 tokens): cheap steps
INIT_TEXT = "Route the ticket to a team and give its priority."  # prompt tuning's init (Lester et al. 2021)

# Can one forward pass serve a batch whose rows belong to different tenants (adapters)?
MIXED_BATCH = {
    "lora": "yes: peft's adapter_names=[...] routes rows to adapters (notebook 10)",
    "prompt_tuning": "yes: the prompt is an input, one per row (prompts=(B, n, d))",
    "prefix_tuning": "yes: the prefix is a per-row cache entry (prefixes=(B, n, L*2*kv))",
    "p_tuning": "yes: its output is a prompt, one per row",
    "ia3": "in principle (a per-row scaling vector, T-Few 3.3); peft 0.21.2 has no adapter_names for IA3; "
    "merged: no",
}


@dataclass(frozen=True)
class Setup:
    """One budget for every family. The defaults are a longer run than benchmarks/families.py's BENCH."""

    steps: int = 24  # optimizer steps per run
    batch_size: int = 8
    evaluations: int = 4  # validation loss measured after every steps / evaluations steps (and at step 0)
    num_virtual_tokens: int = (
        20  # prompt, prefix and P-tuning (Lester et al. use 1-150; 20 is peft's examples' size)
    )
    r: int = 16  # LoRA rank, alpha 2r, all linear layers (notebook 08's row)
    validation_examples: int = 30  # for the validation loss (the lr search)
    test_examples: int = 100  # exact match, once per kept run
    seed: int = 0

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.evaluations, self.num_virtual_tokens, self.r) <= 0:
            raise ValueError(f"every size in Setup must be positive, got {self}")
        if self.steps % self.evaluations:
            raise ValueError(f"steps ({self.steps}) must be a multiple of evaluations ({self.evaluations})")
        if min(self.validation_examples, self.test_examples) <= 0:
            raise ValueError("validation_examples and test_examples must be positive")


def build(family: str, base, tokenizer, setup: Setup):
    """A trainable copy of `base` for `family` (only the family's parameters require grad)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    n = setup.num_virtual_tokens
    if family == "lora":
        import warnings

        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=setup.r, lora_alpha=2 * setup.r, target_modules="all-linear", lora_dropout=0.0)
        with warnings.catch_warnings():  # peft 0.21.2 reads a property transformers 5 deprecates
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, config)
    if family == "prompt_tuning":
        return PromptTuning(model, n, init_ids_from_text(tokenizer, INIT_TEXT, n))
    if family == "prefix_tuning":
        return PrefixTuning(model, n, prefix_projection=True)
    if family == "p_tuning":
        return PTuning(model, n, encoder="MLP")
    add_ia3(model)
    return model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stored_tensors(family: str, model) -> dict[str, torch.Tensor]:
    """What a deployment keeps on disk: the trained tensors, after any reparameterization is applied."""
    if family == "lora":
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    if family in ("prompt_tuning", "p_tuning"):
        return {"prompt": model.soft_prompt()}  # (n, d): P-tuning's encoder is dropped
    if family == "prefix_tuning":
        return {"prefix": model.stored_prefix()}  # (n, L*2*kv_dim): the MLP is dropped
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def adapter_bytes(family: str, model) -> int:
    """Size on disk of `stored_tensors` in one safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in stored_tensors(family, model).items()}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adapter.safetensors"
        save_file(tensors, path)
        return path.stat().st_size


def validation_loss(model, tokenizer, dataset) -> float:
    """Mean answer-token cross-entropy on `dataset` (log of course.train.perplexity)."""
    return math.log(perplexity(model, tokenizer, dataset))


@dataclass
class FamilyRun:
    family: str
    lr: float
    row: dict  # trainable_params, peak_memory_bytes, seconds_per_step, adapter_bytes, val_loss, ...
    val_steps: list[int]
    val_losses: list[float]
    train_losses: list[float]
    model: object = None  # the trained model (dropped by lr_search for runs it does not keep)


def run_family(
    family: str, lr: float, base, tokenizer, setup: Setup = Setup(), *, progress: bool = False
) -> FamilyRun:
    """Train `family` at `lr` on TASK, measuring the validation loss along the way (the model is kept in the run)."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    release_memory()
    seed_everything(setup.seed)
    model = build(family, base, tokenizer, setup)
    train_set = load_task(TASK, "train")
    val_set = load_task(TASK, "validation").select(range(setup.validation_examples))
    weights = model_bytes(model)
    chunk = setup.steps // setup.evaluations
    val_steps, val_losses = [0], [validation_loss(model, tokenizer, val_set)]
    seconds, peak, losses = 0.0, 0, []
    with tempfile.TemporaryDirectory() as folder:
        for done in range(chunk, setup.steps + 1, chunk):
            result = train(
                model,
                tokenizer,
                train_set,
                steps=done,
                total_steps=setup.steps,
                lr=lr,
                batch_size=setup.batch_size,
                seed=setup.seed,
                progress=progress,
                checkpoint_dir=folder,  # resumes the previous chunk: one run, looked at along the way
                checkpoint_every=chunk,
                answer_logits_only=True,
            )
            seconds += result.seconds
            peak = max(peak, result.peak_memory_bytes)
            losses = result.losses
            val_steps.append(done)
            val_losses.append(validation_loss(model, tokenizer, val_set))
    row = {
        "family": family,
        "lr": lr,
        "trainable_params": trainable_parameters(model),
        "peak_memory_bytes": weights + peak,
        "seconds_per_step": seconds / setup.steps,
        "adapter_bytes": adapter_bytes(family, model),
        "val_loss": val_losses[-1],
        "mixed_batch": MIXED_BATCH[family],
    }
    return FamilyRun(family, lr, row, val_steps, val_losses, losses, model)


def score_test(run: FamilyRun, tokenizer, setup: Setup = Setup()) -> Rate:
    """Exact match of the run's model on the first `test_examples` test examples; recorded in run.row."""
    test_set = load_task(TASK, "test").select(range(setup.test_examples))
    share = teacher_forced_exact_match(run.model, tokenizer, test_set)
    rate = Rate(round(share * len(test_set)), len(test_set))
    run.row |= {
        "exact_match": rate.value,
        "hits": rate.successes,
        "n": rate.n,
        "interval": list(rate.interval),
    }
    return rate


def lr_search(family: str, lrs, base, tokenizer, setup: Setup = Setup(), *, progress: bool = False):
    """Train at each lr, keep the run with the lowest final validation loss, score only it on test.

    Returns (kept run, every run's (lr, final validation loss)); only the kept run holds its model.
    """
    if not lrs:
        raise ValueError("give at least one learning rate")
    best, best_loss, searched = None, math.inf, []
    for lr in lrs:
        run = run_family(family, lr, base, tokenizer, setup, progress=progress)
        loss = (
            run.val_losses[-1] if math.isfinite(run.val_losses[-1]) else math.inf
        )  # a diverged run never wins
        searched.append((lr, run.val_losses[-1]))
        if best is None or loss < best_loss:
            if best is not None:
                best.model = None
            best, best_loss = run, loss
        else:
            run.model = None
        release_memory()
    score_test(best, tokenizer, setup)
    return best, searched


def setup_dict(setup: Setup) -> dict:
    return asdict(setup) | {"task": TASK, "init_text": INIT_TEXT}
