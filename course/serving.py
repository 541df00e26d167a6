"""One base model, many tenants: serving several LoRA adapters side by side.

A LoRA adapter is a few MB beside a base model of hundreds of MB (the LoRA paper's GPT-3
checkpoint: 35 MB instead of 350 GB). So a service for N customers ("tenants") keeps one
frozen base model in memory and N adapters, instead of N fine-tuned copies. Two ways to
answer a batch of requests from different tenants:

- hot-swap: group the requests by tenant, activate one adapter at a time
  (`set_adapter`), run each group as its own batch, put the answers back in request order;
- mixed batch: one batch for everyone, each row with its own adapter. In every adapted
  layer the base product W0 x runs once for the whole batch, and each adapter's small
  product B_t A_t x only on its own rows:

      h[i] = W0 x[i] + scaling_t * B_t A_t x[i]      t = tenant of row i,  no term for "__base__"

  `mixed_lora_linear` writes this by hand; peft does the same inside
  `LoraLayer._mixed_batch_forward` when `forward`/`generate` get `adapter_names=[...]`.

`AdapterServer` is the teaching-sized version of such a service on top of peft: tenants
are added from adapter folders (`save_pretrained` output), requests are `(tenant, prompt)`
pairs, and a request for a tenant the server does not know is refused before anything
runs (it never falls back to the base model or to another tenant's adapter). Production
servers (S-LoRA, LoRAX, vLLM's multi-LoRA) add adapter paging, batching queues and
custom kernels; that machinery belongs there, not here.
"""

from pathlib import Path

import torch

from course.train import generate_greedy, left_padded

BASE = "__base__"  # peft's name for "no adapter" in `adapter_names`


def check_tenants(tenants: list[str], known) -> None:
    """ValueError naming every unknown tenant and the known ones; BASE is always known."""
    known = list(known)
    unknown = sorted({t for t in tenants if t != BASE and t not in known})
    if unknown:
        raise ValueError(
            f"unknown tenant(s) {', '.join(map(repr, unknown))}: this server knows "
            f"{', '.join(map(repr, known)) or 'no tenants yet'} (and {BASE!r} for the base model). "
            "No request was run: add the tenant with add_tenant(name, path) or fix the name."
        )


def group_by_tenant(tenants: list[str], known) -> dict[str, list[int]]:
    """The request indices of each tenant, tenants in order of first appearance.

    This is the routing a hot-swapping server needs: one batch per group, one adapter switch
    per group. Unknown tenants raise ValueError (`check_tenants`) before any grouping.

        >>> group_by_tenant(["a", "b", "a", "__base__"], known=["a", "b"])
        {'a': [0, 2], 'b': [1], '__base__': [3]}
    """
    check_tenants(tenants, known)
    groups: dict[str, list[int]] = {}
    for index, tenant in enumerate(tenants):
        groups.setdefault(tenant, []).append(index)
    return groups


