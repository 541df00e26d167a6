"""Prompt tuning (Lester et al. 2021): a few trained "virtual token" embeddings in front of the input.

The model stays frozen, weights and vocabulary alike. What trains is a matrix P of n rows, each a
vector in the model's embedding space (d = 576 for SmolLM2), prepended to the embedded input:

    x = [P ; E(input_ids)]          (B, n + T, d)

so every layer attends to the n soft tokens as if they were words, although no word has their
embedding. Lester et al. (section 3.2) initialize P from the embeddings of real tokens; peft's
`prompt_tuning_init="TEXT"` takes the tokens of an init text and repeats them until n rows are
filled. `init_ids_from_text` does the same, and refuses a text that has more tokens than there
are virtual tokens (peft silently cuts it; a prompt that is not what you wrote is a surprise).

`SoftPromptModel` is the part every soft-prompt method shares (P-tuning builds on it): given
prompts of shape (B, n, d), extend the attention mask with n ones, the labels with n ignored
positions, a boolean `logits_to_keep` mask with n False, and return the logits of the real
positions only, so the rest of the course (course.train, teacher-forced exact match) sees a
model whose logits line up with its input_ids.

Because the prompt is an input, different rows of a batch can carry different tenants' prompts:
`forward(..., prompts=...)` takes a (B, n, d) stack, one prompt per row (a mixed batch).

Precision, as peft: the prompt (and any encoder) stays fp32 beside an fp16/bf16 model, on the
model's device; it is cast to the model's embedding dtype only where it joins the input, so in
fp32, fp16 and bf16 the logits equal peft's bit for bit (the tests check all three).

Worked example (tiny): n = 3 and the init text "hi there" with tokens [5, 9] gives the init
ids [5, 9, 5]; with the text "a b c d" (4 tokens) it is a ValueError.
"""

import torch
from torch import nn

from course.data import IGNORE_INDEX
from course.lora import refuse_non_finite


def _describe(x) -> str:
    return f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def refuse_soft_prompt_model(model, method: str) -> None:
    """ValueError if `model` is already one of our soft-prompt or prefix wrappers (e.g. a re-run cell)."""
    n = getattr(model, "num_virtual_tokens", None)
    if isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module) and _is_count(n):
        raise ValueError(
            f"the model is already a {type(model).__name__} with {n} virtual tokens (re-running the cell wraps "
            f"it twice): train it as it is, or give {method} its frozen base model, `model.model`, "
            "or a fresh copy of the base model"
        )


