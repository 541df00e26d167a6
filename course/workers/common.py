"""What a worker and the single-process reference share: the same model, the same global batches.

Both sides build the model from the same seed and read the same global batches, so a
distributed run and a run in one process can be compared parameter by parameter.
"""

import logging
import random
import warnings

import torch

# bitsandbytes (imported by peft) logs at import that an optional CPU kernel package is
# missing; the workers' output is shown in the notebook, so keep that one logger quiet.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# peft 0.21.2 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates: the warning
# comes from inside peft and no argument avoids it (the notebooks filter the same message).
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)

MODELS = ("tiny", "embedded")
METHODS = ("lora", "full")


def build_model(name: str = "tiny", *, method: str = "lora", r: int = 8, seed: int = 0):
    """(model, tokenizer or None): the tiny random Llama or the embedded SmolLM2, with LoRA on all linear layers."""
    if name not in MODELS or method not in METHODS:
        raise ValueError(
            f"model must be one of {MODELS} and method one of {METHODS}, got {name!r}, {method!r}"
        )
    from transformers.utils import logging as hf_logging

    import course

    hf_logging.set_verbosity_error()
    if name == "tiny":
        model, tokenizer = course.models.tiny_model(seed=seed), None
    else:
        model, tokenizer = course.models.load_model(device="cpu")
    model.train()
    if method == "full":
        return model, tokenizer
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A is drawn from torch's generator: the same on every rank
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    return model, tokenizer


def global_batches(
    tokenizer, *, steps: int, batch_size: int, seed: int = 0, max_len: int = 64
) -> list[list[dict]]:
    """`steps` global batches of tokenized examples (input_ids, labels), the same in every process.

    With a tokenizer: event_extraction training examples, cut to max_len tokens (a few CPU
    seconds per step). Without one (the tiny model): random tokens of varying length whose
    second half is labelled, so shards hold different numbers of answer tokens.
    """
    from course.data import IGNORE_INDEX, load_task, tokenize_for_training

    rng = random.Random(seed)
    if tokenizer is None:
        examples = []
        for _ in range(steps * batch_size):
            n = rng.randint(8, max_len)
            ids = [rng.randrange(3, 49152) for _ in range(n)]
            examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]})
    else:
        data = load_task("event_extraction", "train")
        order = rng.sample(range(len(data)), steps * batch_size)
        examples = []
        for i in order:
            ex = tokenize_for_training(tokenizer, data[i])
            examples.append(
                {k: v[-max_len:] for k, v in ex.items()}
            )  # keep the answer, cut the prompt's start
    return [examples[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def flat_trainable(model) -> torch.Tensor:
    """All trainable parameters of a (possibly wrapped, possibly sharded) model as one fp32 vector, by name."""
    named = dict(model.named_parameters())
    named = {k.removeprefix("module."): v for k, v in named.items() if v.requires_grad}
    parts = []
    for key in sorted(named):
        p = named[key].detach()
        if hasattr(p, "full_tensor"):  # an FSDP2 DTensor: gather its shards
            p = p.full_tensor()
        parts.append(p.reshape(-1).float())
    return torch.cat(parts)


def reference_run(
    model, batches: list[list[dict]], *, pad_id: int, lr: float = 1e-3
) -> tuple[torch.Tensor, list[float]]:
    """One process, whole global batches, AdamW: what every distributed mode must reproduce.

    Returns (flat trained parameters, loss per step). The loss is the mean over all answer
    tokens of the global batch, as the workers compute it.
    """
    from course.data import collate
    from course.data_parallel import summed_answer_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for batch in batches:
        loss_sum, count = summed_answer_loss(model, collate(batch, pad_id))
        (loss_sum / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum.item() / count)
    return flat_trainable(model), losses
