"""Helpers for the PEFT Workbook notebooks.

`import course` is cheap: each concept module (`course.lora`, `course.quant`, ...)
is imported on first attribute access, so a notebook pays only for what it uses.
"""

import importlib
import logging

# bitsandbytes 0.50, on a CPU with AVX512-BF16, looks for an optional Hub kernel package (`kernels`) when it is
# imported and logs a warning without it. The course never uses that kernel (and runs offline), so this one
# logger is muted here, once: every notebook's bootstrap cell imports `course` before anything imports
# bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

_MODULES = (
    "env",
    "models",
    "data",
    "lora",
    "quant",
    "kernel_path",
    "optim",
    "memory",
    "train",
    "stats",
    "compare",
    "plots",
    "widgets",
    "checks",
    "exercises",
    "qalora",
    "longlora",
    "rope_scaling",
    "loftq",
    "dora",
    "serving",
    "data_parallel",
    "zero",
    "launch",
    "workers",
    "userdata",
    "sft",
    "export",
    "prompt_tuning",
    "p_tuning",
    "prefix_tuning",
    "ia3",
    "families",
)


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"course.{name}")
    raise AttributeError(f"module 'course' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_MODULES])