def mixed_lora_linear(
    x: torch.Tensor,
    base: torch.nn.Linear,
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    adapter_names: list[str],
) -> torch.Tensor:
    """A linear layer in which each row of the batch uses its own LoRA adapter (or none).

    x: (B, ..., in); adapters[name] = (A (r, in), B (out, r), scaling); adapter_names: one per
    row, BASE for "no adapter". The base product runs once on the whole batch; each adapter's
    low-rank product only on the rows that asked for it, so one tenant's A and B never touch
    another tenant's rows.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != base.in_features:
        raise ValueError(
            f"x must be a (B, ..., in_features={base.in_features}) tensor, got {getattr(x, 'shape', x)!r}"
        )
    for name, (A, B, _) in adapters.items():
        if A.shape[1] != base.in_features or B.shape[0] != base.out_features or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"adapter {name!r}: expected A (r, {base.in_features}) and B ({base.out_features}, r), "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
    if len(adapter_names) != x.shape[0]:
        raise ValueError(f"one adapter name per row: got {len(adapter_names)} names for {x.shape[0]} rows")
    check_tenants(adapter_names, adapters)
    result = base(x)  # (B, ..., out): W0 x + b for every row
    for name, rows in group_by_tenant(adapter_names, adapters).items():
        if name == BASE:
            continue
        A, B, scaling = adapters[name]
        sub_batch = x[rows]  # (b_t, ..., in): only this tenant's rows
        result[rows] = result[rows] + (sub_batch @ A.T @ B.T) * scaling  # (b_t, ..., r) -> (b_t, ..., out)
    return result


class AdapterServer:
    """One frozen base model serving many tenants' LoRA adapters through peft.

    The server takes the base model over: peft injects the adapters into its layers, so use
    the server (or `with server.model.disable_adapter():`) to get the base model's answers.
    Generation is greedy; prompts are complete model inputs (e.g. `course.data.format_prompt`).
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 32):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a causal LM), got {type(model).__name__}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self.base_model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.model = None  # a peft.PeftModel, created with the first tenant

    @property
    def tenants(self) -> list[str]:
        return [] if self.model is None else list(self.model.peft_config)

    def add_tenant(self, name: str, path: str | Path) -> None:
        """Load the adapter saved in folder `path` (peft's `save_pretrained`) as tenant `name`."""
        from peft import PeftConfig, PeftModel

        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"a tenant name is a non-empty string other than {BASE!r}, got {name!r}")
        if name in self.tenants:
            raise ValueError(f"tenant {name!r} already exists; pick another name")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"{path} is not an adapter folder (no adapter_config.json from save_pretrained)")
        if getattr(PeftConfig.from_pretrained(str(path)), "use_dora", False):
            raise ValueError(f"tenant {name!r}: a DoRA adapter cannot share a mixed batch (peft refuses it)")
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base_model, str(path), adapter_name=name)
        else:
            self.model.load_adapter(str(path), adapter_name=name)
        self.model.eval()

    def adapter_bytes(self, name: str) -> int:
        """Memory of one tenant's adapter weights (its lora_A and lora_B of every layer)."""
        check_tenants([name], self.tenants)
        return sum(
            p.numel() * p.element_size()
            for n, p in self.model.named_parameters()
            if f".{name}." in n and ".lora_" in n
        )

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded (B, T) input_ids and attention_mask: every prompt ends where generation continues."""
        model = self.model if self.model is not None else self.base_model
        return left_padded(self.tokenizer, prompts, next(model.parameters()).device)

    def _generate(self, enc: dict[str, torch.Tensor], max_new_tokens: int | None, **kwargs) -> list[str]:
        """Greedy answers for an encoded batch (decoded, without the prompt)."""
        model = self.model if self.model is not None else self.base_model
        return generate_greedy(model, self.tokenizer, enc, max_new_tokens or self.max_new_tokens, **kwargs)

    def _split(self, requests: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
        if not requests:
            raise ValueError("no requests: give a list of (tenant, prompt) pairs")
        tenants, prompts = zip(*requests, strict=True)
        check_tenants(list(tenants), self.tenants)
        return list(tenants), list(prompts)

    def generate(self, requests: list[tuple[str, str]], *, max_new_tokens: int | None = None) -> list[str]:
        """Mixed batch: all requests in one batch, each row with its tenant's adapter."""
        tenants, prompts = self._split(requests)
        enc = self._encode(prompts)
        if self.model is None:  # no adapters yet: every request is for the base model
            return self._generate(enc, max_new_tokens)
        return self._generate(enc, max_new_tokens, adapter_names=tenants)

    def generate_swapping(
        self, requests: list[tuple[str, str]], *, max_new_tokens: int | None = None
    ) -> list[str]:
        """Hot-swap: one batch per tenant (`set_adapter`), answers returned in request order.

        The prompts are padded together once and each group takes its rows, so a group's rows
        are exactly the rows the mixed batch would get: the two ways then differ only in
        which adapter touches which row, which is what comparing them should test.
        """
        tenants, prompts = self._split(requests)
        enc = self._encode(prompts)  # (B, T) for all requests
        answers: list[str] = [""] * len(requests)
        for tenant, rows in group_by_tenant(tenants, self.tenants).items():
            group = {key: value[rows] for key, value in enc.items()}  # (b_t, T): this tenant's rows
            if tenant == BASE and self.model is not None:
                with self.model.disable_adapter():
                    group_answers = self._generate(group, max_new_tokens)
            else:
                if tenant != BASE:
                    self.model.set_adapter(tenant, inference_mode=True)
                group_answers = self._generate(group, max_new_tokens)
            for i, answer in zip(rows, group_answers, strict=True):
                answers[i] = answer
        return answers
