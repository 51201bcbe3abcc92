"""Build of the optional C++/CUDA extensions (metadata lives in pyproject.toml).

torch is deliberately not a build requirement: in pip's isolated build environment an unpinned
torch resolves to the newest (multi-GB CUDA) build, which the extension would then be compiled
against while another torch runs it. So the extensions are built at install time only when
torch is importable in the build environment, i.e. with the torch already installed:

    pip install -c .ci/constraints.txt --no-build-isolation -e ".[test]"

builds ``crh_kernels._C`` (CPU kernels, C++17 + OpenMP), and ``crh_kernels._C_cuda`` (CUDA
kernels) only with a CUDA build of torch and nvcc. A plain ``pip install .`` (isolated build, no
torch there) installs pure Python: the ``cpp`` backend then JIT-builds the extension on first
use and caches it (crh_kernels/_build.py), and otherwise reports why it is unavailable.

Switches (read here, at build time only):
  CRH_REQUIRE_CPP=1       a failed CPU build fails the install (CI) instead of a warning
  CRH_SKIP_CUDA_BUILD=1   never build the CUDA extension
  CRH_FORCE_CUDA_BUILD=1  build it even when torch has no CUDA or no GPU is visible
  CRH_CUDA_ARCHS="8.0;9.0"  target architectures (TORCH_CUDA_ARCH_LIST syntax); default: the
                          visible GPUs, else "8.0;9.0+PTX"
"""
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"crh_kernels setup: {msg}", file=sys.stderr)


# Sources and headers of the two extensions: the same lists as crh_kernels/_build.py's (the JIT
# build; tests/test_cpp.py checks that they agree).
CPU_SOURCES = ("moments_cpu.cpp", "matmul_rows.cpp", "bindings.cpp")
CPU_HEADERS = ("moments_cpu.h", "cpu_common.h", "cpu_microkernels.h", "row_status.h",
               "bindings_common.h")
CUDA_SOURCES = ("moments_cuda.cu", "bindings_cuda.cpp")
CUDA_HEADERS = ("moments_cuda.h", "row_status.h", "bindings_common.h")


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (``crh_kernels/_csrc``) so that an install without a
    prebuilt extension can JIT-build it (crh_kernels/_build.py looks there first). Editable
    installs skip this: the JIT build reads the checkout's csrc/."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = os.path.join(self.build_lib, "crh_kernels", "_csrc")
        os.makedirs(dest, exist_ok=True)
        for name in sorted({*CPU_SOURCES, *CPU_HEADERS, *CUDA_SOURCES, *CUDA_HEADERS}):
            shutil.copy2(os.path.join("csrc", name), dest)


def extensions():
    """``(ext_modules, cmdclass)`` for setup(): empty when torch is not importable here."""
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch in this environment (e.g. pip's isolated build env)
        _log(f"torch is not importable ({type(exc).__name__}: {exc}); installing without the "
             f"C++ extension (it is JIT-built at first use; --no-build-isolation with torch "
             f"installed builds it now)")
        return [], {}

    ext_modules = []
    csrc = "csrc"  # relative: setuptools wants source paths relative to setup.py
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
    # no -std: torch's cpp_extension picks the standard its headers need (C++17 or newer)
    cxx_flags = ["-O3", *openmp]
    ext_modules.append(cpp_extension.CppExtension(
        "crh_kernels._C",
        [os.path.join(csrc, f) for f in CPU_SOURCES],
        depends=[os.path.join(csrc, f) for f in CPU_HEADERS],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=openmp,
    ))

    want_cuda = False
    if _flag("CRH_SKIP_CUDA_BUILD"):
        _log("CRH_SKIP_CUDA_BUILD set: not building the CUDA extension")
    elif _flag("CRH_FORCE_CUDA_BUILD"):
        want_cuda = True
    elif torch.version.cuda is None:
        _log("torch is a CPU build: not building the CUDA extension")
    elif cpp_extension.CUDA_HOME is None:
        _log("nvcc not found (CUDA_HOME unset): not building the CUDA extension")
    else:
        want_cuda = True
    if want_cuda:
        archs = os.environ.get("CRH_CUDA_ARCHS", "").strip()
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        _log(f"building the CUDA extension for {os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPUs')}")
        ext_modules.append(cpp_extension.CUDAExtension(
            "crh_kernels._C_cuda",
            [os.path.join(csrc, f) for f in CUDA_SOURCES],
            depends=[os.path.join(csrc, f) for f in CUDA_HEADERS],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        ))

    class BuildExt(cpp_extension.BuildExtension):
        """BuildExtension that turns a failed build into a warning (the package works without
        the extension: torch backend, or a JIT build later), unless it was required:
        CRH_REQUIRE_CPP=1 for the CPU extension, CRH_FORCE_CUDA_BUILD=1 for the CUDA one."""

        failed = ()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                is_cuda = ext.name.endswith("_cuda")
                if _flag("CRH_FORCE_CUDA_BUILD") if is_cuda else _flag("CRH_REQUIRE_CPP"):
                    raise
                _log(f"WARNING: building {ext.name} failed ({type(exc).__name__}: {exc}); "
                     f"continuing without it")
                self.failed = (*self.failed, ext.name)

        # a failed extension has no file to copy or install
        def _built(self):
            return [e for e in self.extensions if e.name not in self.failed]

        def copy_extensions_to_source(self):
            keep, self.extensions = self.extensions, self._built()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = keep

        def get_outputs(self):
            return [o for o in super().get_outputs() if os.path.exists(o)]

        def get_output_mapping(self):
            return {k: v for k, v in super().get_output_mapping().items() if os.path.exists(v)}

    return ext_modules, {"build_ext": BuildExt.with_options(
        use_ninja=cpp_extension.is_ninja_available())}


# setuptools runs this file as __main__; tests import it to call extensions()
if __name__ == "__main__":
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
