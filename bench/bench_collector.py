"""Collector overhead per training step (issue 4, benchmark).

MLP of depth 4 (four Linear layers, ReLU between), width 1024, batch 1024, on the CPU. One step is
``zero_grad; loss = mse(model(x), y); loss.backward(); opt.step()``. Timed, interleaved round by
round so that a noisy neighbour hits every variant alike:

* ``baseline``  — the step without hooks;
* ``naive``     — plain PyTorch hooks computing the same four streams per layer: forward hooks
  for h_a and h_b, tensor hooks for g_b and g_a (input hook where the input requires grad, else
  ``g_b @ W``), each stream ``x̂ = x/||x||, μ = x̂.mean(0), (x̂−μ)ᵀ(x̂−μ)`` (docs/spec.md §5's baseline)
  merged in place into a float32 state (the target's reference); ``naive_f64``: the same
  recipe keeping a float64 state;
* ``collector`` — ``crh_kernels.Collector(model)`` with its defaults (backend choice rule,
  float32 state); ``collector_f64``: the same with ``state_dtype=torch.float64``;
  ``collector_blocks8``: the defaults with ``blocks=8`` (sub-states for the standard errors,
  issue 16: eight states per stream, round robin over steps); with ``CRH_BENCH_ALL=1`` also
  ``collector_torch`` (the plain-PyTorch reference backend);
* ``kfac``      — curvlinops-for-pytorch's KFAC factors (the H_a / G_b pair, uncentered,
  unnormalized), ``compute_kronecker_factors()`` on the same batch with the empirical Fisher
  (one forward + backward of the real loss), against ``fwdbwd``, the same forward + backward
  without hooks.

Overhead = t(variant) − t(its baseline), with t the median and the min over the rounds (on a
shared machine the min, best of N, is the stable one); the target is
``collector overhead ≤ 0.5 × naive overhead``. Also reported, paired by round: each round's
own ratio (t_collector − t_baseline) / (t_naive − t_baseline), their median, the worst round
and how many rounds meet the target (a round runs every variant once, in a shuffled order,
so a slow spell of the machine hits a round's variants together). ``CRH_BENCH_THREADS=1`` pins torch to one thread
(reproducible on a busy 2-core box). Run::

    python -m pytest bench/bench_collector.py -q -s
    CRH_BENCH_ROUNDS=15 python -m pytest bench/bench_collector.py -q -s

curvlinops-for-pytorch pulls torchvision (through backpack-for-pytorch), which does not import
beside the CPU torch wheel; install it without dependencies::

    pip install -c .ci/constraints.txt --no-deps curvlinops-for-pytorch backpack-for-pytorch \\
        einconv einops linear_operator opt_einsum unfoldNd
"""
from __future__ import annotations

import inspect
import json
import os
import random
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from crh_kernels.collect import Collector

WIDTH = int(os.environ.get("CRH_BENCH_WIDTH", 1024))
DEPTH = 4
BATCH = int(os.environ.get("CRH_BENCH_BATCH", 1024))
ROUNDS = int(os.environ.get("CRH_BENCH_ROUNDS", 11))
THREADS = int(os.environ.get("CRH_BENCH_THREADS", 0)) or None   # None: torch's default
STAGE_ROWS = inspect.signature(Collector).parameters["stage_rows"].default


def make_model():
    torch.manual_seed(0)
    layers = []
    for i in range(DEPTH):
        layers.append(nn.Linear(WIDTH, WIDTH))
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


class NaiveState:
    """(n, mean, scatter) of one stream, fed by the plain-PyTorch recipe and merged exactly
    (Chan et al.). ``float32``: in place, with ``addr_`` (the strongest plain recipe, the
    collector's default state dtype); ``float64``: the batch scatter promoted to float64 first
    (what a cautious user writes; crh_kernels.Moments' own default dtype)."""

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype
        self.n, self.mean, self.scatter = 0, None, None

    @torch.no_grad()
    def add(self, x):
        x = x.reshape(-1, x.shape[-1])
        xh = x / x.norm(dim=-1, keepdim=True)
        mu = xh.mean(0)
        y = xh - mu
        c = (y.T @ y).to(self.dtype)
        mu = mu.to(self.dtype)
        nb = x.shape[0]
        if self.n == 0:
            self.n, self.mean, self.scatter = nb, mu, c
            return
        n = self.n + nb
        d = mu - self.mean
        self.scatter.add_(c).addr_(d, d, alpha=self.n * nb / n)
        self.mean.add_(d, alpha=nb / n)
        self.n = n


