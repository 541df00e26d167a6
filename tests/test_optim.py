"""course.optim: 8-bit Adam against bitsandbytes and torch, state bytes, the paging simulator.

Tolerance (derived in notebook 06 the same way). Two runs from the same start on the same data
differ only through the 8-bit rounding of m and v. Step t moves the parameters by lr_t u_t with
u = m_hat / (sqrt(v_hat) + eps); rounding the stored states changes it by
rho_t = ||u_t(Q(m), Q(v)) - u_t(m, v)|| / ||u_t||, measured by `record_update_error` on the fp32
run. Summed over the steps (triangle inequality), ||theta_8bit - theta_fp32|| <= max_t rho_t x
(path length of the fp32 run), to first order; we allow twice that: tau = 2 max_t rho_t.
Our Adam8bit and bitsandbytes' AdamW8bit are both within tau of torch's AdamW, hence within
2 tau of each other (triangle inequality again); with bitsandbytes' rounding table emulated,
they are identical.
"""

import bitsandbytes as bnb
import pytest
import torch

from course.optim import (
    Adam8bit,
    DeviceOutOfMemoryError,
    PagingSimulator,
    TracedModel,
    optimizer_state_bytes,
    record_update_error,
)

STEPS, LR, WD = 10, 1e-2, 1e-2


def regression():
    """A fixed least-squares problem: W (64, 128) = 8,192 elements (8-bit states), b (64,) fp32 states."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)  # (N, in)
    w_true = torch.randn(64, 128, generator=gen) * 0.1  # (out, in)
    y = x @ w_true.T + 0.01 * torch.randn(256, 64, generator=gen)  # (N, out)
    w = torch.nn.Parameter(torch.randn(64, 128, generator=gen) * 0.02)
    b = torch.nn.Parameter(torch.zeros(64))
    return x, y, [w, b]


def train(make_optimizer, steps=STEPS):
    """Returns the flat parameters after `steps`, the path length, and the optimizer."""
    x, y, params = regression()
    opt = make_optimizer(params)
    path = 0.0
    for _ in range(steps):
        before = torch.cat([p.detach().reshape(-1) for p in params])
        loss = ((x @ params[0].T + params[1] - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        path += (torch.cat([p.detach().reshape(-1) for p in params]) - before).norm().item()
    return torch.cat([p.detach().reshape(-1) for p in params]), path, opt


def tolerance() -> float:
    """tau = 2 max_t rho_t, measured on the fp32 run."""
    rho = {}

    def watched(params):
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
        rho["t"] = record_update_error(opt)
        return opt

    train(watched)
    return 2 * max(rho["t"])


@pytest.fixture(scope="module")
def runs():
    return {
        "torch": train(lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=WD)),
        "bnb": train(lambda p: bnb.optim.AdamW8bit(p, lr=LR, weight_decay=WD)),
        "ours": train(lambda p: Adam8bit(p, lr=LR, weight_decay=WD)),
        "ours_lut": train(lambda p: Adam8bit(p, lr=LR, weight_decay=WD, emulate_cpu_lut=True)),
    }


def test_tolerance_is_small_and_nonzero():
    tau = tolerance()
    assert 1e-3 < tau < 0.05, tau


def test_adam8bit_tracks_torch_adamw(runs):
    (theta, _, _), (ref, path, _) = runs["ours"], runs["torch"]
    deviation = (theta - ref).norm().item() / path
    assert 0 < deviation <= tolerance(), (deviation, tolerance())


def test_bitsandbytes_itself_is_within_the_same_tolerance(runs):
    (theta, _, _), (ref, path, _) = runs["bnb"], runs["torch"]
    assert (theta - ref).norm().item() / path <= tolerance()


def test_adam8bit_tracks_bitsandbytes(runs):
    (theta, _, _), (ref, path, _) = runs["ours"], runs["bnb"]
    assert (theta - ref).norm().item() / path <= 2 * tolerance()


def test_adam8bit_with_the_cpu_table_equals_bitsandbytes_exactly(runs):
    (theta, _, ours), (ref, _, theirs) = runs["ours_lut"], runs["bnb"]
    assert torch.equal(theta, ref)
    w = ours.param_groups[0]["params"][0]
    mine, bnb_state = ours.state[w], theirs.state[theirs.param_groups[0]["params"][0]]
    assert torch.equal(mine["m"], bnb_state["state1"]) and torch.equal(mine["v"], bnb_state["state2"])
    assert torch.equal(mine["m_absmax"], bnb_state["absmax1"])


def test_small_tensors_keep_fp32_states_and_large_ones_8bit(runs):
    opt = runs["ours"][2]
    w, b = opt.param_groups[0]["params"]
    assert opt.state[w]["m"].dtype == torch.uint8 and opt.state[w]["m_absmax"].shape == (8192 // 256,)
    assert opt.state[b]["m"].dtype == torch.float32


def test_a_wrong_update_is_caught():
    """Without bias correction the run leaves the tolerance: the comparison can fail."""

    class NoBiasCorrection(torch.optim.AdamW):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p in self.state:
                        self.state[p]["step"].zero_()  # step 1 forever: correction factors stay (1 - beta)
            return super().step(closure)

    (theta, _, _), (ref, path, _) = (
        train(lambda p: NoBiasCorrection(p, lr=LR, weight_decay=WD)),
        train(lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=WD)),
    )
    assert (theta - ref).norm().item() / path > tolerance()


# --- state bytes ------------------------------------------------------------------------


def one_step(opt_class, n=2**20, **kwargs):
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opt = opt_class([p], lr=1e-3, **kwargs)
    opt.step()
    return opt


def test_state_bytes_of_adam8bit_for_1m_parameters():
    n = 2**20
    got = optimizer_state_bytes(one_step(Adam8bit, n))
    # m, v: 1 byte each; one fp32 absmax per 256 each; two 256-entry fp32 codes, stored once.
    assert got == 2 * n + 2 * 4 * n // 256 + 2 * 256 * 4
    assert got / n <= 2.1


def test_state_bytes_match_bitsandbytes_and_torch():
    n = 2**20
    assert optimizer_state_bytes(one_step(bnb.optim.AdamW8bit, n)) == optimizer_state_bytes(
        one_step(Adam8bit, n)
    )
    assert optimizer_state_bytes(one_step(torch.optim.AdamW, n)) == 8 * n + 4  # m, v and a fp32 step counter


def test_state_bytes_refuses_non_optimizers():
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        optimizer_state_bytes({"m": torch.zeros(3)})


# --- the paging simulator ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trace_and_state(tokenizer):
    """A real trace: 4 training steps of tiny_model on event_extraction, batches of 2; real 8-bit states."""
    import course

    model = course.models.tiny_model()
    traced = TracedModel(model)
    data = course.data.load_task("event_extraction", "train").select(range(16))
    opt = {}

    def make(params):
        opt["adam"] = Adam8bit(params, lr=1e-3)
        return opt["adam"]

    course.train.train(
        traced, tokenizer, data, steps=4, lr=1e-3, batch_size=2, optimizer=make, progress=False
    )
    states = [t for s in opt["adam"].state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    return traced.activation_bytes, states, resident


def _budget(trace, states, resident):
    """Room for the largest step's activations plus half of the state: spikes must page."""
    n_state = sum(t.numel() * t.element_size() for t in states)
    return resident + max(trace) + n_state // 2, n_state


