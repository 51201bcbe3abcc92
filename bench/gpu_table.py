"""Time the moment update on the GPU: every backend against torch.mm and the plain pipeline.

Prints one table (time, effective TFLOP/s = 2·N·D²/t, ratios) and writes it as JSON when
``--json PATH`` is given. Also checks each result against a float64 reference, so a fast
wrong kernel cannot hide. Used by bench/gpu_check.sh; runs on CPU too (small sizes) for a
dry run: ``python bench/gpu_table.py --small``.
"""
import argparse
import json
import time

import torch

import crh_kernels
from crh_kernels import backends
from crh_kernels.selfcheck import float64_scatter, pipeline




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




def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--small", action="store_true", help="small shapes (CPU dry run)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [(2048, 256), (8192, 64)] if args.small else [(16384, 1024), (65536, 128), (4096, 4096), (65536, 4096)]
    impls = [n for n, (ok, _) in crh_kernels.available_backends().items()
             if ok and backends.get(n).supports(dev)[0]]
    rows = []
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"backends: {impls}")
    print(f"{'N':>6s} {'D':>5s} {'dtype':5s} {'impl':14s} {'ms':>9s} {'TFLOP/s':>8s} {'x mm':>6s} {'x pipe':>6s} {'rel err':>8s}")
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
                row = dict(n=n, d=d, dtype=label, impl=k, ms=t[k] * 1e3, tflops=2 * n * d * d / t[k] / 1e12,
                           vs_mm=t["mm"] / t[k], vs_pipeline=t["pipeline"] / t[k], rel_err=err)
                rows.append(row)
                print(f"{n:6d} {d:5d} {label:5s} {k:14s} {row['ms']:9.3f} {row['tflops']:8.1f} "
                      f"{row['vs_mm']:6.2f} {row['vs_pipeline']:6.2f} {err:8.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
