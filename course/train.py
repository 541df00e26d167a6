"""A small, readable training loop and the two measures the course reports.

`train` is what a Trainer does, with nothing hidden: fixed data order from a seed,
completion-only loss, AdamW (or any optimizer factory), a linear learning-rate decay,
a tqdm bar, a loss history and, when asked, checkpoints it resumes from after an
interruption. `evaluate_exact_match` generates greedily in batches and
scores the answers; `teacher_forced_hits` gets a lower bound of it, per example, from one forward
pass (for comparing many models, or a slow one, cheaply); `perplexity` is exp(mean loss) over the answer tokens.

Each of them first puts a bitsandbytes 4-bit model on the reference kernel path
(`course.kernel_path`): on a CPU with AVX512-BF16 an eval forward would otherwise repack the
weights in place, and evaluating in the middle of a QLoRA run would change the rest of the run.
A model whose weights were already repacked is refused.
"""

import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from course.data import IGNORE_INDEX, collate, exact_match, format_prompt, tokenize_for_training
from course.kernel_path import use_reference_kernel
from course.memory import measure_peak


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one mean loss per optimizer step
    seconds: float = 0.0  # wall time of all steps
    tokens_per_second: float = 0.0  # input tokens (padding excluded) per second of training
    peak_memory_bytes: int = 0  # from course.memory.measure_peak
    steps: int = 0
    resumed_from: int = 0  # the step of the checkpoint this run resumed from (0: a fresh start)


@dataclass
class EvalResult:
    exact_match: float
    predictions: list[str]
    references: list[str]


