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
