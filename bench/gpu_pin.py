"""Pin every autotuned Triton kernel of the GPU launcher to its first config.

Owns: the one-config mode of ``bench/gpu_check.sh``. On the lent GPU, autotuning compiles and
times every config of a kernel for each new specialization (D, N's divisibility, dtype, flags):
the test files alone would compile ≈ 180 variants, minutes the lease does not have. Pinned, the
launcher's autotuners get only the first config the pruning rule admits for their class
(``backends/triton.py`` ``mm_configs``: target, alignment, atomics, int64; the main config where
it runs without spills, e.g. bf16 128/64, 8 warps at aligned D), so each specialization
compiles once, never a config that spills (tests/test_aot.py), and nothing is timed. Results
stay exact (the config changes tiling, not what is computed); timings are those of that config.

    python3 -m pytest -p gpu_pin ...          # with bench/ on PYTHONPATH: a pytest plugin
    python3 bench/gpu_pin.py SCRIPT [ARGS...] # run a script with the configs pinned
    python3 bench/gpu_pin.py -m MODULE [ARGS...]

Under ``TRITON_INTERPRET=1`` the launcher has no autotuner: nothing is pinned, and it says so.
"""
from __future__ import annotations

import runpy
import sys


def pin() -> list:
    """Make the launcher build every autotuner with the first config ``mm_configs`` admits for
    its class (autotuners built before are dropped: rebuilt pinned on their next launch);
    returns ``["kernel[bits]: config", ...]`` for aligned D on sm_90, what pinning means
    there (empty under the interpreter)."""
    from crh_kernels.backends import triton as launch
    from crh_kernels.backends.triton_aot import mm_label

    if launch.INTERPRET:
        return []
    if not getattr(launch.mm_configs, "pinned", False):
        prune = launch.mm_configs

        def first(case):
            return prune(case)[:1]

        first.pinned = True
        launch.mm_configs = first
    launch._TUNERS.clear()
    pinned = []
    for kernel in launch._MM_KERNELS:
        for bits, precision in ((16, "ieee"), (32, "ieee")):
            case = launch.MMCase(kernel, bits, precision, 90, True, False, False)
            pinned.append(f"{kernel}[{bits}]: {mm_label(launch.mm_configs(case)[0])}")
    return pinned


def _say(pinned: list) -> None:
    if pinned:
        print("gpu_pin: autotuning off, the first config each class admits (aligned D, sm_90: "
              + "; ".join(pinned) + ")", flush=True)
    else:
        print("gpu_pin: no autotuned kernel to pin (interpreter)", flush=True)


def pytest_collection_finish(session):  # pragma: no cover - a pytest hook
    # after collection: tests/conftest.py has set TRITON_INTERPRET where it applies
    _say(pin())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__)
        return 2
    _say(pin())
    if argv[0] == "-m":
        if len(argv) < 2:
            print("gpu_pin: -m needs a module name", file=sys.stderr)
            return 2
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
