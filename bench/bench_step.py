"""Time one training step of a GPT-2-small-sized transformer with and without the collector.

    python bench/bench_step.py --device cuda            # GPT-2 small, all streams
    python bench/bench_step.py --size tiny --steps 3    # a CPU smoke run

GPT-2 small: 12 layers, width 768, 12 heads, context 1024, vocabulary 50257 (124M parameters).
The collector measures all four streams (h_a, h_b, g_a, g_b) of every Linear layer of the blocks
(qkv, attention output, MLP in and out: 48 layers) plus the per-head attention outputs;
``--include-head`` adds the tied 768→50257 output layer (its H_b alone is 50257² values).
Before hooking, the memory plan is printed and checked against ``--max-memory``. Reported: median
seconds per step (forward, backward, AdamW step; CUDA synchronised) without the collector, with
it, and the collector's share; plus one ``report()`` time. Meant for ``bench/gpu_check.sh``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from crh_kernels.experiments.models import GPT, count_parameters
from crh_kernels.experiments.runs import (Context, MemoryPlanError, human_bytes, make_collector,
                                          parse_bytes)

SIZES = {
    "gpt2-small": dict(vocab=50257, context=1024, d_model=768, n_layers=12, n_heads=12, batch=8),
    "tiny": dict(vocab=512, context=32, d_model=64, n_layers=2, n_heads=4, batch=4),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(model, opt, batch, steps, device, col=None):
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        _, loss = model(*batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if col is not None:
            col.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/bench_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="gpt2-small")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--batch", type=int, help="sequences per step (default: the size's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="autocast dtype on CUDA (float32: no autocast)")
    p.add_argument("--backend", help="moment backend (default: the fastest available)")
    p.add_argument("--state-dtype", choices=("float64", "float32"), default="float32")
    p.add_argument("--include-head", action="store_true", help="also measure the 768→50257 output layer")
    p.add_argument("--max-memory", default=None, help="budget of the covariance states (e.g. 40G)")
    p.add_argument("--json", help="write the numbers to this file too")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    s = dict(SIZES[args.size])
    if args.batch:
        s["batch"] = args.batch
    torch.manual_seed(0)
    model = GPT(s["vocab"], s["context"], s["d_model"], s["n_layers"], s["n_heads"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    x = torch.randint(0, s["vocab"], (s["batch"], s["context"]), device=device)
    batch = (x, torch.roll(x, -1, 1))
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.dtype == "bfloat16"
           else torch.autocast("cpu", enabled=False))
    out = {"size": args.size, "device": str(device), "parameters": count_parameters(model),
           "tokens_per_step": s["batch"] * s["context"], "dtype": args.dtype}
    max_mem = parse_bytes(args.max_memory) if args.max_memory else None
    ctx = Context(device=device, max_memory=max_mem, backend=args.backend)
    modules = None if args.include_head else r"^blocks\."
    try:
        col = make_collector(model, ctx, modules=modules, heads=model.attention_outputs(),
                             state_dtype=args.state_dtype, what="benchmark collector")
    except MemoryPlanError as exc:
        print(f"bench_step: {exc}", file=sys.stderr)
        return 3
    plan = col.memory_plan()
    out["collector_layers"] = len(col.layers)
    out["collector_state_bytes"] = sum(b for *_, b in plan)
    print(f"{args.size}: {out['parameters'] / 1e6:.1f}M parameters, {out['tokens_per_step']} tokens/step, "
          f"{len(col.layers)} measured layers ({sum(e.kind != 'head' for e in col.layers.values())} Linear + heads), state {human_bytes(out['collector_state_bytes'])}"
          f" ({args.state_dtype})", flush=True)
    with amp:
        _time_steps(model, opt, batch, 2, device)
        base = _time_steps(model, opt, batch, args.steps, device)
        with col:
            _time_steps(model, opt, batch, 2, device, col)
            measured = _time_steps(model, opt, batch, args.steps, device, col)
    _sync(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # float64 eigh on CPU: one thread (many threads crawl on a busy machine)
    t0 = time.perf_counter()
    rep = col.report()
    out["report_s"] = time.perf_counter() - t0
    torch.set_num_threads(threads)
    out["step_s_without"] = statistics.median(base)
    out["step_s_with"] = statistics.median(measured)
    out["overhead"] = out["step_s_with"] / out["step_s_without"] - 1.0
    out["rows_per_layer"] = rep.layers[next(iter(rep.layers))]["n"]
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    print(f"time per step: {out['step_s_without'] * 1e3:.1f} ms without the collector, "
          f"{out['step_s_with'] * 1e3:.1f} ms with all streams on every Linear "
          f"(+{out['overhead']:.0%}); report() {out['report_s']:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