class NaiveHooks:
    """The four streams of every Linear with plain forward hooks and tensor hooks."""

    def __init__(self, model, dtype=torch.float32):
        self.state = {}
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                st = {s: NaiveState(dtype) for s in ("h_a", "h_b", "g_a", "g_b")}
                self.state[name] = st
                self.handles.append(m.register_forward_hook(self._hook(m, st)))

    @staticmethod
    def _hook(module, st):
        def hook(mod, args, out):
            x = args[0]
            st["h_a"].add(x.detach())
            st["h_b"].add(out.detach())

            def on_gb(g):
                st["g_b"].add(g)
                if not x.requires_grad:
                    with torch.no_grad():
                        st["g_a"].add(g @ module.weight)

            out.register_hook(on_gb)
            if x.requires_grad:
                x.register_hook(lambda g: st["g_a"].add(g))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    opt.step()


def fwd_bwd(model, x, y):
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()


def _kfac(model, x, y):
    """A callable computing KFAC factors on (x, y), or the reason it cannot run."""
    try:
        from curvlinops import KFACLinearOperator
    except Exception as exc:  # not installed, or its torchvision import broke
        return None, f"curvlinops unavailable: {type(exc).__name__}: {exc}".splitlines()[0]
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        op = KFACLinearOperator(model, nn.MSELoss(), params, [(x, y)], check_deterministic=False,
                                fisher_type="empirical")
    except TypeError:  # older signature
        op = KFACLinearOperator(model, nn.MSELoss(), params, [(x, y)], check_deterministic=False)
    return op.compute_kronecker_factors, ""


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_benchmark(rounds: int = ROUNDS, threads=THREADS) -> dict:
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(rounds)
    finally:
        torch.set_num_threads(prev_threads)


