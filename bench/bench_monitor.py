"""Monitoring presets (issue 16, deliverable 4): step overhead against the α standard error.

Two models train on the CPU, each variant on its own copy from the same initial weights and the
same batches (so every variant follows the same trajectory):

* ``mlp``: ``FCNet(64, 256, depth 4, 10)`` (experiments/models.py), ReLU, batch 128, SGD on a
  fixed random teacher;
* ``transformer``: the small ``GPT`` of experiments/models.py (vocabulary 256, context 32,
  width 64, 2 layers, 4 heads), batch 8 sequences (256 tokens), Adam, on tokens of a random
  sparse Markov chain.

Variants: ``plain`` (the training step alone) and one per collector configuration of the grid
(the presets of ``Collector.monitor``, :data:`crh_kernels.collect.collector.MONITOR_PRESETS`,
and a few others around them: ``every``, ``max_rows``; always ``blocks=8``, round robin over
the collected steps). Timing: ``rounds`` rounds of ``round_steps`` training steps after one
warm-up round; the variants are interleaved step by step (at every step each variant runs its
training step, followed by ``col.step()``, once, in a shuffled order), so that a busy
neighbour slows every variant alike (rounds of whole blocks of steps per variant, the first
version of this benchmark, left ±10 % of noise on the MLP's 4 ms step on a busy machine).
Overhead of a configuration = Σ its step times ÷ Σ plain's over the timed steps − 1, plus the
share of the final ``col.flush()`` (the kernel work on the rows still staged at the end, timed
once) in plain's time for the whole run: the amortized cost of the run, staged rows included;
the report is not inside (its time is ``report_s``). ``overhead_rounds``: the same per round,
to show the spread. After the last round each collector's report gives the jackknife standard
errors
(``entry["se"]["alpha_cov"]``); the α se of a configuration is the mean over layers of the mean
over the six α, after ``(rounds + 1) · round_steps`` training steps (the horizon; a longer run
collects more rows and the se shrinks, roughly as one over the square root of the collected
steps). The report's own time is recorded beside (``report_s``).

Writes ``monitor.json`` (everything), ``monitor.md`` (the table) and ``monitor.png`` (overhead
against α se, one panel per model, the targets ≤ 5 % and ≤ 0.02 drawn) into ``--out``, and
prints the table. One torch thread (``--threads``), so that the ratios are stable on a shared
machine. Run (≈ 5 min on a busy 2-core box)::

    python bench/bench_monitor.py --out bench/out_monitor
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from crh_kernels.collect import Collector
from crh_kernels.collect.collector import MONITOR_PRESETS
from crh_kernels.experiments.models import GPT, FCNet

RELATIONS = ("forward_RGA", "forward_RWA", "forward_GWA", "backward_RGA", "backward_RWA",
             "backward_GWA")
TARGET_OVERHEAD = 0.05
TARGET_SE = 0.02


def grid() -> dict:
    """``{label: Collector keyword arguments}``: the presets, then configurations around them."""
    out = {f"preset:{k}": dict(v) for k, v in MONITOR_PRESETS.items()}
    for every, rows in ((8, None), (16, None), (32, 128)):
        cfg = {"every": every, "max_rows": rows, "blocks": 8}
        if cfg not in out.values():
            out[f"every={every},max_rows={rows}"] = cfg
    return out


# ------------------------------------------------------------------------------ models
class MlpTask:
    name = "mlp"

    def __init__(self, steps: int, seed: int = 0):
        torch.manual_seed(seed)
        self.model = FCNet(64, 256, 4, 10)
        teacher = FCNet(64, 64, 2, 10, activation="tanh")
        g = torch.Generator().manual_seed(seed + 1)
        self.data = []
        with torch.no_grad():
            for _ in range(steps):
                x = torch.randn(128, 64, generator=g)
                self.data.append((x, teacher(x) + 0.1 * torch.randn(128, 10, generator=g)))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.05)

    @staticmethod
    def step(model, opt, batch):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()


class TransformerTask:
    name = "transformer"

    def __init__(self, steps: int, seed: int = 0, vocab: int = 256, context: int = 32,
                 batch: int = 8):
        torch.manual_seed(seed)
        self.model = GPT(vocab, context, d_model=64, n_layers=2, n_heads=4)
        g = torch.Generator().manual_seed(seed + 1)
        succ = torch.randint(vocab, (vocab, 4), generator=g)     # 4 successors per token
        self.data = []
        for _ in range(steps):
            tok = torch.empty(batch, context + 1, dtype=torch.long)
            tok[:, 0] = torch.randint(vocab, (batch,), generator=g)
            pick = torch.randint(4, (batch, context), generator=g)
            for t in range(context):
                tok[:, t + 1] = succ[tok[:, t], pick[:, t]]
            self.data.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))

    def optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=1e-3)

    @staticmethod
    def step(model, opt, batch):
        idx, tgt = batch
        opt.zero_grad(set_to_none=True)
        model(idx, tgt)[1].backward()
        opt.step()


# ------------------------------------------------------------------------------ one model
def _alpha_se(rep) -> tuple:
    """(mean over layers of the mean se of the six α, the worst layer's mean, layers with se)."""
    per_layer = []
    for e in rep.layers.values():
        se = (e.get("se") or {}).get("alpha_cov") or {}
        vals = [se[r] for r in RELATIONS if se.get(r) is not None]
        if vals:
            per_layer.append(sum(vals) / len(vals))
    if not per_layer:
        return None, None, 0
    return sum(per_layer) / len(per_layer), max(per_layer), len(per_layer)


def measure(task, configs: dict, rounds: int, round_steps: int, seed: int = 0) -> dict:
    """Interleaved timing of ``plain`` and every configuration on ``task``; then each
    collector's report."""
    variants = {}
    models = {}
    cols = {}
    for label in ["plain"] + list(configs):
        m = copy.deepcopy(task.model)
        opt = task.optimizer(m)
        models[label] = (m, opt)
        if label != "plain":
            cols[label] = Collector(m, **configs[label]).start()

    def one(label, b):
        m, opt = models[label]
        col = cols.get(label)
        t0 = time.perf_counter()
        task.step(m, opt, b)
        if col is not None:
            col.step()
        return time.perf_counter() - t0

    order = ["plain"] + list(configs)
    for b in task.data[:round_steps]:        # warm-up round: allocations, lazy states
        for label in order:
            one(label, b)
    times = {k: [] for k in order}
    rng = random.Random(seed)
    for b in task.data[round_steps:(rounds + 1) * round_steps]:
        rng.shuffle(order)                   # every step: each variant once, shuffled
        for label in order:
            times[label].append(one(label, b))
    plain = times["plain"]
    out = {"plain_ms": 1e3 * sum(plain) / len(plain), "configs": {}}
    plain_run_s = sum(plain) * (rounds + 1) / rounds     # the warm-up round at the same pace

    def chunks(v):
        return [sum(v[i:i + round_steps]) for i in range(0, len(v), round_steps)]
    for label, col in cols.items():
        t0 = time.perf_counter()
        col.flush()
        flush_s = time.perf_counter() - t0
        col.stop()
        share = flush_s / plain_run_s
        ratios = [c / p - 1.0 + share for c, p in zip(chunks(times[label]), chunks(plain))]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = col.report()
        report_s = time.perf_counter() - t0
        se, worst, n_layers = _alpha_se(rep)
        out["configs"][label] = {
            "kwargs": configs[label], "step_ms": 1e3 * sum(times[label]) / len(times[label]),
            "overhead": sum(times[label]) / sum(plain) - 1.0 + share,
            "overhead_rounds": ratios, "final_flush_s": flush_s,
            "alpha_se": se, "alpha_se_worst_layer": worst, "layers_with_se": n_layers,
            "rows_h_a": {n: st.H_a.n for n, st in col.layers.items() if st.H_a is not None},
            "report_s": report_s, "state_mib": col.nbytes() / 2**20,
        }
    return out


# ------------------------------------------------------------------------------ output
def table(res: dict) -> str:
    lines = [f"horizon {res['horizon_steps']} training steps ({res['rounds']} timed rounds of "
             f"{res['round_steps']} after a warm-up round), {res['threads']} torch thread(s); "
             f"variants interleaved step by step; overhead = Σ t(collector step) / Σ t(plain step) "
             f"− 1 + the final flush's share (min–max over rounds in brackets); α se = mean over "
             f"layers "
             f"of the jackknife se of the six α (K = 8 blocks)", "",
             "| model | configuration | every | max_rows | step ms (mean) | overhead (rounds) | "
             "α se (mean) | α se (worst layer) | report s | state MiB | meets both |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for mname, r in res["models"].items():
        lines.append(f"| {mname} | plain | | | {r['plain_ms']:.2f} | | | | | | |")
        for label, c in r["configs"].items():
            kw = c["kwargs"]
            se = "n/a" if c["alpha_se"] is None else f"{c['alpha_se']:.4f}"
            worst = "n/a" if c["alpha_se_worst_layer"] is None else f"{c['alpha_se_worst_layer']:.4f}"
            ok = (c["alpha_se"] is not None and c["overhead"] <= TARGET_OVERHEAD
                  and c["alpha_se"] <= TARGET_SE)
            lines.append(f"| {mname} | {label} | {kw['every']} | {kw['max_rows']} | "
                         f"{c['step_ms']:.2f} | {100 * c['overhead']:+.1f} % "
                         f"({100 * min(c['overhead_rounds']):+.0f}…{100 * max(c['overhead_rounds']):+.0f}) "
                         f"| {se} | {worst} | "
                         f"{c['report_s']:.1f} | {c['state_mib']:.1f} | {'yes' if ok else 'no'} |")
    both = [label for label in res["configs"]
            if all(_meets(r["configs"][label]) for r in res["models"].values())]
    lines += ["", "configurations meeting overhead ≤ 5 % and α se ≤ 0.02 on both models: "
              + (", ".join(both) if both else "none (see the frontier in the figure)")]
    return "\n".join(lines)


def _meets(c) -> bool:
    return c["alpha_se"] is not None and c["overhead"] <= TARGET_OVERHEAD and c["alpha_se"] <= TARGET_SE


def figure(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res["models"]), figsize=(5.5 * len(res["models"]), 4.2),
                             squeeze=False)
    for ax, (mname, r) in zip(axes[0], res["models"].items()):
        for label, c in r["configs"].items():
            if c["alpha_se"] is None:
                continue
            preset = label.startswith("preset:")
            ax.scatter(100 * c["overhead"], c["alpha_se"], marker="*" if preset else "o",
                       s=120 if preset else 40, color="C3" if preset else "C0", zorder=3)
            ax.annotate(label.replace("preset:", "").replace(",max_rows=", ", rows "),
                        (100 * c["overhead"], c["alpha_se"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.axvline(100 * TARGET_OVERHEAD, color="grey", ls="--", lw=0.8)
        ax.axhline(TARGET_SE, color="grey", ls="--", lw=0.8)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yscale("log")
        ax.set_xlabel("step overhead (%)")
        ax.set_ylabel("α standard error (mean over layers and the six α)")
        ax.set_title(f"{mname}: plain step {r['plain_ms']:.1f} ms, "
                     f"horizon {res['horizon_steps']} steps", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out_monitor")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--round-steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="mlp,transformer")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    steps = (a.rounds + 1) * a.round_steps
    configs = grid()
    res = {"rounds": a.rounds, "round_steps": a.round_steps, "horizon_steps": steps,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "configs": configs,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": {}}
    tasks = {"mlp": MlpTask, "transformer": TransformerTask}
    t0 = time.perf_counter()
    for name in a.models.split(","):
        res["models"][name] = measure(tasks[name](steps), configs, a.rounds, a.round_steps)
        print(f"{name} done after {time.perf_counter() - t0:.0f} s", flush=True)
    res["wall_s"] = time.perf_counter() - t0
    text = table(res)
    print(text)
    with open(os.path.join(a.out, "monitor.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "monitor.md"), "w") as f:
        f.write(text + "\n")
    figure(res, os.path.join(a.out, "monitor.png"))
    return res


if __name__ == "__main__":
    main()
