"""Measuring memory: the peak that a piece of work really needs.

On CUDA the caching allocator keeps an exact peak counter. On CPU there is no counter
for tensors, so we use the operating system's: Linux records the process's peak
resident set size (VmHWM) and lets a process reset it (`/proc/self/clear_refs`), so
the peak of `fn` minus the resident size at its start is the memory `fn` added,
allocator and library overheads included.
"""

import re
import resource

import torch


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset Linux's peak-RSS counter to the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(fn, *, device: torch.device | str | None = None):
    """Run `fn()` and return `(result, peak_bytes)`: the peak memory `fn` added.

    CUDA: `torch.cuda.max_memory_allocated` above the allocation at the start.
    CPU on Linux: peak RSS during `fn` above the RSS at the start. Elsewhere the
    lifetime peak RSS (ru_maxrss) is all there is, so a peak lower than an earlier
    one reads as 0: the result is a lower bound.
    """
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start

    if _reset_peak_rss():
        start_kb = _proc_status_kb("VmRSS")
        result = fn()
        return result, (_proc_status_kb("VmHWM") - start_kb) * 1024
    scale = 1 if torch.backends.mps.is_available() else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn()
    return result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * scale
