"""ZeRO by hand (Rajbhandari et al. 2020): shard the model states instead of replicating them.

Data parallelism keeps on every rank the parameters, their gradients and the optimizer
states. ZeRO's data-parallel stages keep one copy of each in total, 1/N on each rank:

- stage 1 (P_os): optimizer states sharded. Gradients are all-reduced as in DDP; each rank
  updates only its shard of the parameters and an all_gather brings the others' shards back.
- stage 2 (P_os+g): gradients sharded too. A reduce_scatter replaces the all_reduce: each
  rank receives only the summed gradient of its own shard (half an all-reduce's traffic).
- stage 3 (P_os+g+p): parameters sharded too. Before a forward pass all_gather assembles
  the full parameters; after the backward pass they are freed again. PyTorch's FSDP is this
  stage (Zhao et al. 2023), gathering one wrapped layer at a time instead of the whole model.

Paper, Sec. 3.1 and Fig. 1: with mixed-precision Adam a parameter costs 2 + 2 + K bytes
(fp16 weight, fp16 gradient, K = 12 bytes of fp32 master weight, momentum and variance);
per rank that is (2 + 2 + K) Ψ for DP, 4Ψ + KΨ/N for stage 1, 2Ψ + (2 + K)Ψ/N for stage 2
and (2 + 2 + K)Ψ/N for stage 3. Fig. 1's example, Ψ = 7.5 B on N = 64: 120, 31.4, 16.6 and
1.9 GB. Our CPU runs train fp32 weights with fp32 AdamW: 4 + 4 + 8 bytes.

`ZeroAdamW` shards a flat view of the trainable parameters (padded to a multiple of N) and
runs torch.optim.AdamW on its shard: AdamW is elementwise, so the shards' updates are the
full update, and the result equals data parallelism with AdamW up to summation order.
"""

import math

import torch
import torch.distributed as dist

from course.data_parallel import world
from course.memory import storage_bytes

STAGES = (1, 2, 3)
PAPER_OPTIMIZER_BYTES = 12  # K in the paper: fp32 master weights, momentum and variance (Sec. 3.1)


