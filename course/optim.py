"""Optimizer memory: Adam with 8-bit states by hand, what a state really costs, and paging.

Adam keeps two fp32 moments per trainable parameter (m and v: 8 bytes), twice the weights
themselves in fp32. Dettmers et al. (2022, "8-bit Optimizers via Block-wise Quantization")
store both moments in 8 bits: blocks of 256 values, one fp32 `absmax` per block, and the
"dynamic" code (`course.quant.dynamic_code`), signed for m, unsigned for v (v >= 0). Each
step dequantizes, does the ordinary AdamW update in fp32, and quantizes again; the state
costs 2 + 2 * 4/256 bytes per parameter instead of 8.

QLoRA (Dettmers et al. 2023, Sec. 3) adds *paged optimizers*: the states live in NVIDIA
unified memory, so when a long batch's activations need the room, the driver evicts state
pages to CPU RAM instead of failing, and pages them back for the optimizer update.
`PagingSimulator` replays a recorded memory trace through that mechanism, on any machine.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from course.memory import saved_tensor_bytes, storage_bytes
from course.quant import State8bit, dequantize_blockwise_8bit, dynamic_code, quantize_blockwise_8bit

BLOCKSIZE = 256  # bitsandbytes' blockwise optimizer kernels: 256 values per absmax
MIN_8BIT_SIZE = 4096  # bitsandbytes' `min_8bit_size`: smaller tensors keep fp32 states
STATE_8BIT_KEYS = ("m_absmax", "m_code", "v_absmax", "v_code")  # beside the uint8 m and v
# PCIe 4.0 x16: 16 GT/s per lane x 16 lanes x 128/130 encoding = 31.5 GB/s per direction, the
# theoretical peak between a GPU and host RAM (PCI-SIG, PCIe 4.0 spec). Real transfers reach less.
PCIE4_X16_BYTES_PER_S = 16e9 * 16 * (128 / 130) / 8
PAGE_BYTES = 2 * 2**20  # our default page: 2 MiB, the large-page size of x86-64 and of CUDA's allocator


# --- 8-bit Adam ---------------------------------------------------------------------------


class Adam8bit(torch.optim.Optimizer):
    """AdamW whose moments m (signed dynamic map) and v (unsigned) are stored blockwise in 8 bits.

    The update is bitsandbytes' CPU `AdamW8bit` kernel, operation for operation (Loshchilov &
    Hutter's decoupled weight decay, Kingma & Ba's bias correction):

        m = beta1 m + (1 - beta1) g                    v = beta2 v + (1 - beta2) g^2
        p = p (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    with m and v dequantized before and quantized after. Parameters with fewer than
    `min_8bit_size` elements keep fp32 states, as in bitsandbytes: their absmax and code would
    cost more than they save. `emulate_cpu_lut=True` rounds through bitsandbytes' CPU lookup
    table instead of to the exact nearest code (see `course.quant.quantize_blockwise_8bit`).

    `state_dict()` / `load_state_dict()` round-trip the states exactly, in their own dtypes
    (uint8 codes, fp32 absmax and fp32 moments), as bitsandbytes' optimizers do: torch's
    `Optimizer.load_state_dict` would cast every state tensor to its parameter's dtype.
    A step whose gradients hold NaN or inf is refused before any parameter or state changes.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        min_8bit_size: int = MIN_8BIT_SIZE,
        emulate_cpu_lut: bool = False,
    ):
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not (number(lr) and 0 <= lr < math.inf):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(number(b) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999); got {betas!r}")
        if not all(number(x) and 0 <= x < math.inf for x in (eps, weight_decay)):  # NaN fails too
            raise ValueError(
                f"eps and weight_decay must be finite numbers >= 0, got eps={eps!r}, weight_decay={weight_decay!r}"
            )
        if not isinstance(min_8bit_size, int) or isinstance(min_8bit_size, bool) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.emulate_cpu_lut = emulate_cpu_lut
        self.code_m, self.code_v = dynamic_code(signed=True), dynamic_code(signed=False)  # (256,) each

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        if p.numel() < self.min_8bit_size:
            state["m"] = torch.zeros_like(p, dtype=torch.float32)
            state["v"] = torch.zeros_like(p, dtype=torch.float32)
            return
        n_blocks = math.ceil(p.numel() / BLOCKSIZE)
        for name, code in (("m", self.code_m), ("v", self.code_v)):
            # Index 0 with absmax 0 dequantizes to 0 whatever the code: a zero moment, as in bitsandbytes.
            state[name] = torch.zeros_like(p, dtype=torch.uint8)
            state[f"{name}_absmax"] = torch.zeros(n_blocks, dtype=torch.float32, device=p.device)
            state[f"{name}_code"] = code.to(p.device)  # shared by every parameter: stored once

    def _load(self, state: dict, name: str) -> torch.Tensor:
        """The moment `name` in fp32 (a fresh tensor for 8-bit states, the state itself otherwise)."""
        if state[name].dtype == torch.float32:
            return state[name]
        quant_state = State8bit(state[f"{name}_absmax"], state[f"{name}_code"], BLOCKSIZE)
        return dequantize_blockwise_8bit(state[name], quant_state)

    def _store(self, state: dict, name: str, value: torch.Tensor) -> None:
        if state[name].dtype == torch.float32:
            return  # updated in place
        q, quant_state = quantize_blockwise_8bit(
            value, state[f"{name}_code"], BLOCKSIZE, self.emulate_cpu_lut
        )
        state[name], state[f"{name}_absmax"] = q, quant_state.absmax

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()` exactly: every state tensor keeps its saved dtype (copied onto p's device)."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("expected the dict of Adam8bit.state_dict() (keys 'state' and 'param_groups')")
        for index, state in state_dict["state"].items():
            m = state.get("m") if isinstance(state, dict) else None
            eight_bit = isinstance(m, torch.Tensor) and m.dtype == torch.uint8
            if (
                m is None
                or not {"step", "v"} <= set(state)
                or (eight_bit and not set(STATE_8BIT_KEYS) <= set(state))
            ):
                raise ValueError(
                    f"state of parameter {index} is not an Adam8bit state: expected keys step, m, v "
                    f"(and {', '.join(STATE_8BIT_KEYS)} for 8-bit states), got {sorted(state)}"
                )
        # saved parameter ids -> this optimizer's parameters, group by group, as torch matches them
        params = {
            saved_id: p
            for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=False)
            for saved_id, p in zip(saved["params"], group["params"], strict=False)
        }
        super().load_state_dict(state_dict)  # param groups (lr, betas, ...); refuses other group sizes
        for saved_id, state in state_dict["state"].items():
            p = params[saved_id]
            restored = {
                key: value.to(p.device, copy=True) if isinstance(value, torch.Tensor) else value
                for key, value in state.items()
            }  # each tensor in its saved dtype, never cast to p's
            for name, code in (("m_code", self.code_m), ("v_code", self.code_v)):
                if name in restored and torch.equal(restored[name], code.to(p.device)):
                    restored[name] = code.to(p.device)  # the shared code again, stored once
            self.state[p] = restored

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every gradient before touching anything: a refused step leaves parameters and states as they were.
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    raise ValueError(
                        f"a gradient holds NaN or inf (parameter of shape {tuple(p.shape)}): step refused, "
                        "nothing was updated. Lower the learning rate or find the overflow (e.g. fp16 loss scaling)."
                    )
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                t = state["step"]
                m, v = self._load(state, "m"), self._load(state, "v")  # fp32, p's shape
                g = p.grad.float()
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                correction1, correction2 = 1 - beta1**t, math.sqrt(1 - beta2**t)
                p32 = p.float()  # p itself when p is fp32
                if wd > 0:
                    p32.mul_(1 - lr * wd)
                if state["m"].dtype == torch.uint8:
                    denom = (v.sqrt() / correction2).add_(eps)
                    p32.addcdiv_(m, denom, value=-lr / correction1)
                else:  # the same formula, rounded as bitsandbytes' 32-bit kernel orders it
                    p32.add_(m / (v.sqrt() + eps * correction2), alpha=-lr * correction2 / correction1)
                if p32 is not p:
                    p.copy_(p32)
                self._store(state, "m", m)
                self._store(state, "v", v)
        return loss


def record_update_error(opt: torch.optim.Optimizer, emulate_cpu_lut: bool = False) -> list[float]:
    """Watch an fp32 Adam(W) run: how much would 8-bit states change each step's update?

    Before every step, a hook takes the fp32 states m, v (torch's `exp_avg`, `exp_avg_sq`) and
    the fresh gradient g, and computes the update direction u = m_hat / (sqrt(v_hat) + eps) twice:
    from the states as they are, and from the states after one 8-bit round trip (blockwise,
    dynamic maps, tensors of at least `MIN_8BIT_SIZE` elements), as `Adam8bit` would hold them.
    It appends rho_t = ||u_8bit - u|| / ||u|| to the returned list. Adam normalizes every
    element's step, so a small state's relative error counts as much as a large one's: this is
    the relative error that matters, not that of m or v themselves. Summed over the steps
    (triangle inequality), an 8-bit run stays within max_t rho_t x (the fp32 run's path length)
    of the fp32 run, to first order.
    """
    code_m, code_v = dynamic_code(signed=True), dynamic_code(signed=False)
    errors: list[float] = []

    def round_trip(x, code):
        return dequantize_blockwise_8bit(*quantize_blockwise_8bit(x, code, BLOCKSIZE, emulate_cpu_lut))

    @torch.no_grad()
    def hook(optimizer, args, kwargs):
        diff = norm = 0.0
        for group in optimizer.param_groups:
            (beta1, beta2), eps = group["betas"], group["eps"]
            for p in group["params"]:
                state = optimizer.state.get(p)
                if p.grad is None or p.numel() < MIN_8BIT_SIZE or not state:
                    continue  # fp32 states, or the first step (zero states round-trip exactly)
                t = float(state["step"]) + 1
                correction1, correction2 = 1 - beta1**t, math.sqrt(1 - beta2**t)
                g = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                mq, vq = round_trip(m, code_m), round_trip(v, code_v)
                u, uq = (
                    ((beta1 * mm + (1 - beta1) * g) / correction1)
                    / ((beta2 * vv + (1 - beta2) * g * g).sqrt() / correction2 + eps)
                    for mm, vv in ((m, v), (mq, vq))
                )  # the next update's direction from exact and from round-tripped states
                diff += float((uq - u).norm() ** 2)
                norm += float(u.norm() ** 2)
        errors.append(math.sqrt(diff / norm) if norm else 0.0)

    opt.register_step_pre_hook(hook)
    return errors


def _tensors(value):
    """Every tensor inside a state value (tensors, dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes that an optimizer's state occupies: every tensor's storage, each storage once.

    Works for any `torch.optim.Optimizer` (torch's AdamW, bitsandbytes' optimizers, `Adam8bit`):
    it walks `opt.state`, so it counts what is really allocated, quantization constants (absmax)
    and code tables included; a code shared by all parameters counts once. Python numbers (a
    step counter kept as an int) are not tensor storage and count nothing.
    """
    if not isinstance(opt, torch.optim.Optimizer):
        raise ValueError(f"expected a torch.optim.Optimizer, got {type(opt).__name__}")
    return storage_bytes(tensor for state in opt.state.values() for tensor in _tensors(state))


# --- paged optimizers, simulated ------------------------------------------------------------


class TracedModel(torch.nn.Module):
    """Wraps a model so that every forward pass records its activation bytes: a memory trace.

    Pass it to `course.train.train` in place of the model: each training step's forward then
    logs what autograd saves for the backward pass (`course.memory.saved_tensor_bytes`, the
    weights excluded) and the batch shape, at the real sequence lengths of the real batches.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.activation_bytes: list[int] = []  # one entry per forward pass
        self.batch_shapes: list[tuple[int, int]] = []  # (batch, padded length)

    def forward(self, **inputs):
        weights = list(self.model.parameters())
        out, nbytes = saved_tensor_bytes(lambda: self.model(**inputs), exclude=weights)
        self.activation_bytes.append(nbytes)
        self.batch_shapes.append(tuple(inputs["input_ids"].shape))
        return out


class DeviceOutOfMemoryError(MemoryError):
    """The simulated device cannot hold what a step needs (like `torch.cuda.OutOfMemoryError`)."""


@dataclass
class Event:
    """One phase of one step in the timeline of `PagingSimulator.replay`."""

    step: int
    phase: str  # "forward+backward" (activations live) or "optimizer update" (all pages needed)
    device_bytes: int  # resident + pages on the device + activations
    activation_bytes: int
    pages_on_device: int
    bytes_to_host: int  # moved during this phase
    bytes_to_device: int


class PagingSimulator:
    """A device of `budget_bytes` holding fixed tensors, activations and optimizer-state pages.

    `resident_bytes` never move (weights, gradients). The optimizer state (`state_tensors`, real
    tensors) is cut into pages of `page_bytes`; each page holds a copy of those bytes. Each step
    of a trace has two phases, as in training:

    1. forward+backward: the step's activations must fit. With `paging=True` the least recently
       used pages are evicted to host memory until they do (what unified memory does when the
       GPU runs out); without paging the step raises `DeviceOutOfMemoryError`.
    2. optimizer update: the activations are freed and every page is touched in order; a page on
       the host is paged back first (evicting the least recently used ones if it must).

    Moving a page copies its bytes, so `state_bytes()` proves that nothing was lost. Transfer
    time is bytes / `bandwidth` (default PCIe 4.0 x16, theoretical; no latency, no overlap
    with compute: a lower bound on what a real GPU pays).
    """

    def __init__(
        self,
        budget_bytes: int,
        resident_bytes: int,
        state_tensors,
        *,
        page_bytes: int = PAGE_BYTES,
        paging: bool = True,
        bandwidth: float = PCIE4_X16_BYTES_PER_S,
    ):
        if page_bytes <= 0 or budget_bytes <= 0 or bandwidth <= 0:
            raise ValueError(
                f"budget_bytes, page_bytes and bandwidth must be positive, got {budget_bytes}, {page_bytes}, {bandwidth}"
            )
        if page_bytes > budget_bytes:
            raise ValueError(
                f"page_bytes ({page_bytes:,}) is larger than the device budget ({budget_bytes:,}): "
                "a single page could never be on the device; use smaller pages"
            )
        if not 0 <= resident_bytes <= budget_bytes:
            raise ValueError(
                f"resident_bytes must be in [0, budget_bytes={budget_bytes:,}], got {resident_bytes:,}"
            )
        tensors = list(state_tensors)
        if not tensors:
            raise ValueError("state_tensors is empty: there is nothing to page")
        data = torch.cat([t.detach().reshape(-1).contiguous().view(torch.uint8).cpu() for t in tensors])
        self.budget, self.resident, self.page_bytes = budget_bytes, resident_bytes, page_bytes
        self.paging, self.bandwidth = paging, bandwidth
        self.n_bytes = data.numel()
        # device: page id -> bytes, least recently used first; host: page id -> bytes
        self.device: OrderedDict[int, torch.Tensor] = OrderedDict(
            (i, chunk.clone()) for i, chunk in enumerate(data.split(page_bytes))
        )
        self.host: dict[int, torch.Tensor] = {}
        self.n_pages = len(self.device)
        self.to_host_bytes = self.to_device_bytes = 0
        if resident_bytes + self.n_bytes > budget_bytes and not paging:
            raise DeviceOutOfMemoryError(
                f"weights ({resident_bytes:,} B) and optimizer state ({self.n_bytes:,} B) exceed "
                f"the budget ({budget_bytes:,} B) before the first step"
            )

    def _pages_bytes(self) -> int:
        return sum(page.numel() for page in self.device.values())

    def _evict_lru(self) -> int:
        page_id, page = self.device.popitem(last=False)
        self.host[page_id] = page.clone()  # device -> host copy
        self.to_host_bytes += page.numel()
        return page.numel()

    def _make_room(self, needed: int, step: int, what: str) -> None:
        while self.resident + self._pages_bytes() + needed > self.budget:
            if not self.paging:
                raise DeviceOutOfMemoryError(
                    f"step {step}: {what} needs {needed:,} B more but only "
                    f"{self.budget - self.resident - self._pages_bytes():,} B are free "
                    f"(budget {self.budget:,} B, no paging)"
                )
            if not self.device:
                raise DeviceOutOfMemoryError(
                    f"step {step}: {what} needs {needed:,} B but even with every page on the host only "
                    f"{self.budget - self.resident:,} B are free (budget {self.budget:,} B)"
                )
            self._evict_lru()

    def _touch(self, page_id: int, step: int) -> None:
        if page_id in self.device:
            self.device.move_to_end(page_id)  # most recently used
            return
        size = self.host[page_id].numel()
        self._make_room(size, step, f"paging in state page {page_id}")
        self.device[page_id] = self.host.pop(page_id).clone()  # host -> device copy
        self.to_device_bytes += size

    def _event(self, step, phase, activations, moved_before) -> Event:
        return Event(
            step,
            phase,
            self.resident + self._pages_bytes() + activations,
            activations,
            len(self.device),
            self.to_host_bytes - moved_before[0],
            self.to_device_bytes - moved_before[1],
        )

    def replay(self, activation_bytes) -> list[Event]:
        """Run the trace (activation bytes per step); returns the timeline, two events per step."""
        trace = [int(a) for a in activation_bytes]
        if not trace or min(trace) < 0:
            raise ValueError(
                f"the trace must be a non-empty list of activation sizes >= 0 bytes, got {trace[:8]}"
            )
        events = []
        for step, activations in enumerate(trace):
            before = (self.to_host_bytes, self.to_device_bytes)
            self._make_room(activations, step, "forward+backward")
            events.append(self._event(step, "forward+backward", activations, before))
            before = (self.to_host_bytes, self.to_device_bytes)
            for page_id in range(self.n_pages):
                self._touch(page_id, step)
            events.append(self._event(step, "optimizer update", 0, before))
        return events

    def state_bytes(self) -> torch.Tensor:
        """All state bytes in their original order, gathered from wherever each page is now."""
        return torch.cat([self.device[i] if i in self.device else self.host[i] for i in range(self.n_pages)])

    @property
    def transfer_seconds(self) -> float:
        """Simulated time spent moving pages, both directions, at `bandwidth`."""
        return (self.to_host_bytes + self.to_device_bytes) / self.bandwidth
