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


DEVICE_VARIABLE = "COURSE_DEVICE"  # e.g. COURSE_DEVICE=cpu make lab: run every notebook on the CPU


def pick_device() -> torch.device:
    """The best device available: cuda > mps > cpu, unless `COURSE_DEVICE` names one.

    The override is for a machine where a path the course has not been run on fails: on Apple
    silicon, for example, `COURSE_DEVICE=cpu` keeps bitsandbytes on its CPU backend.
    """
    if chosen := os.environ.get(DEVICE_VARIABLE):
        try:
            return torch.device(chosen)
        except RuntimeError:
            raise ValueError(
                f"{DEVICE_VARIABLE}={chosen!r} is not a device: use cpu, cuda, cuda:1 or mps"
            ) from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on a GPU that has it (Ampere or newer), fp16 on one that does not, fp32 elsewhere.

    The QLoRA recipe computes in bf16 (`bnb_4bit_compute_dtype`). A T4 (Colab's free GPU, compute
    capability 7.5) or a V100 (7.0) has no bf16 units but fast fp16 ones: fp16 halves the
    activations there, and training in it needs loss scaling (`course.train` does it), since
    fp16's smallest normal number is 6e-5 and small gradients would round to zero. On CPU,
    fp32 is both faster and exact, so the course uses it there.
    """
    try:
        device = torch.device(device) if device is not None else pick_device()
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be a torch.device or a name like 'cpu' or 'cuda', got {device!r}"
        ) from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def trainer_precision(device: torch.device | str | None = None) -> dict[str, bool]:
    """The `bf16` and `fp16` flags of transformers' `TrainingArguments` (and TRL's `SFTConfig`)
    for `compute_dtype(device)`: what every Trainer in the course passes instead of `bf16=True`,
    which a T4 refuses. fp16 there turns on the Trainer's own loss scaling."""
    dtype = compute_dtype(device)
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


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