def model_state_bytes(
    num_params: int,
    world_size: int,
    stage: int,
    *,
    weight_bytes: float = 2,
    grad_bytes: float = 2,
    optimizer_bytes: float = PAPER_OPTIMIZER_BYTES,
) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer states one rank holds (stage 0 = DP).

    model_state_bytes(7.5e9, 64, 1) -> {"parameters": 15e9, "gradients": 15e9, "optimizer": 1.41e9}
    """
    if stage not in (0, *STAGES):
        raise ValueError(f"stage must be 0 (plain data parallelism), 1, 2 or 3, got {stage!r}")
    if world_size < 1 or num_params < 0:
        raise ValueError(f"need world_size >= 1 and num_params >= 0, got {world_size}, {num_params}")
    n = world_size
    return {
        "parameters": num_params * weight_bytes / (n if stage >= 3 else 1),
        "gradients": num_params * grad_bytes / (n if stage >= 2 else 1),
        "optimizer": num_params * optimizer_bytes / (n if stage >= 1 else 1),
    }


class ZeroAdamW:
    """AdamW over `params` with ZeRO stage 1, 2 or 3 across the process group.

    Per step: `gather_parameters()` (stage 3 only; a no-op otherwise), forward, backward,
    `step()`. `held_bytes()` measures what this rank keeps, from the tensors themselves.
    """

    def __init__(self, params, stage: int, lr: float = 1e-3, **adamw_kwargs):
        if stage not in STAGES:
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters to shard")
        self.stage = stage
        self.rank, self.world_size = world()
        self.numel = sum(p.numel() for p in self.params)
        self.shard_numel = math.ceil(self.numel / self.world_size)  # padded: every shard the same size
        self.shapes = [p.shape for p in self.params]
        full = torch.zeros(self.shard_numel * self.world_size, dtype=self.params[0].dtype)  # (N * shard,)
        full[: self.numel] = torch.cat([p.detach().reshape(-1) for p in self.params])
        lo = self.rank * self.shard_numel
        if stage == 3:  # the shard is all this rank keeps of the parameters
            self.shard = torch.nn.Parameter(full[lo : lo + self.shard_numel].clone())  # (shard,)
            self.full = None
        else:  # full replicas; the shard this rank updates is a view into its own replica
            self.full = full
            self.shard = torch.nn.Parameter(full[lo : lo + self.shard_numel])  # (shard,) a view
            self._set_parameters(full)
        self.optimizer = torch.optim.AdamW([self.shard], lr=lr, **adamw_kwargs)
        self.grad_shard: torch.Tensor | None = None
        if stage == 3:
            self._release_parameters()

    # --- collectives ---------------------------------------------------------------------
    def _all_gather(self, piece: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.shard_numel * self.world_size, dtype=piece.dtype)  # (N * shard,)
        if self.world_size > 1:
            dist.all_gather_single(out, piece)
        else:
            out.copy_(piece)
        return out

    def _flat_gradient(self) -> torch.Tensor:
        flat = torch.zeros(self.shard_numel * self.world_size, dtype=self.params[0].dtype)  # (N * shard,)
        for p, view in zip(self.params, self._views(flat), strict=True):
            if p.grad is not None:
                view.copy_(p.grad)
        return flat

    def _set_parameters(self, flat: torch.Tensor) -> None:
        for p, view in zip(self.params, self._views(flat), strict=True):
            p.data = view

    def _release_parameters(self) -> None:
        for p in self.params:
            p.data = torch.empty(0, dtype=p.dtype)  # stage 3: only the shard stays

    # --- the training step ---------------------------------------------------------------
    def gather_parameters(self) -> None:
        """Stage 3: all_gather the full parameters before the forward pass."""
        if self.stage == 3:
            self._set_parameters(self._all_gather(self.shard.detach()))

    def step(self) -> None:
        """Reduce the gradients (sharded from stage 2 on), update this rank's shard, share the result."""
        flat = self._flat_gradient()  # (N * shard,) this rank's full gradient
        lo = self.rank * self.shard_numel
        if self.stage == 1:
            if self.world_size > 1:
                dist.all_reduce(flat)
            flat /= self.world_size
            for p, g in zip(self.params, self._views(flat), strict=True):
                p.grad = g  # stage 1 keeps the full averaged gradient, as DDP does
            grad_shard = flat[lo : lo + self.shard_numel]
        else:
            grad_shard = torch.empty(self.shard_numel, dtype=flat.dtype)  # (shard,)
            if self.world_size > 1:
                dist.reduce_scatter_single(grad_shard, flat)
            else:
                grad_shard.copy_(flat)
            grad_shard /= self.world_size
            for p in self.params:
                p.grad = None  # the full gradient is freed; only the shard's sum stays
            del flat
        self.grad_shard = grad_shard
        self.shard.grad = grad_shard
        self.optimizer.step()
        if self.stage == 3:
            self._release_parameters()  # the gathered copy goes; the next forward gathers again
        else:
            with torch.no_grad():
                self.full.copy_(self._all_gather(self.shard.detach()))  # everyone's updated shards

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for shape in self.shapes:
            out.append(flat[offset : offset + math.prod(shape)].view(shape))
            offset += math.prod(shape)
        return out

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.grad_shard = None
        self.shard.grad = None

    def full_parameters(self) -> list[torch.Tensor]:
        """The full trained parameters (an all_gather; for checking, not for training)."""
        return [v.clone() for v in self._views(self._all_gather(self.shard.detach()))]

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds right after `step()`: parameters, gradients, optimizer states."""
        params = [self.shard.data] if self.stage == 3 else [self.full]
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.stage >= 2 and self.grad_shard is not None:
            grads = [self.grad_shard]
        states = [t for s in self.optimizer.state.values() for t in s.values() if t.dim() > 0]
        return {
            "parameters": storage_bytes(params),
            "gradients": storage_bytes(grads),
            "optimizer": storage_bytes(states),
        }
