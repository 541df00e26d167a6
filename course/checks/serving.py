"""Graders for notebook 10 (multi-tenant serving)."""

import random
from collections.abc import Callable

from course.checks._grader import _Grader, _run


def _requests(rng: random.Random, tenants: list[str], n: int) -> list[tuple[str, str]]:
    return [(rng.choice(tenants), f"prompt {i}") for i in range(n)]


def check_route_requests(fn: Callable) -> None:
    """fn(requests, known_tenants) -> {tenant: [request indices]}, tenants in order of first appearance.

    requests are (tenant, prompt) pairs; "__base__" (the base model) is always allowed; a tenant
    that is neither known nor "__base__" must raise ValueError (never a silent fallback).
    """
    from course.serving import BASE, group_by_tenant

    grader = _Grader("route_requests")
    rng = random.Random(10)
    known = ["events", "tickets", "persona"]
    cases = [
        ([("tickets", "a"), ("events", "b"), ("tickets", "c")], known[:2]),
        ([(BASE, "a"), ("events", "b"), (BASE, "c"), ("events", "d")], known[:2]),
        ([("events", "only one")], known),
    ]
    cases += [(_requests(rng, [*known, BASE], rng.randint(1, 12)), known) for _ in range(10)]
    for requests, tenants in cases:
        call = f"fn({requests}, known_tenants={tenants})"
        got = _run(grader, fn, (list(requests), list(tenants)), call)
        want = group_by_tenant([tenant for tenant, _ in requests], tenants)
        grader.expect(
            isinstance(got, dict) and all(isinstance(v, list) for v in got.values()),
            f"{call}: expected a dict {{tenant: [request indices]}}, got {got!r}.",
        )
        grader.expect(
            got == want,
            f"{call}: expected {want}, got {got}. Hint: the values are the requests' positions (0, 1, ...), "
            "not the prompts; every request appears exactly once, under its own tenant.",
        )
        grader.expect(
            list(got) == list(want),
            f"{call}: the right groups, but in the order {list(got)}; expected {list(want)}. Hint: tenants "
            "in the order they first appear in the requests (a dict keeps insertion order).",
        )
    unknown_cases = [
        ([("events", "a"), ("billing", "b")], known[:2]),
        ([("Events", "a")], known[:2]),
        ([(BASE, "a"), ("", "b")], known),
    ]
    for requests, tenants in unknown_cases:
        call = f"fn({requests}, known_tenants={tenants})"
        try:
            got = grader.call(fn, list(requests), list(tenants))
        except ValueError:
            continue
        except AssertionError:
            raise
        except Exception as err:
            grader.expect(False, f"{call}: raised {type(err).__name__}: {err}; expected a ValueError.")
        grader.expect(
            False,
            f"{call}: returned {got!r}, but a request for an unknown tenant must raise ValueError "
            "(naming the known tenants): dropping it or answering it with another model leaks or loses data.",
        )
    grader.passed(len(cases) + len(unknown_cases))


def check_mixed_lora_delta(fn: Callable) -> None:
    """fn(x, adapters, names) -> the LoRA part of a mixed batch: row i gets scaling * B A x_i of its tenant.

    x: (B, T, in); adapters[name] = (A (r, in), B (out, r), scaling); names: one per row, "__base__"
    for no adapter (a zero row); an unknown name raises ValueError.
    """
    import torch

    from course.serving import BASE, mixed_lora_linear

    grader = _Grader("mixed_lora_delta")
    gen = torch.Generator().manual_seed(10)
    rng = random.Random(10)
    cases = 0
    for _ in range(8):
        d_in, d_out = rng.choice([(6, 4), (8, 8), (5, 12)])
        adapters = {}
        for tenant in ("acme", "globex", "initech")[: rng.randint(1, 3)]:
            r = rng.choice([1, 2, 4])
            adapters[tenant] = (
                torch.randn(r, d_in, generator=gen),
                torch.randn(d_out, r, generator=gen),
                rng.choice([0.5, 1.0, 2.0, 4.0]),
            )
        names = [rng.choice([*adapters, BASE]) for _ in range(rng.randint(1, 6))]
        x = torch.randn(len(names), 3, d_in, generator=gen)  # (B, T, in)
        zero = torch.nn.Linear(d_in, d_out, bias=False)
        torch.nn.init.zeros_(zero.weight)
        with torch.no_grad():
            want = mixed_lora_linear(x, zero, adapters, names)  # (B, T, out): base part is 0
        copies = {t: (A.clone(), B.clone(), s) for t, (A, B, s) in adapters.items()}
        call = f"fn(x of shape {tuple(x.shape)}, adapters {sorted(adapters)}, names={names})"
        got = _run(grader, fn, (x.clone(), copies, list(names)), call)
        grader.expect(
            isinstance(got, torch.Tensor) and got.shape == want.shape,
            f"{call} should return a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)!r}.",
        )
        wrong_rows = [
            i for i in range(len(names)) if not torch.allclose(got[i], want[i], atol=1e-5, rtol=1e-5)
        ]
        grader.expect(
            not wrong_rows,
            f"{call}: rows {wrong_rows} are wrong (row {wrong_rows[0] if wrong_rows else 0} is for "
            f"{names[wrong_rows[0]] if wrong_rows else ''!r}). Hint: each row uses the A, B and scaling of the "
            "tenant named for that row, and a '__base__' row gets no LoRA term at all.",
        )
        cases += 1
    adapters = {"acme": (torch.ones(1, 4), torch.ones(2, 1), 1.0)}
    raised = False
    try:
        grader.call(fn, torch.ones(2, 1, 4), adapters, ["acme", "acme-typo"])
    except ValueError:
        raised = True
    except AssertionError:
        raise
    except Exception as err:  # noqa: BLE001 - any other error is the wrong kind
        grader.expect(False, f"an unknown tenant should raise ValueError, got {type(err).__name__}: {err}")
    grader.expect(
        raised, "names=['acme', 'acme-typo']: an unknown tenant must raise ValueError, never fall back."
    )
    grader.passed(cases + 1)
