"""Time the moment update on the GPU: every backend against torch.mm and the plain pipeline,
beside the prediction of bench/gpu_model.py.

Prints one table (time, effective TFLOP/s = 2·N·D²/t, ratios, predicted time and
measured/predicted) and writes it as JSON when ``--json PATH`` is given, after every shape
(a run cut short by its time limit keeps the shapes it finished). Also checks each result
against a float64 reference, so a fast wrong kernel cannot hide. Used by bench/gpu_check.sh;
runs on CPU too (small sizes) for a dry run: ``python bench/gpu_table.py --small``.

    python bench/gpu_table.py [--small | --shapes 16384x1024,65536x128] [--reps 20]
                              [--backends triton,cuda] [--json PATH]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import crh_kernels  # noqa: E402
import gpu_model  # noqa: E402
from crh_kernels import backends  # noqa: E402
from crh_kernels.selfcheck import float64_scatter, pipeline  # noqa: E402

GPU_SHAPES = gpu_model.SHAPES  # most valuable first: a timeout cuts the last ones
SMALL_SHAPES = [(512, 96), (1024, 16)]


def timeit(fn, reps):
    fn()  # warm-up (autotuning, JIT)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _shapes(text):
    try:
        return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are NxD,NxD...: got {text!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help=f"shapes {SMALL_SHAPES} (CPU dry run)")
    ap.add_argument("--shapes", type=_shapes, help="NxD,NxD,... instead of the default shapes")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--backends", help="comma-separated backends to time (default: every available one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shapes or (SMALL_SHAPES if args.small else GPU_SHAPES)
    if args.backends:
        impls = [n.strip() for n in args.backends.split(",") if n.strip()]
        for n in impls:
            if not backends.get(n).supports(dev)[0]:  # get() raises with the reason when unavailable
                ap.error(f"backend {n!r} does not run on {dev}")
    else:
        impls = [n for n, (ok, _) in crh_kernels.available_backends().items()
                 if ok and backends.get(n).supports(dev)[0]]
    rows = []
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"backends: {impls}; pred: bench/gpu_model.py (H200, today's code)", flush=True)
    print(f"{'N':>6s} {'D':>5s} {'dtype':5s} {'impl':14s} {'ms':>9s} {'TFLOP/s':>8s} {'x mm':>6s} {'x pipe':>6s} "
          f"{'rel err':>8s} {'pred ms':>8s} {'meas/pred':>9s}", flush=True)
    for n, d in shapes:
        for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            x = (torch.randn(n, d, device=dev) + 3.0).to(dtype)
            ref = float64_scatter(x)[1] if n * d <= 65536 * 4096 else None
            cases = {"mm": lambda: x.T @ x, "pipeline": lambda: pipeline(x)}
            for name in impls:
                be = backends.get(name)
                precisions = ("ieee", "tf32") if dtype == torch.float32 and dev.type == "cuda" else ("ieee",)
                for prec in precisions:
                    key = name if prec == "ieee" else f"{name}/tf32"
                    cases[key] = (lambda be=be, prec=prec: be.batch_stats(x, None, True, prec))
            t = {k: timeit(fn, args.reps) for k, fn in cases.items()}
            for k, fn in cases.items():
                err = float("nan")
                if ref is not None and k not in ("mm", "pipeline"):
                    err = float((fn().scatter.double() - ref).norm() / ref.norm())
                pred = gpu_model.predicted_ms(n, d, label, k) if dev.type == "cuda" else float("nan")
                row = dict(n=n, d=d, dtype=label, impl=k, ms=t[k] * 1e3, tflops=2 * n * d * d / t[k] / 1e12,
                           vs_mm=t["mm"] / t[k], vs_pipeline=t["pipeline"] / t[k], rel_err=err,
                           predicted_ms=pred, measured_over_predicted=t[k] * 1e3 / pred)
                rows.append(row)
                print(f"{n:6d} {d:5d} {label:5s} {k:14s} {row['ms']:9.3f} {row['tflops']:8.1f} "
                      f"{row['vs_mm']:6.2f} {row['vs_pipeline']:6.2f} {err:8.1e} {pred:8.3f} "
                      f"{row['measured_over_predicted']:9.2f}", flush=True)
        if args.json:  # after every shape: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