def init_ids_from_text(tokenizer, text: str, num_virtual_tokens: int) -> list[int]:
    """The token ids that initialize the virtual tokens: the text's tokens, repeated to length n (as peft's TEXT init)."""
    if not _is_count(num_virtual_tokens):
        raise ValueError(
            f"num_virtual_tokens must be a positive number of soft tokens, got {num_virtual_tokens!r}"
        )
    ids = tokenizer(text)[
        "input_ids"
    ]  # what peft's PromptEmbedding tokenizes (special tokens as the tokenizer adds)
    if not ids:
        raise ValueError("the init text has no tokens; give a few words that describe the task")
    if len(ids) > num_virtual_tokens:
        raise ValueError(
            f"the init text has {len(ids)} tokens but there are only {num_virtual_tokens} virtual tokens: "
            "shorten the text or raise num_virtual_tokens (peft would silently cut the text)"
        )
    repeats = -(-num_virtual_tokens // len(ids))  # ceil
    return (ids * repeats)[:num_virtual_tokens]


class SoftPromptModel(nn.Module):
    """A frozen causal LM that reads `prompts()` (n, d) in front of every input. Subclasses define `prompts`."""

    def __init__(self, model, num_virtual_tokens: int):
        super().__init__()
        self.check_arguments(model, num_virtual_tokens)
        self.model = model
        self.model.requires_grad_(False)
        self.num_virtual_tokens = num_virtual_tokens
        self.token_dim = model.get_input_embeddings().embedding_dim  # d

    @staticmethod
    def check_arguments(model, num_virtual_tokens) -> None:
        """The checks at the door, before anything is built or frozen (subclasses call it first)."""
        if not _is_count(num_virtual_tokens):
            raise ValueError(
                f"num_virtual_tokens must be a positive integer (a soft prompt of zero tokens changes nothing), "
                f"got {num_virtual_tokens!r}"
            )
        refuse_soft_prompt_model(model, "a soft prompt")
        if not hasattr(model, "get_input_embeddings"):
            raise TypeError(f"expected a transformers causal LM, got {type(model).__name__}")

    def prompts(self) -> torch.Tensor:  # (n, d)
        raise NotImplementedError

    @property
    def model_device(self) -> torch.device:
        """Where the frozen model's embeddings live: the prompt's parameters are created there too."""
        return self.model.get_input_embeddings().weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prompts: torch.Tensor | None = None,
    ):
        """Logits (and loss) of the real positions. prompts: (B, n, d) per row; default self.prompts() for all."""
        n = self.num_virtual_tokens
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
            raise TypeError(
                f"input_ids must be an integer tensor of token ids (B, T), got {_describe(input_ids)}: "
                "pass the tokenizer's input_ids (embeddings go in through `prompts`)"
            )
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        batch = input_ids.shape[0]
        if prompts is None:
            prompts = self.prompts().unsqueeze(0).expand(batch, -1, -1)  # (B, n, d)
        if not isinstance(prompts, torch.Tensor) or not prompts.is_floating_point():
            raise TypeError(f"prompts must be a floating-point tensor (B, n, d), got {_describe(prompts)}")
        if prompts.shape != (batch, n, self.token_dim):
            raise ValueError(
                f"prompts must have shape {(batch, n, self.token_dim)}, got {tuple(prompts.shape)}"
            )
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, T, d)
        embeds = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)  # (B, n + T, d)
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, n)
            attention_mask = torch.cat([ones, attention_mask], dim=1)  # (B, n + T)
        keep = logits_to_keep
        if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.ndim == 2:
            keep = torch.cat([keep.new_zeros(batch, n), keep], dim=1)  # (B, n + T): no logits at soft tokens
        elif keep != 0:
            raise ValueError("logits_to_keep must be 0 (all) or a boolean (B, T) mask")
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)  # (B, n + T)
        out = self.model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, logits_to_keep=keep
        )
        if not isinstance(keep, torch.Tensor):
            out.logits = out.logits[:, n:]  # (B, T, V): the positions of input_ids
        return out

    def soft_prompt(self) -> torch.Tensor:
        """What a deployment stores: the (n, d) prompt itself (any encoder that produced it is dropped).

        Like a merge, it folds the trained parts into what is kept, so a prompt holding NaN or inf
        is refused with a ValueError rather than stored; so is one that the model's dtype cannot
        hold (above fp16's 65,504), which would turn into inf where it joins the input embeddings.
        It is kept in fp32, as peft stores it.
        """
        prompt = self.prompts().detach()  # (n, d), fp32
        dtype = self.model.get_input_embeddings().weight.dtype
        causes = f"training diverged, a NaN was loaded, or a value overflows the model's {dtype}"
        refuse_non_finite(prompt.to(dtype), "the soft prompt", causes, unchanged="nothing stored")
        return prompt


class PromptTuning(SoftPromptModel):
    """Lester et al. 2021: the prompt P is itself the trained parameter, `embedding.weight` (n, d) as in peft."""

    def __init__(self, model, num_virtual_tokens: int, init_ids: list[int] | None = None):
        self.check_arguments(model, num_virtual_tokens)
        if init_ids is not None:
            _check_init_ids(init_ids, num_virtual_tokens, model.get_input_embeddings().num_embeddings)
        super().__init__(model, num_virtual_tokens)
        # (n, d) fp32 on the model's device, peft's PromptEmbedding
        self.embedding = nn.Embedding(num_virtual_tokens, self.token_dim, device=self.model_device)
        if init_ids is not None:
            words = model.get_input_embeddings().weight  # (V, d)
            with torch.no_grad():
                ids = torch.tensor(init_ids, device=words.device)
                self.embedding.weight.copy_(words[ids].float())  # real words' embeddings

    def prompts(self) -> torch.Tensor:
        return self.embedding.weight  # (n, d)


def _check_init_ids(init_ids, num_virtual_tokens: int, vocab_size: int) -> None:
    if not isinstance(init_ids, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in init_ids
    ):
        raise TypeError(
            f"init_ids must be a list of token ids (ints), got {init_ids!r:.60}: use init_ids_from_text"
        )
    if len(init_ids) != num_virtual_tokens:
        raise ValueError(f"need {num_virtual_tokens} init ids, got {len(init_ids)} (use init_ids_from_text)")
    if not all(0 <= i < vocab_size for i in init_ids):
        raise ValueError(
            f"init ids must be token ids in 0..{vocab_size - 1} (the model's vocabulary), got {init_ids}: "
            "use the tokenizer of this model (init_ids_from_text)"
        )
