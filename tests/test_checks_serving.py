"""The serving grader (notebook 10) passes a correct answer and rejects plausible wrong ones."""

import pytest

from course import checks


def _route(requests, known_tenants):
    groups = {}
    for index, (tenant, _) in enumerate(requests):
        if tenant != "__base__" and tenant not in known_tenants:
            raise ValueError(f"unknown tenant {tenant!r}; known: {known_tenants}")
        groups.setdefault(tenant, []).append(index)
    return groups


def _no_base(requests, known_tenants):  # treats the base model as unknown
    if any(t not in known_tenants for t, _ in requests):
        raise ValueError("unknown tenant")
    return _route(requests, known_tenants)


def _drops_unknown(requests, known_tenants):  # silently loses the request
    return _route([(t, p) for t, p in requests if t in known_tenants or t == "__base__"], known_tenants)


def _falls_back_to_base(requests, known_tenants):  # answers with the base model instead
    return _route([(t if t in known_tenants else "__base__", p) for t, p in requests], known_tenants)


def _sorted_tenants(requests, known_tenants):
    return dict(sorted(_route(requests, known_tenants).items()))


def _prompts(requests, known_tenants):
    return {t: [requests[i][1] for i in rows] for t, rows in _route(requests, known_tenants).items()}


def _one_based(requests, known_tenants):
    return {t: [i + 1 for i in rows] for t, rows in _route(requests, known_tenants).items()}


def test_route_requests_accepts_the_reference(capsys):
    checks.check_route_requests(_route)
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (_no_base, "ValueError"),
        (_drops_unknown, "must raise ValueError"),
        (_falls_back_to_base, "must raise ValueError"),
        (_sorted_tenants, "first appear"),
        (_prompts, "positions"),
        (_one_based, "positions"),
    ],
)
def test_route_requests_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_route_requests(wrong)


def test_route_requests_stub_says_not_implemented():
    def stub(requests, known_tenants):
        raise NotImplementedError("Your turn")

    with pytest.raises(AssertionError, match="not implemented yet"):
        checks.check_route_requests(stub)


def _delta(x, adapters, names):
    out = None
    for name in names:
        if name != "__base__" and name not in adapters:
            raise ValueError(f"unknown tenant {name!r}")
    for tenant, (A, B, scaling) in adapters.items():
        rows = [i for i, name in enumerate(names) if name == tenant]
        part = x[rows] @ A.T @ B.T * scaling  # (rows, T, in) @ (in, r) @ (r, out)
        if out is None:
            out = x.new_zeros(*x.shape[:-1], B.shape[0])
        out[rows] += part
    return out


def test_mixed_lora_delta_accepts_the_reference():
    checks.check_mixed_lora_delta(_delta)


@pytest.mark.parametrize(
    "wrong",
    [
        # the first tenant's adapter for every adapted row
        lambda x, ad, names: _delta(x, {t: next(iter(ad.values())) for t in ad}, names),
        # forgets the scaling
        lambda x, ad, names: _delta(x, {t: (A, B, 1.0) for t, (A, B, s) in ad.items()}, names),
        # "__base__" rows fall back to the first tenant
        lambda x, ad, names: _delta(x, ad, [next(iter(ad)) if n == "__base__" else n for n in names]),
        # unknown tenants silently get no adapter
        lambda x, ad, names: _delta(x, ad, [n if n in ad else "__base__" for n in names]),
    ],
)
def test_mixed_lora_delta_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="mixed_lora_delta"):
        checks.check_mixed_lora_delta(wrong)


def test_mixed_lora_delta_stub_fails_with_a_reminder():
    def stub(*args):
        raise NotImplementedError("Your turn")

    with pytest.raises(AssertionError, match="not implemented yet"):
        checks.check_mixed_lora_delta(stub)