def _run(rounds: int) -> dict:
    x, y = make_data()
    variants = {}

    base = make_model()
    opt_b = torch.optim.SGD(base.parameters(), lr=1e-3)
    variants["baseline"] = lambda: train_step(base, opt_b, x, y)

    nv = make_model()
    opt_n = torch.optim.SGD(nv.parameters(), lr=1e-3)
    naive = NaiveHooks(nv)
    variants["naive"] = lambda: train_step(nv, opt_n, x, y)
    nv64 = make_model()
    opt_n64 = torch.optim.SGD(nv64.parameters(), lr=1e-3)
    naive64 = NaiveHooks(nv64, torch.float64)
    variants["naive_f64"] = lambda: train_step(nv64, opt_n64, x, y)

    cols = {}
    configs = [("collector", None, torch.float32, {}), ("collector_f64", None, torch.float64, {}),
               ("collector_blocks8", None, torch.float32, {"blocks": 8})]
    if os.environ.get("CRH_BENCH_ALL") == "1":
        configs.append(("collector_torch", "torch", torch.float64, {}))
    for label, backend, sdt, kw in configs:
        m = make_model()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        col = Collector(m, backend=backend, state_dtype=sdt, **kw).start()
        cols[label] = col

        def step(m=m, opt=opt, col=col):
            train_step(m, opt, x, y)
            col.step()
        variants[label] = step

    fb = make_model()
    variants["fwdbwd"] = lambda: fwd_bwd(fb, x, y)
    km = make_model()
    kfac, why = _kfac(km, x, y)
    if kfac is not None:
        variants["kfac"] = kfac

    # The collector gathers small batches and runs the kernel once per STAGE_ROWS rows, so one
    # round is that many rows of steps for every variant, and the collector's round ends with
    # a flush: the time per step is the amortized cost, flush included. (With blocks=8 a
    # stream's rows of one step go to one of 8 buffers; a round of 8 steps fills each once.)
    steps = max(1, STAGE_ROWS // BATCH)
    if "collector_blocks8" in cols:
        steps = max(steps, 8)
    finish = {label: col.flush for label, col in cols.items()}

    def round_of(k):
        def run():
            for _ in range(steps):
                variants[k]()
            if k in finish:
                finish[k]()
        return run

    for k in variants:                # warm-up (allocations, lazy Moments, extension load)
        round_of(k)()
    times = {k: [] for k in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)            # no variant always runs right after the same neighbour
        for k in order:
            times[k].append(_time(round_of(k)) / steps)
    naive.remove()
    naive64.remove()
    for col in cols.values():
        col.stop()

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    out = {"config": {"width": WIDTH, "depth": DEPTH, "batch": BATCH, "rounds": rounds,
                      "threads": torch.get_num_threads(), "torch": torch.__version__},
           "median_ms": {k: 1e3 * v for k, v in med.items()},
           "min_ms": {k: 1e3 * v for k, v in best.items()}}
    cols_here = [k for k in ("collector", "collector_f64", "collector_blocks8", "collector_torch")
                 if k in times]
    for stat, t in (("median", med), ("min", best)):
        ov = {k: t[k] - t["baseline"] for k in ["naive", "naive_f64"] + cols_here}
        if "kfac" in t:
            ov["kfac"] = t["kfac"] - t["fwdbwd"]
        out[f"overhead_{stat}_ms"] = {k: 1e3 * v for k, v in ov.items()}
        out[f"ratio_vs_naive_{stat}"] = {k: v / ov["naive"] for k, v in ov.items()
                                         if k not in ("naive", "naive_f64")}
        out[f"ratio_vs_naive_f64_{stat}"] = {k: v / ov["naive_f64"] for k, v in ov.items()
                                             if k.startswith("collector")}
    # paired: each round ran every variant once, close in time; the ratio within a round
    # cancels the machine's slow drifts (a busy neighbour slows a whole round, not one variant)
    paired = {}
    for k in cols_here + (["kfac"] if "kfac" in times else []):
        base_k = "fwdbwd" if k == "kfac" else "baseline"
        per_round = [(times[k][i] - times[base_k][i]) / (times["naive"][i] - times["baseline"][i])
                     for i in range(rounds)]
        paired[k] = {"median": statistics.median(per_round), "max": max(per_round),
                     "rounds_at_or_below_0.5": sum(r <= 0.5 for r in per_round)}
    out["ratio_vs_naive_paired"] = paired
    out["round_ms"] = {k: [1e3 * v for v in vs] for k, vs in times.items()}
    out["kfac_note"] = why or "curvlinops KFACLinearOperator.compute_kronecker_factors, empirical Fisher"
    import crh_kernels.backends as B
    out["collector_backend"] = B.resolve(None, torch.device("cpu"), torch.float32).name
    return out


def format_result(r: dict) -> str:
    c = r["config"]
    lines = [f"MLP depth {c['depth']}, width {c['width']}, batch {c['batch']}, {c['threads']} "
             f"thread(s), {c['rounds']} interleaved rounds; ms per step (median / min of rounds)"]
    for k in r["median_ms"]:
        o_med = r["overhead_median_ms"].get(k)
        o_min = r["overhead_min_ms"].get(k)
        lines.append(f"  {k:16s} {r['median_ms'][k]:8.1f} / {r['min_ms'][k]:8.1f}" +
                     ("" if o_med is None else f"   overhead {o_med:8.1f} / {o_min:8.1f}"))
    rm, rn = r["ratio_vs_naive_median"], r["ratio_vs_naive_min"]
    for k in rm:
        what = {"collector": f"collector ({r['collector_backend']}, defaults)",
                "collector_f64": f"collector ({r['collector_backend']}, float64 state)",
                "collector_blocks8": f"collector ({r['collector_backend']}, blocks=8)",
                "collector_torch": "collector (torch backend)", "kfac": "KFAC factors (peer)"}[k]
        target = "  (target ≤ 0.5)" if k.startswith("collector") else ""
        lines.append(f"  {what:38s} overhead / naive overhead = {rm[k]:.3f} / {rn[k]:.3f}{target}")
    for k, p in r.get("ratio_vs_naive_paired", {}).items():
        lines.append(f"  {k:38s} paired by round: median {p['median']:.3f}, worst {p['max']:.3f}, "
                     f"{p['rounds_at_or_below_0.5']}/{c['rounds']} rounds ≤ 0.5")
    fm, fn = r["ratio_vs_naive_f64_median"], r["ratio_vs_naive_f64_min"]
    for k in fm:
        lines.append(f"  {k:38s} overhead / naive_f64 overhead = {fm[k]:.3f} / {fn[k]:.3f}")
    om = r["overhead_median_ms"]
    if "collector_blocks8" in om:
        lines.append(f"  blocks=8 / defaults, overhead (median): "
                     f"{om['collector_blocks8'] / om['collector']:.2f}×")
    lines.append(f"  {r['kfac_note']}")
    return "\n".join(lines)


def test_collector_overhead(benchmark):
    prev = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    try:
        r = run_benchmark()
        print("\n" + format_result(r))
        benchmark.extra_info.update(r)
        out = os.environ.get("CRH_BENCH_OUT")
        if out:
            with open(out, "w") as f:
                json.dump(r, f, indent=1)
        # pytest-benchmark's own row: one collected training step (defaults)
        m = make_model()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        x, y = make_data()
        col = Collector(m).start()
        benchmark.pedantic(lambda: (train_step(m, opt, x, y), col.step()), rounds=5, warmup_rounds=1)
        col.stop()
    finally:
        torch.set_num_threads(prev)
    if os.environ.get("CRH_BENCH_ASSERT") == "1":
        # the paired median: each round's collector against the same round's naive recipe (the
        # min of each variant's rounds pairs two different rounds' luck; NOTES.md, session 3)
        assert r["ratio_vs_naive_paired"]["collector"]["median"] <= 0.5, format_result(r)


if __name__ == "__main__":
    print(format_result(run_benchmark()))
