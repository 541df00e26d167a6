"""Glue between the course and TRL's SFTTrainer: safe settings, what the loss sees, when to stop.

TRL's SFTTrainer (von Werra et al., TRL) is the field's supervised fine-tuning loop: it
applies the chat template, masks the prompt (`completion_only_loss`), pads, and runs a
transformers Trainer. Everything it does to one batch is what `course.train` does by hand,
so the two give the same loss on the same batch (`first_step_losses`).

The `SFTConfig` defaults that catch people out (TRL 1.16, checked in notebook 13):
- `bf16=True`: refused on a CPU without `use_cpu=True`; a T4 (compute capability 7.5) has no
  bf16 at all, so use fp16 there.
- `learning_rate=2e-5`: a full fine-tuning rate; LoRA wants about 10x more (QLoRA: 2e-4).
- `max_length=1024`: longer examples are cut from the end, and a cut answer has no end-of-turn.
- `packing=False`; with `packing=True` examples are concatenated, and without a
  variable-length (flash-attention) kernel they attend to each other across boundaries.
"""

import math

import torch

from course.data import IGNORE_INDEX

# What the course sets on every run, and why; anything else stays TRL's default.
COURSE_SETTINGS = {
    "completion_only_loss": True,  # the loss covers the answer (and its end-of-turn), not the prompt
    "packing": False,  # the eager/SDPA attention here has no variable-length kernel
    "report_to": "none",  # no wandb / tensorboard from a notebook
    "dataloader_num_workers": 0,
    "save_only_model": True,  # adapter checkpoints only; optimizer states would double the disk use
    # TRL turns checkpointing on by default (less memory, ~30% more compute); a 135M model does not need it.
    # Naming transformers 5's new field also avoids its deprecation warning for the old one.
    "activation_checkpointing": False,
}


def sft_config(output_dir, *, max_length: int, learning_rate: float, **overrides):
    """An `SFTConfig` with the course's settings, bf16 only where the hardware has it."""
    from trl import SFTConfig

    from course.env import trainer_precision

    precision = {**trainer_precision(), "use_cpu": not torch.cuda.is_available()}
    return SFTConfig(
        output_dir=str(output_dir),
        max_length=max_length,
        learning_rate=learning_rate,
        **{**COURSE_SETTINGS, **precision, **overrides},
    )


def tokenize_chat(tokenizer, messages: list[dict]) -> dict[str, list[int]]:
    """By hand, what TRL does to a conversational prompt-completion row under completion_only_loss.

    input_ids = the whole chat-formatted example; labels = -100 on the prompt (everything up to
    and including `<|im_start|>assistant\n`), the token itself on the answer and on what the
    template writes after it (`<|im_end|>` and a newline): the end-of-turn is trained, so the
    model learns to stop. Worked example (text instead of ids): "<user>hi<end><asst>" + "yo<end>\n"
    -> labels [-100 x 4, "yo", "<end>", "\n"].
    """
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full example")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def trained_text(tokenizer, input_ids: list[int], labels: list[int]) -> tuple[str, str]:
    """(everything the model reads, only the tokens the loss trains on) for one example.

    Position t's label is the token at t (transformers shifts inside the loss), so the
    trained tokens are input_ids where labels != -100.
    """
    if len(input_ids) != len(labels):
        raise ValueError(f"input_ids ({len(input_ids)}) and labels ({len(labels)}) differ in length")
    trained = [i for i, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX]
    return tokenizer.decode(input_ids), tokenizer.decode(trained)


def first_batch(trainer) -> dict[str, torch.Tensor]:
    """The first training batch exactly as the trainer builds it (its collator, its order)."""
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def first_step_losses(trainer) -> tuple[float, float]:
    """(SFTTrainer's loss, course.train's answer-only loss) on the trainer's first batch, no update."""
    from course.train import answer_loss

    batch = first_batch(trainer)
    model = trainer.model
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}  # TRL 1.16 masks labels itself
    model.train()  # the state the trainer computes its first loss in (dropout is 0 in our configs)
    with torch.no_grad():
        theirs = trainer.compute_loss(model, batch).item()
        ours = answer_loss(model, inputs).item()
    model.eval()
    return theirs, ours


def loss_curves(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{"train": (steps, losses), "validation": (steps, losses)} from `trainer.state.log_history`."""
    curves = {"train": ([], []), "validation": ([], [])}
    for entry in log_history:
        for key, name in (("loss", "train"), ("eval_loss", "validation")):
            if key in entry and math.isfinite(entry[key]):
                curves[name][0].append(int(entry["step"]))
                curves[name][1].append(float(entry[key]))
    return curves


def early_stop(losses: list[float], patience: int, min_delta: float = 0.0) -> tuple[int, int]:
    """(best evaluation, evaluation at which training stops), both 0-based indices into `losses`.

    An evaluation improves when it beats the best so far by more than `min_delta`; training stops
    after `patience` evaluations in a row without improvement (or at the last one), and the
    checkpoint kept is the best, not the last (transformers' EarlyStoppingCallback with
    `load_best_model_at_end`). Worked example: [3, 2, 2.5, 1.9, 2.0, 2.1], patience 2 -> (3, 5).
    """
    if patience < 1:
        raise ValueError(f"patience must be at least 1 evaluation, got {patience}")
    if not losses:
        raise ValueError("early_stop needs at least one evaluation loss")
    best, waited = 0, 0
    for i in range(1, len(losses)):
        if losses[i] < losses[best] - min_delta:
            best, waited = i, 0
        else:
            waited += 1
            if waited >= patience:
                return best, i
    return best, len(losses) - 1


@torch.no_grad()
def text_perplexity(model, tokenizer, lines: list[str]) -> float:
    """exp(mean next-token loss) over plain text, one line per sequence: general ability, for forgetting.

    Biderman et al. 2024 ("LoRA Learns Less and Forgets Less") measure forgetting as the drop on
    general benchmarks after fine-tuning on a target domain; on a CPU we use perplexity on a small
    general text the model was not tuned on: it rises when general knowledge is overwritten.
    """
    from course.kernel_path import use_reference_kernel

    use_reference_kernel(model)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for line in lines:
        ids = torch.tensor([tokenizer(line, add_special_tokens=False)["input_ids"]], device=device)  # (1, T)
        logits = model(input_ids=ids).logits  # (1, T, V)
        total_nll += torch.nn.functional.cross_entropy(
            logits[0, :-1].float(), ids[0, 1:], reduction="sum"
        ).item()
        total_tokens += ids.shape[1] - 1
    return math.exp(total_nll / total_tokens)


def greedy_answers(model, tokenizer, examples: list[dict], max_new_tokens: int = 24, batch_size: int = 16):
    """Greedy answers to each example's prompt (its messages without the last, assistant turn)."""
    from course.train import generate_greedy, left_padded

    device = next(model.parameters()).device
    prompts = [
        tokenizer.apply_chat_template(e["messages"][:-1], tokenize=False, add_generation_prompt=True)
        for e in examples
    ]
    answers = []
    for start in range(0, len(prompts), batch_size):
        enc = left_padded(tokenizer, prompts[start : start + batch_size], device)
        answers += generate_greedy(model, tokenizer, enc, max_new_tokens)
    return answers