def test_trace_is_recorded_per_step(trace_and_state):
    trace, _, _ = trace_and_state
    assert len(trace) == 4 and min(trace) > 0 and len(set(trace)) > 1  # real batches differ in length


def test_without_paging_the_trace_runs_out_of_memory(trace_and_state):
    trace, states, resident = trace_and_state
    budget, _ = _budget(trace, states, resident)
    sim = PagingSimulator(budget, resident, states, page_bytes=64 * 1024, paging=False)
    with pytest.raises(DeviceOutOfMemoryError, match="no paging"):
        sim.replay(trace)


def test_with_paging_every_page_comes_back_bit_identical(trace_and_state):
    trace, states, resident = trace_and_state
    budget, n_state = _budget(trace, states, resident)
    original = torch.cat([t.reshape(-1).contiguous().view(torch.uint8) for t in states]).clone()
    sim = PagingSimulator(budget, resident, states, page_bytes=64 * 1024)
    events = sim.replay(trace)
    assert len(events) == 2 * len(trace)
    assert all(e.device_bytes <= budget for e in events)
    assert sim.to_host_bytes > 0 and sim.to_device_bytes == sim.to_host_bytes  # all back after each update
    assert not sim.host and len(sim.device) == sim.n_pages
    assert torch.equal(sim.state_bytes(), original)
    assert sim.transfer_seconds == pytest.approx(2 * sim.to_host_bytes / sim.bandwidth)


def test_paging_cannot_make_room_that_does_not_exist(trace_and_state):
    trace, states, resident = trace_and_state
    sim = PagingSimulator(resident + max(trace) - 1, resident, states, page_bytes=4096)
    with pytest.raises(DeviceOutOfMemoryError, match="every page on the host"):
        sim.replay(trace)


