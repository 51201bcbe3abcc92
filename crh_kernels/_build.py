"""JIT build of the C++/CUDA extensions, for checkouts where setup.py built nothing.

:mod:`crh_kernels.backends.cpp` calls these only when the prebuilt modules
(``crh_kernels._C``, ``crh_kernels._C_cuda``) cannot be imported. The sources are read from the
``csrc/`` folder of the source checkout; the objects go to torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so the build (about a minute
on two cores) happens once per source version. Flags match setup.py's.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from . import _env

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# The same lists as setup.py's (tests/test_cpp.py checks that they agree). The headers are
# listed for that check and for readers; the JIT build finds them by #include.
CPU_SOURCES = ("moments_cpu.cpp", "matmul_rows.cpp", "bindings.cpp")
CPU_HEADERS = ("moments_cpu.h", "cpu_common.h", "cpu_microkernels.h", "row_status.h",
               "bindings_common.h")
CUDA_SOURCES = ("moments_cuda.cu", "bindings_cuda.cpp")
CUDA_HEADERS = ("moments_cuda.h", "row_status.h", "bindings_common.h")


def _openmp():
    return [] if sys.platform == "darwin" else ["-fopenmp"]


def cpu_cflags(test_hooks: bool = False) -> list[str]:
    """setup.py's compiler flags for the CPU extension; with test_hooks, also -DCRH_TEST_HOOKS
    (test-only delays compiled into the kernels: tests/test_cpp.py builds that variant)."""
    return ["-O3", *_openmp(), *(["-DCRH_TEST_HOOKS"] if test_hooks else [])]


def cpu_ldflags() -> list[str]:
    """setup.py's linker flags for the CPU extension."""
    return _openmp()


def _sources(names):
    paths = [CSRC / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"sources for a JIT build are missing ({', '.join(missing)}): install "
                           f"from a source checkout with `pip install --no-build-isolation -e .`")
    return [str(p) for p in paths]


def _say(what: str) -> None:
    print(f"crh_kernels: no prebuilt {what}; JIT-building it from {CSRC} (once; about a minute)",
          file=sys.stderr, flush=True)


def jit_cpu(verbose: bool = False):
    """Build (or load from torch's cache) the CPU extension; returns the imported module."""
    sources = _sources(CPU_SOURCES)
    from torch.utils.cpp_extension import load

    _say("C++ extension")
    return load(name="crh_kernels_cpu", sources=sources,
                extra_cflags=cpu_cflags(), extra_ldflags=cpu_ldflags(),
                is_python_module=True, verbose=verbose)


def jit_cuda(verbose: bool = False):
    """Build (or load from torch's cache) the CUDA extension; needs a CUDA torch and nvcc."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError("torch is a CPU build")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc not found (CUDA_HOME unset)")
    sources = _sources(CUDA_SOURCES)
    # setup.py's architecture switch applies to the JIT build too (torch reads the list)
    archs = _env.cuda_archs()
    if archs and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    _say("CUDA extension")
    return cpp_extension.load(name="crh_kernels_cuda", sources=sources,
                              extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                              is_python_module=True, verbose=verbose)
