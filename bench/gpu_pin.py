"""Pin every autotuned Triton kernel of the GPU launcher to its first config.

Owns: the one-config mode of ``bench/gpu_check.sh``. On the lent GPU, autotuning compiles and
times every config of a kernel for each new specialization (D, N's divisibility, dtype, flags):
the test files alone would compile ≈ 180 variants, minutes the lease does not have. Pinned to
the launcher's first config (its main one: ``_GPU_MM_CONFIGS[bits][0]``), each specialization
compiles once. Results stay exact (the config changes tiling, not what is computed); timings
are those of the first config.

    python3 -m pytest -p gpu_pin ...          # with bench/ on PYTHONPATH: a pytest plugin
    python3 bench/gpu_pin.py SCRIPT [ARGS...] # run a script with the configs pinned
    python3 bench/gpu_pin.py -m MODULE [ARGS...]

Under ``TRITON_INTERPRET=1`` the launcher has no autotuner: nothing is pinned, and it says so.
"""
from __future__ import annotations

import runpy
import sys


def pin() -> list:
    """Keep only the first config of every autotuner the launcher module holds; returns
    ``["name[bits]: config", ...]`` for what was pinned."""
    from triton.runtime.autotuner import Autotuner

    from crh_kernels.backends import triton as launch

    pinned = []
    for name, value in sorted(vars(launch).items()):
        tuners = value.items() if isinstance(value, dict) else [("", value)]
        for key, tuner in tuners:
            if isinstance(tuner, Autotuner) and tuner.configs:
                tuner.configs = tuner.configs[:1]
                pinned.append(f"{name}[{key}]: {tuner.configs[0]}" if key != "" else f"{name}: {tuner.configs[0]}")
    return pinned


def _say(pinned: list) -> None:
    if pinned:
        print("gpu_pin: autotuning off, first config only: " + "; ".join(pinned), flush=True)
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
