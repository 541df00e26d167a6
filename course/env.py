"""Where the course runs: device, compute dtype, seeds and a version report.

Every notebook starts with `course.env.report()` so that a stored output says exactly
which versions and which device produced it.
"""

import os
import platform
import random
import sys
from importlib import metadata

import torch

REPORTED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


def pick_device() -> torch.device:
    """The best device available: cuda > mps > cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on a GPU that supports it (Ampere or newer), fp32 everywhere else.

    The QLoRA recipe computes in bf16 (`bnb_4bit_compute_dtype`); on CPU, fp32 is both
    faster and exact, so the course uses it there.
    """
    try:
        device = torch.device(device) if device is not None else pick_device()
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be a torch.device or a name like 'cpu' or 'cuda', got {device!r}"
        ) from None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def seed_everything(seed: int = 0) -> None:
    """Seed Python, torch (all devices) and the hash seed of child processes."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    torch.manual_seed(seed)


def in_colab() -> bool:
    """True inside Google Colab (its runtime module is importable only there)."""
    return "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG") is not None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> None:
    """Print versions, device and threads: the first output of every notebook."""
    device = pick_device()
    print(
        f"python {platform.python_version()}  " + "  ".join(f"{p} {_version(p)}" for p in REPORTED_PACKAGES)
    )
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.machine()
    print(
        f"device {device} ({name}), compute dtype {str(compute_dtype(device)).removeprefix('torch.')}, "
        f"torch threads {torch.get_num_threads()}, colab {in_colab()}"
    )