def _batches(tokenized: list[dict], batch_size: int, steps: int, seed: int):
    """`steps` batches in a seeded order, reshuffled after each pass over the data."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(tokenized), generator=generator).tolist()
        yield [tokenized[i] for i in order[:batch_size]]
        order = order[batch_size:]


CHECKPOINT_PREFIX = "step-"  # checkpoint files: step-000012.pt (zero-padded: sorted names = sorted steps)
CHECKPOINT_KEYS = {"step", "config", "trainable", "optimizer", "schedule", "rng", "cuda_rng", "losses"}


def _checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"{CHECKPOINT_PREFIX}{step:06d}.pt"


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None.

    Only finished files count: a checkpoint is written under a temporary name and renamed
    when complete, so a run killed while saving leaves at most a stray `.tmp` file.
    """
    paths = sorted(Path(folder).glob(f"{CHECKPOINT_PREFIX}[0-9]*.pt"))
    return paths[-1] if paths else None


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(folder: Path, state: dict) -> Path:
    """Write `state` atomically (temporary file, fsync, rename) and delete older checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    path = _checkpoint_path(folder, state["step"])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    for old in folder.glob(f"{CHECKPOINT_PREFIX}[0-9]*.pt"):
        if old != path:
            old.unlink()
    return path


def train(
    model,
    tokenizer,
    dataset,
    *,
    steps: int,
    lr: float,
    batch_size: int = 8,
    optimizer: str | Callable = "adamw",
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    total_steps: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    answer_logits_only: bool = False,
) -> TrainResult:
    """Train the parameters of `model` that require grad for `steps` optimizer steps.

    optimizer: "adamw" (torch.optim.AdamW) or a callable `params -> Optimizer`, e.g.
    `lambda p: bnb.optim.PagedAdamW8bit(p, lr=1e-3)`. The learning rate decays linearly
    to zero, as in the QLoRA recipe's short runs. total_steps (default: steps) is the length
    of that schedule: `steps=4, total_steps=30` runs exactly the first 4 steps of a 30-step
    run (same batches, same learning rates), e.g. to compare two implementations cheaply.

    checkpoint_dir: save a checkpoint there every `checkpoint_every` steps and after the last
    one (trainable parameters, optimizer and schedule states, RNG state, losses so far), and
    resume from the newest one when it exists. The batches are a function of the seed and
    the step, so the resumed run sees exactly the batches the interrupted one would have:
    interrupted + resumed ends where an uninterrupted run with the same seed ends. A
    checkpoint saved with another lr, batch size, seed, schedule or dataset size, or for
    other trainable parameters, is refused with a ValueError instead of being mixed in.

    answer_logits_only: compute the vocabulary logits at the answer positions only
    (`answer_loss`): the same loss, without the largest activation of a small model.

    A model that computes in fp16 (a frozen fp16 base, e.g. on a T4 where `compute_dtype` is
    fp16) trains with dynamic loss scaling (`grad_scaler`); its trainable parameters must be
    fp32, as LoRA adapters are.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 <= lr < math.inf:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: give at least one example with 'input', 'output' and 'task'")
    use_reference_kernel(model)  # the same forward in every evaluation between runs, on every CPU
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters (did you freeze everything and add no adapter?)"
        )
    scaler = grad_scaler(model, params)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif callable(optimizer):
        opt = optimizer(params)
    else:
        raise ValueError(f"optimizer must be 'adamw' or a callable params -> Optimizer, got {optimizer!r}")
    total_steps = steps if total_steps is None else total_steps
    if total_steps < steps:
        raise ValueError(f"total_steps ({total_steps}) must be at least steps ({steps})")
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / total_steps)
    if checkpoint_every <= 0:
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every}")
    device = next(model.parameters()).device
    tokenized = [tokenize_for_training(tokenizer, example) for example in dataset]
    result = TrainResult(steps=steps)
    config = {
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "total_steps": total_steps,
        "examples": len(tokenized),
    }
    folder = None if checkpoint_dir is None else Path(checkpoint_dir)
    if folder is not None and (path := latest_checkpoint(folder)) is not None:
        result.resumed_from = _resume(path, model, opt, schedule, scaler, config, steps, result.losses)
    tokens = 0

    def checkpoint(step: int) -> None:
        state = {
            "step": step,
            "config": config,
            "trainable": _trainable_state(model),
            "optimizer": opt.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(),  # {} unless the model computes in fp16
            "rng": torch.get_rng_state(),  # dropout masks continue as in an uninterrupted run
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "losses": list(result.losses),
        }
        _save_checkpoint(folder, state)

    def run():
        nonlocal tokens
        model.train()
        batches = itertools.islice(
            _batches(tokenized, batch_size, steps, seed), result.resumed_from, None
        )  # a resumed run skips the batches already trained on
        bar = tqdm(batches, initial=result.resumed_from, total=steps, desc="train", disable=not progress)
        for step, batch in enumerate(bar, start=result.resumed_from + 1):
            inputs = {k: v.to(device) for k, v in collate(batch, tokenizer.pad_token_id).items()}
            loss = answer_loss(model, inputs) if answer_logits_only else model(**inputs).loss
            scaler.scale(loss).backward()  # x the loss scale in fp16; unchanged otherwise
            scaler.step(opt)  # unscales first; skips the step if a gradient overflowed
            scaler.update()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(inputs["attention_mask"].sum())
            result.losses.append(loss.item())
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
            if folder is not None and (step % checkpoint_every == 0 or step == steps):
                checkpoint(step)
        model.eval()

    start = time.perf_counter()
    _, result.peak_memory_bytes = measure_peak(run, device=device)
    result.seconds = time.perf_counter() - start
    result.tokens_per_second = tokens / result.seconds if tokens else 0.0
    return result


def grad_scaler(model, params: list[torch.nn.Parameter]) -> torch.amp.GradScaler:
    """Dynamic loss scaling, on only when the model computes in fp16.

    Backward through fp16 activations rounds gradients below 6e-5 (fp16's smallest normal) toward
    zero. Multiplying the loss by a scale S (65,536 to start) lifts them into range; the
    gradients are divided by S before the optimizer step, a step whose gradients overflowed to
    inf is skipped and S halved, and S doubles again after 2,000 clean steps (Micikevicius et al.
    2018, Sec. 3.2; torch.amp.GradScaler). bf16 has fp32's exponent range and needs none.
    The trainable parameters themselves must be fp32: an Adam update of an fp16 weight rounds
    away, and GradScaler refuses fp16 gradients.
    """
    if not any(p.dtype == torch.float16 for p in model.parameters()):
        return torch.amp.GradScaler(enabled=False)
    trained = {id(p) for p in params}
    half = [name for name, p in model.named_parameters() if id(p) in trained and p.dtype == torch.float16]
    if half:
        raise ValueError(
            f"{len(half)} trainable parameters are fp16 (e.g. {half[0]}): keep what trains in fp32, as LoRA adapters are, "
            "and let the frozen base compute in fp16; for full fine-tuning load the model with "
            "dtype=torch.float32 (or bf16 where the GPU has it)"
        )
    return torch.amp.GradScaler(next(model.parameters()).device.type)


