"""Interleaved timing, shared by the speed benchmarks.

On a shared or thermally throttled machine the load drifts during a run. Timing the
contenders in turn, one call each per round, lets every contender see the same drift,
so the ratio of their medians stays fair even when the absolute times do not.
"""

import time
from collections.abc import Callable


def interleaved_times(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call: `repeats` rounds, each calling every contender once, in order."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