def test_lru_evicts_the_least_recently_used_page():
    state = torch.arange(40, dtype=torch.uint8)
    sim = PagingSimulator(100, 50, [state], page_bytes=10)  # 4 pages of 10 bytes, 10 B free
    sim.replay([10])  # fits: nothing moves; the update touches pages 0, 1, 2, 3 in order
    assert sim.to_host_bytes == 0 and list(sim.device) == [0, 1, 2, 3]
    events = sim.replay([25])  # 15 B short: pages 0 and 1 (least recently used) go, then come back
    assert events[0].bytes_to_host == 20 and events[0].pages_on_device == 2 and events[0].device_bytes == 95
    assert events[1].bytes_to_device == 20 and list(sim.device) == [0, 1, 2, 3]  # touched in order again
    sim._make_room(25, step=1, what="a spike")  # the same eviction, stopped before the update
    assert sorted(sim.host) == [0, 1] and list(sim.device) == [2, 3]
    assert torch.equal(sim.state_bytes(), state)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=-1e-3), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(betas=(-0.1, 0.999)), "betas"),
        (dict(eps=-1.0), "eps"),
    ],
)
def test_adam8bit_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adam8bit([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_simulator_bad_input():
    state = [torch.zeros(100, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="larger than the device budget"):
        PagingSimulator(1000, 0, state, page_bytes=2000)
    with pytest.raises(ValueError, match=">= 0 bytes"):
        PagingSimulator(1000, 0, state, page_bytes=10).replay([10, -5])
    with pytest.raises(ValueError, match="resident_bytes"):
        PagingSimulator(1000, 2000, state, page_bytes=10)
    with pytest.raises(ValueError, match="empty"):
        PagingSimulator(1000, 0, [], page_bytes=10)


def test_update_error_is_recorded_once_per_step_and_zero_at_the_start():
    x, y, params = regression()
    opt = torch.optim.AdamW(params, lr=LR)
    errors = record_update_error(opt)
    for _ in range(3):
        ((x @ params[0].T + params[1] - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert len(errors) == 3 and errors[0] == 0.0  # zero states round-trip exactly
    assert all(0 < e < 0.1 for e in errors[1:])


# --- state dicts, non-finite values (issue 13) ------------------------------------------------


def _toy_run(dtype, n, reload_at, tmp_path):
    """12 steps of Adam8bit on one parameter of n elements; optionally save, reload (torch.save/load), go on."""
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter((torch.randn(n, generator=gen) * 0.1).to(dtype))
    opt = Adam8bit([p], lr=1e-2, weight_decay=1e-2)
    for step in range(12):
        p.grad = torch.randn(n, generator=gen).to(dtype)
        opt.step()
        if step == reload_at:
            torch.save(opt.state_dict(), tmp_path / "opt.pt")
            opt = Adam8bit([p], lr=1e-2, weight_decay=1e-2)
            opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    return p.detach().clone(), opt.state[p]


@pytest.mark.parametrize("n", [8192, 100])  # 8-bit states, and fp32 states (under min_8bit_size)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_adam8bit_save_reload_continue_is_bit_identical(dtype, n, tmp_path):
    straight, state = _toy_run(dtype, n, None, tmp_path)
    reloaded, state_reloaded = _toy_run(dtype, n, 5, tmp_path)
    assert torch.equal(straight, reloaded)
    kinds = {k: (v.dtype, v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert kinds == {k: (v.dtype, v.shape) for k, v in state_reloaded.items() if isinstance(v, torch.Tensor)}
    assert state_reloaded["m"].dtype == (torch.uint8 if n >= 4096 else torch.float32)
    assert all(torch.equal(v, state_reloaded[k]) for k, v in state.items() if isinstance(v, torch.Tensor))


def test_adam8bit_reload_keeps_the_code_shared(tmp_path):
    params = [torch.nn.Parameter(torch.randn(8192)) for _ in range(3)]
    opt = Adam8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    fresh = Adam8bit(params)
    fresh.load_state_dict(opt.state_dict())
    assert optimizer_state_bytes(fresh) == optimizer_state_bytes(opt)


def test_adam8bit_refuses_a_foreign_state_dict():
    p = torch.nn.Parameter(torch.randn(8192))
    adamw = torch.optim.AdamW([p])
    p.grad = torch.randn_like(p)
    adamw.step()
    with pytest.raises(ValueError, match="not an Adam8bit state"):
        Adam8bit([p]).load_state_dict(adamw.state_dict())


@pytest.mark.parametrize(
    "kwargs",
    [dict(eps=float("nan")), dict(lr=float("inf")), dict(lr=float("nan")), dict(weight_decay=float("nan"))]
    + [dict(betas=(float("nan"), 0.999)), dict(betas=0.9), dict(lr=True), dict(min_8bit_size=-1)],
)
def test_adam8bit_refuses_non_finite_and_odd_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        Adam8bit([torch.nn.Parameter(torch.zeros(3))], **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_is_refused_before_anything_changes(bad):
    big, small = torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(10))
    opt = Adam8bit([big, small], lr=1e-2)
    big.grad, small.grad = torch.randn(8192), torch.randn(10)
    opt.step()  # states exist now
    before = [big.detach().clone(), small.detach().clone()]
    states = {
        i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for i, p in enumerate((big, small))
    }
    big.grad, small.grad = torch.randn(8192), torch.randn(10)
    small.grad[3] = bad  # the second parameter: the first must not have moved either
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.step()
    assert torch.equal(big, before[0]) and torch.equal(small, before[1])
    for i, p in enumerate((big, small)):
        for k, v in states[i].items():
            now = opt.state[p][k]
            assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v