def answer_loss(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The completion-only loss of `model(**inputs).loss`, with logits only where it needs them.

    A causal LM's head turns every position's hidden state into one logit per vocabulary
    entry, (B, T, V) in fp32, and the loss then keeps a log-softmax of the same size for
    backward. With 49,152 tokens in the vocabulary that is the largest activation of a small
    model, yet only the answer tokens are scored. Position t predicts token t+1, so we ask
    the model (transformers' `logits_to_keep`, a boolean (B, T) mask) for the positions whose
    next token is labelled: the same terms, the same mean, a fraction of the memory.
    """
    targets = inputs["labels"][:, 1:]  # (B, T-1): the token each position predicts
    scored = targets != IGNORE_INDEX
    keep = torch.nn.functional.pad(scored, (0, 1))  # (B, T): the last position predicts nothing
    logits = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep
    ).logits  # (answer tokens, V), rows in (batch, position) order, as targets[scored]
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored])


def _resume(path: Path, model, opt, schedule, scaler, config: dict, steps: int, losses: list[float]) -> int:
    """Load a checkpoint written by `train` into model, optimizer and schedule; returns its step.

    `weights_only=True`: torch's restricted unpickler builds tensors, numbers, strings, lists,
    tuples and dicts (all that optimizer and schedule states hold) and refuses anything else.
    A checkpoint is a file learners pass around; with `weights_only=False` loading it would
    run whatever code was pickled into it.
    """
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds more than tensors, numbers, strings, lists and dicts "
            f"(a pickled object or callable, which loading would run). Only load checkpoints written by "
            f"course.train.train, or delete it to start afresh. torch said: {str(err).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
        raise ValueError(
            f"{path} is not a checkpoint of course.train.train (expected a dict with keys {sorted(CHECKPOINT_KEYS)})"
        )
    if state["config"] != config:
        raise ValueError(
            f"the checkpoint {path} was saved by a run with {state['config']}, this run has {config}. "
            "Resume with the same settings, or give another checkpoint_dir for a new run."
        )
    if state["step"] > steps:
        raise ValueError(f"the checkpoint {path} is at step {state['step']}, past this run's steps={steps}")
    trainable = dict(model.named_parameters())
    names = {name for name, p in trainable.items() if p.requires_grad}
    if set(state["trainable"]) != names:
        raise ValueError(
            f"the checkpoint {path} holds other trainable parameters than this model's "
            f"(e.g. {sorted(set(state['trainable']) ^ names)[:2]}): was it saved for another model or adapter?"
        )
    with torch.no_grad():
        for name, value in state["trainable"].items():
            trainable[name].copy_(value)
    opt.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if state.get("scaler"):  # the loss scale reached, so the resumed run skips the same steps
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    losses[:] = state["losses"]
    return state["step"]


@torch.no_grad()
def left_padded(tokenizer, prompts: list[str], device) -> dict[str, torch.Tensor]:
    """(B, T) input_ids and attention_mask, padded on the left.

    Left padding keeps each prompt's last token at the end of its row, where generation
    continues; the tokenizer's own padding side is restored afterwards.
    """
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


@torch.no_grad()
def generate_greedy(
    model, tokenizer, enc: dict[str, torch.Tensor], max_new_tokens: int, **kwargs
) -> list[str]:
    """Greedy answers for a `left_padded` batch, decoded without the prompt and stripped.

    kwargs go to `model.generate` (e.g. peft's `adapter_names` for a mixed batch).
    """
    from transformers import GenerationConfig

    use_reference_kernel(model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    out = model.generate(**enc, generation_config=config, **kwargs)  # (B, T_prompt + T_new)
    answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def generate_answers(
    model,
    tokenizer,
    dataset,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy answers for every example, batched with left padding (`left_padded`).

    max_new_tokens defaults to the longest reference answer plus 2 tokens (its end-of-turn
    and one spare): a longer answer cannot be an exact match anyway, and on a CPU every
    generated token of a batch costs a forward pass.
    """
    if max_new_tokens is None:
        max_new_tokens = 2 + max(
            len(tokenizer(ex["output"], add_special_tokens=False)["input_ids"]) for ex in dataset
        )
    device = next(model.parameters()).device
    answers = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="generate", disable=not progress):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
        enc = left_padded(tokenizer, [format_prompt(tokenizer, ex) for ex in rows], device)
        answers += generate_greedy(model, tokenizer, enc, max_new_tokens)
    return answers


def evaluate_exact_match(model, tokenizer, dataset, **kwargs) -> EvalResult:
    """Exact match of greedy answers against the dataset's `output` column."""
    predictions = generate_answers(model, tokenizer, dataset, **kwargs)
    references = list(dataset["output"])
    return EvalResult(exact_match(predictions, references), predictions, references)


@torch.no_grad()
def teacher_forced_hits(model, tokenizer, dataset, batch_size: int = 50) -> list[int]:
    """Per example, 1 when every answer token (and end-of-turn) is the model's argmax given the truth so far.

    Greedy decoding writes exactly the reference's tokens if and only if this holds, so a hit here is
    a greedy hit; greedy exact match can score more (an answer equal to the reference as text but in
    other tokens, or one that parses to the same fields), never less. It is a lower bound on greedy
    exact match, from one forward pass instead of one per new token: cheap enough for a whole test
    split through a slow model, and per example, so two models can be compared paired.
    """
    use_reference_kernel(model)
    device = next(model.parameters()).device
    tokenized = [tokenize_for_training(tokenizer, example) for example in dataset]
    hits = []
    for start in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[start : start + batch_size], tokenizer.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits  # (B, T, V)
        predicted = logits[:, :-1].argmax(-1).cpu()  # (B, T-1): the token predicted for position t+1
        targets = batch["labels"][:, 1:]  # (B, T-1)
        wrong = (predicted != targets) & (targets != IGNORE_INDEX)
        hits += (~wrong.any(-1)).int().tolist()
    return hits


def teacher_forced_exact_match(model, tokenizer, dataset, batch_size: int = 50) -> float:
    """The share of `teacher_forced_hits`: a lower bound on greedy exact match, from one forward pass."""
    hits = teacher_forced_hits(model, tokenizer, dataset, batch_size)
    return sum(hits) / len(hits)


@torch.no_grad()
def answer_nll(model, tokenizer, dataset, *, batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Per example: the summed negative log-likelihood of its answer tokens, and how many there are.

    Kept per example so that two models scored on the same examples can be compared paired
    (`course.stats`); `perplexity` pools them.
    """
    use_reference_kernel(model)
    device = next(model.parameters()).device
    tokenized = [tokenize_for_training(tokenizer, example) for example in dataset]
    nll_sums, counts = [], []
    for start in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[start : start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # (B, T, V)
        targets = batch["labels"][:, 1:]  # (B, T-1): token t is predicted at position t-1
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(),  # (B, V, T-1)
            targets,
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )  # (B, T-1), 0 where ignored
        nll_sums += nll.sum(-1).tolist()
        counts += (targets != IGNORE_INDEX).sum(-1).tolist()
    return nll_sums, counts


def perplexity(model, tokenizer, dataset, *, batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood) of the answer tokens, prompts excluded."""
    nll_sums, counts = answer_nll(model, tokenizer, dataset, batch_size=batch_size)
    return math.exp(sum(nll_sums) / sum(counts))
