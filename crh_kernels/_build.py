"""JIT build of the C++/CUDA extensions, for installs where setup.py built nothing.

:mod:`crh_kernels.backends.cpp` calls these only when the prebuilt modules
(``crh_kernels._C``, ``crh_kernels._C_cuda``) cannot be imported. The sources are read from
``crh_kernels/_csrc`` (a wheel built by setup.py carries them there) or else the ``csrc/``
folder of the source checkout; the objects go to torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so the build (tens of
seconds: 35-45 s measured for the CPU extension on two busy shared cores) happens once per
source version; later processes find ninja with nothing to do and load the cached module. Flags
match setup.py's.

The "JIT-building" message is printed only when ninja has work to do: ``cpp_extension.load``
runs ninja on every call (ninja, not torch, decides whether anything is out of date), so the
check wraps torch's ninja step and asks ninja first with a dry run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import _env

# An installed wheel carries the sources in crh_kernels/_csrc (setup.py's build_py); a source
# checkout (editable install) has them in csrc/ next to the package.
_HERE = Path(__file__).resolve().parent
CSRC = _HERE / "_csrc" if (_HERE / "_csrc").is_dir() else _HERE.parent / "csrc"
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
        raise RuntimeError(f"sources for a JIT build are missing ({', '.join(missing)}): "
                           f"reinstall crh-kernels from its source tree (`pip install .`)")
    return [str(p) for p in paths]


def _say(what: str) -> None:
    print(f"crh_kernels: no prebuilt {what}; JIT-building it from {CSRC} (once per source "
          f"version; tens of seconds)", file=sys.stderr, flush=True)


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a venv's python run without activating the venv has the
    ninja dependency in its bin folder but not on PATH, so put that folder there."""
    if shutil.which("ninja"):
        return
    folders = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package: its binary may live in its own folder
        folders.append(ninja.BIN_DIR)
    except Exception:
        pass
    for folder in folders:
        if shutil.which("ninja", path=folder):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return


def ninja_has_work(build_directory: str) -> bool:
    """Whether ninja would rebuild anything in ``build_directory`` (a dry run: source, header
    and command changes all count). Unsure (no build.ninja yet, ninja fails) means yes."""
    if not os.path.isfile(os.path.join(build_directory, "build.ninja")):
        return True
    try:
        out = subprocess.run(["ninja", "-n", "-C", build_directory], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True
    return out.returncode != 0 or "no work to do" not in out.stdout


@contextlib.contextmanager
def _announce_build(what: str):
    """Print the JIT message iff torch's ninja step is about to compile. torch writes
    build.ninja (with the current flags) just before calling ``_run_ninja_build``, so a dry run
    at that point sees exactly what the real one will do. A torch without that private hook
    gets the message unconditionally."""
    from torch.utils import cpp_extension

    original = getattr(cpp_extension, "_run_ninja_build", None)
    if original is None:
        _say(what)
        yield
        return

    def run_ninja_build(build_directory, *args, **kwargs):
        if ninja_has_work(build_directory):
            _say(what)
        return original(build_directory, *args, **kwargs)

    cpp_extension._run_ninja_build = run_ninja_build
    try:
        yield
    finally:
        cpp_extension._run_ninja_build = original


def jit_cpu(verbose: bool = False):
    """Build (or load from torch's cache) the CPU extension; returns the imported module."""
    sources = _sources(CPU_SOURCES)
    from torch.utils.cpp_extension import load

    _ninja_on_path()
    with _announce_build("C++ extension"):
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
    _ninja_on_path()
    with _announce_build("CUDA extension"):
        return cpp_extension.load(name="crh_kernels_cuda", sources=sources,
                                  extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                                  is_python_module=True, verbose=verbose)
