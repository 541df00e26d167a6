"""Run Python as on a CPU without AVX512-BF16: `PYTHONPATH=tests/cpu_without_bf16 ATEN_CPU_CAPABILITY=avx2`.

Most learners' laptops (and Apple silicon, ARM, most hosted CI runners) lack AVX512-BF16, so
bitsandbytes never takes its bf16 CPU path there (course.kernel_path). This file makes its native
probe `lib.has_avx512bf16_cpu()` answer False in every process that has this folder on PYTHONPATH
(Jupyter kernels started by nbval inherit it), before any bitsandbytes module asks it:
`make test-cpu-paths` runs the unit tests and every bitsandbytes notebook that way.
`ATEN_CPU_CAPABILITY=avx2` does the same for torch's own kernels.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "bitsandbytes.cextension"


class _WithoutBF16:
    """bitsandbytes' native library with its AVX512-BF16 probe answering False; everything else passes through."""

    def __init__(self, lib):
        self._lib = lib

    def has_avx512bf16_cpu(self):
        return False

    def __getattr__(self, name):
        return getattr(self._lib, name)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.lib = _WithoutBF16(
            module.lib
        )  # before bitsandbytes.functional does `from .cextension import lib`


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
