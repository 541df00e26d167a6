"""The notebook 06 graders pass a correct answer and reject plausible wrong ones."""

import math

import pytest
import torch

from course import checks
from course.optim import Adam8bit, optimizer_state_bytes


def reference_state_bytes(optimizer, numel):
    if optimizer == "adam" or (optimizer == "adam8bit" and numel < 4096):
        return 8 * numel
    if optimizer == "adam8bit":
        return 2 * numel + 8 * math.ceil(numel / 256)
    return 4 * numel


def test_state_bytes_accepts_the_reference():
    checks.check_state_bytes(reference_state_bytes)


@pytest.mark.parametrize("numel", [100, 4096, 9216, 5000])
def test_state_bytes_reference_agrees_with_real_optimizers(numel):
    """The grader's arithmetic is what the optimizers allocate (minus the shared codes and step counter)."""
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    for name, opt, extra in [
        ("adam", torch.optim.AdamW([p], lr=1e-3), 4),  # torch keeps the step count in a fp32 tensor
        ("adam8bit", Adam8bit([p], lr=1e-3), 0 if numel < 4096 else 2 * 256 * 4),  # the two codes
        ("sgd_momentum", torch.optim.SGD([p], lr=1e-3, momentum=0.9), 0),
    ]:
        opt.step()
        assert optimizer_state_bytes(opt) == reference_state_bytes(name, numel) + extra


@pytest.mark.parametrize(
    "wrong",
    [
        lambda opt, n: {"adam": 8 * n, "adam8bit": 2 * n, "sgd_momentum": 4 * n}[opt],  # forgets absmax
        lambda opt, n: {"adam": 8 * n, "adam8bit": 2 * n + 8 * (n // 256), "sgd_momentum": 4 * n}[
            opt
        ],  # floor
        lambda opt, n: {"adam": 8 * n, "adam8bit": 2 * n + 8 * math.ceil(n / 256), "sgd_momentum": 4 * n}[
            opt
        ],
        lambda opt, n: reference_state_bytes(opt, n) if opt != "sgd_momentum" else 0,  # plain SGD
    ],
)
def test_state_bytes_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="state_bytes"):
        checks.check_state_bytes(wrong)


def reference_pages(budget, resident, activations, n_pages, page_bytes):
    overflow = resident + n_pages * page_bytes + activations - budget
    if overflow <= 0:
        return 0
    pages = math.ceil(overflow / page_bytes)
    return pages if pages <= n_pages else None


def test_pages_to_evict_accepts_the_reference():
    checks.check_pages_to_evict(reference_pages)


def test_pages_to_evict_reference_agrees_with_the_simulator():
    """The exercise's arithmetic is what PagingSimulator evicts (full pages, least recently used first)."""
    from course.optim import PagingSimulator

    page, n_pages = 4096, 50
    state = [torch.rand(n_pages * page // 4)]  # fp32: exactly n_pages pages
    for activations in (10 * page, 10 * page + 1, 30 * page + 7):
        budget, resident = 100 * page, 40 * page
        sim = PagingSimulator(budget, resident, state, page_bytes=page)
        events = sim.replay([activations])
        assert events[0].bytes_to_host == reference_pages(budget, resident, activations, n_pages, page) * page


@pytest.mark.parametrize(
    "wrong",
    [
        lambda b, r, a, n, p: max(0, (r + n * p + a - b) // p),  # floor: the step still does not fit
        lambda b, r, a, n, p: max(0, math.ceil((n * p + a - b) / p)),  # forgets the resident weights
        lambda b, r, a, n, p: min(n, reference_pages(b, r, a, n, p) or n),  # all pages instead of None
        lambda b, r, a, n, p: reference_pages(b, r, a, n, p) or 0,  # 0 when impossible, not None
    ],
)
def test_pages_to_evict_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="pages_to_evict"):
        checks.check_pages_to_evict(wrong)


def _toy_fit(make, steps=10):
    """Notebook 06's toy regression: 10 steps, returns the final parameters and the path length."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)  # (N, in)
    y = x @ (torch.randn(64, 128, generator=gen) * 0.1).T + 0.01 * torch.randn(256, 64, generator=gen)
    params = [
        torch.nn.Parameter(torch.randn(64, 128, generator=gen) * 0.02),
        torch.nn.Parameter(torch.zeros(64)),
    ]
    opt, path = make(params), 0.0
    for _ in range(steps):
        before = torch.cat([p.detach().reshape(-1) for p in params])
        ((x @ params[0].T + params[1] - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        path += (torch.cat([p.detach().reshape(-1) for p in params]) - before).norm().item()
    return torch.cat([p.detach().reshape(-1) for p in params]), path, opt


def test_first_order_tolerance_accepts_adam8bit_and_catches_a_wrong_learning_rate():
    """Notebook 06's tolerance tau = max_t rho_t (fraction of the path): Adam8bit inside, a 5% lr error outside."""
    from course.optim import record_update_error

    rho = {}

    def watched(params):
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
        rho["t"] = record_update_error(opt)
        return opt

    ref, path, _ = _toy_fit(watched)
    tau = max(rho["t"])
    ours, _, _ = _toy_fit(lambda p: Adam8bit(p, lr=1e-2, weight_decay=1e-2))
    wrong, _, _ = _toy_fit(lambda p: torch.optim.AdamW(p, lr=1.05e-2, weight_decay=1e-2))
    assert (ours - ref).norm().item() / path <= tau
    assert (wrong - ref).norm().item() / path > tau


def test_stubs_fail_with_a_reminder():
    def stub(*args):
        raise NotImplementedError("Your turn")

    for grader in (checks.check_state_bytes, checks.check_pages_to_evict):
        with pytest.raises(AssertionError, match="not implemented yet"):
            grader(stub)
