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

Worked example (tiny): n = 3 and the init text "hi there" with tokens [5, 9] gives the init
ids [5, 9, 5]; with the text "a b c d" (4 tokens) it is a ValueError.
"""

import torch
from torch import nn

from course.data import IGNORE_INDEX


def init_ids_from_text(tokenizer, text: str, num_virtual_tokens: int) -> list[int]:
    """The token ids that initialize the virtual tokens: the text's tokens, repeated to length n (as peft's TEXT init)."""
    if num_virtual_tokens <= 0:
        raise ValueError(
            f"num_virtual_tokens must be a positive number of soft tokens, got {num_virtual_tokens}"
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
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
            raise ValueError(
                f"num_virtual_tokens must be a positive integer (a soft prompt of zero tokens changes nothing), "
                f"got {num_virtual_tokens!r}"
            )
        if not hasattr(model, "get_input_embeddings"):
            raise TypeError(f"expected a transformers causal LM, got {type(model).__name__}")
        self.model = model
        self.model.requires_grad_(False)
        self.num_virtual_tokens = num_virtual_tokens
        self.token_dim = model.get_input_embeddings().embedding_dim  # d

    def prompts(self) -> torch.Tensor:  # (n, d)
        raise NotImplementedError

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
        batch = input_ids.shape[0]
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, T, d)
        if prompts is None:
            prompts = self.prompts().unsqueeze(0).expand(batch, -1, -1)  # (B, n, d)
        if prompts.shape != (batch, n, self.token_dim):
            raise ValueError(
                f"prompts must have shape {(batch, n, self.token_dim)}, got {tuple(prompts.shape)}"
            )
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
        """What a deployment stores: the (n, d) prompt itself (any encoder that produced it is dropped)."""
        return self.prompts().detach()


class PromptTuning(SoftPromptModel):
    """Lester et al. 2021: the prompt P is itself the trained parameter, `embedding.weight` (n, d) as in peft."""

    def __init__(self, model, num_virtual_tokens: int, init_ids: list[int] | None = None):
        super().__init__(model, num_virtual_tokens)
        self.embedding = nn.Embedding(num_virtual_tokens, self.token_dim)  # (n, d), peft's PromptEmbedding
        if init_ids is not None:
            if len(init_ids) != num_virtual_tokens:
                raise ValueError(
                    f"need {num_virtual_tokens} init ids, got {len(init_ids)} (use init_ids_from_text)"
                )
            words = model.get_input_embeddings().weight  # (V, d)
            with torch.no_grad():
                self.embedding.weight.copy_(words[torch.tensor(init_ids)].float())  # real words' embeddings

    def prompts(self) -> torch.Tensor:
        return self.embedding.weight  # (n, d)
