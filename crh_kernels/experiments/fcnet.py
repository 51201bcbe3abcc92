"""Training and measuring the fully connected teacher-student nets of fc1 and fc2 (paper C.1).

Online SGD: every step draws a fresh batch from the teacher, so there is no training set
to overfit and "unseen data" is any fresh draw. Covariances are measured on ``n_measure``
fresh points drawn from a fixed generator (the same points for every run of a sweep).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..plots import figure, save_figure
from . import claims as C
from .claims import layer_summary, nan, rga
from .data import Teacher, make_teacher
from .models import FCNet
from .runs import Context, ExperimentError, make_collector, measure, seed_everything


def build(cfg: Dict[str, Any], ctx: Context) -> Tuple[Teacher, FCNet]:
    teacher = make_teacher(d_in=cfg["d_in"], d_out=cfg["d_out"], k=cfg["teacher_width"],
                           phi_x=cfg.get("phi_x"), seed=ctx.seed)
    seed_everything(ctx.seed)
    model = FCNet(cfg["d_in"], cfg["width"], cfg["depth"], cfg["d_out"], cfg["activation"]).to(ctx.device)
    return teacher, model


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error, averaged over samples and outputs (per-sample loss: the mean over
    outputs; the collector's normalisation makes the reduction irrelevant to α)."""
    return (out - y).pow(2).mean()


def measure_fc(model: FCNet, teacher: Teacher, cfg: Dict[str, Any], ctx: Context, desc: str):
    """Report of every Linear layer (or ``cfg['modules']``) on ``n_measure`` fresh points."""
    col = make_collector(model, ctx, modules=cfg["modules"], streams=cfg["streams"],
                         state_dtype=cfg["state_dtype"], what=f"{desc} collector")
    gen = torch.Generator().manual_seed(ctx.seed + 12_345)  # same points for every run
    n, bs = cfg["n_measure"], cfg["measure_batch"]
    sizes = [min(bs, n - i) for i in range(0, n, bs)]

    def batches():
        for s in sizes:
            x, y = teacher.sample(s, gen)
            yield x.to(ctx.device), y.to(ctx.device)

    was_training = model.training
    model.eval()
    try:
        rep = measure(col, batches(), lambda b: loss_fn(model(b[0]), b[1]), ctx,
                      desc=desc, total=len(sizes), model=model)
    finally:
        model.train(was_training)
    return rep


def train(cfg: Dict[str, Any], ctx: Context, *, weight_decay: float, batch_size: int,
          checkpoints: Sequence[int] = (), label: str = "") -> Tuple[FCNet, Any, Dict[str, Any]]:
    """Train one net (seeded by ``ctx.seed``) and measure it at the end (and at ``checkpoints``).

    Returns ``(model, final report, record)`` with ``record = {"weight_decay", "batch_size",
    "loss" (final running mean), "loss_curve" [(step, loss)], "history" [{"step", "layers"}],
    "layers" (final layer summaries)}``.
    """
    teacher, model = build(cfg, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    steps = cfg["steps"]
    checkpoints = sorted({int(c) for c in checkpoints if 0 <= int(c) <= steps})
    record: Dict[str, Any] = {"weight_decay": weight_decay, "batch_size": batch_size,
                              "loss_curve": [], "history": []}
    every = max(steps // 100, 1)
    running = None
    desc = f"{label} train" if label else "train"

    def checkpoint(step: int):
        rep = measure_fc(model, teacher, cfg, ctx, desc=f"{label} measure@{step}")
        record["history"].append({"step": step, "loss": running, "layers": layer_summary(rep)})

    with ctx.progress(total=steps, desc=desc, leave=False) as bar:
        if 0 in checkpoints:
            checkpoint(0)
        with ctx.timed("train"):
            for step in range(1, steps + 1):
                x, y = teacher.sample(batch_size, gen)
                loss = loss_fn(model(x.to(ctx.device)), y.to(ctx.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step % every == 0 or step == steps:
                    v = float(loss.detach())
                    if not math.isfinite(v):
                        raise ExperimentError(
                            f"{label or 'training'} diverged at step {step} (loss {v}); lower the "
                            f"learning rate, e.g. --set lr={cfg['lr'] / 10:g}")
                    running = v if running is None else 0.9 * running + 0.1 * v
                    record["loss_curve"].append((step, v))
                    bar.set_postfix(loss=f"{running:.4f}", refresh=False)
                if step in checkpoints and step != steps:
                    checkpoint(step)
                bar.update(1)
    rep = measure_fc(model, teacher, cfg, ctx, desc=f"{label} measure")
    record["loss"] = running
    record["layers"] = layer_summary(rep)
    if steps in checkpoints:
        record["history"].append({"step": steps, "loss": running, "layers": record["layers"]})
    return model, rep, record


def checkpoint_steps(steps: int, n: int) -> List[int]:
    """``n`` roughly log-spaced measurement steps in [0, steps] (0 and ``steps`` included)."""
    if n <= 1:
        return [steps]
    pts = {0, steps}
    for i in range(1, n - 1):
        pts.add(int(round(steps ** (i / (n - 1)))))
    return sorted(pts)


def hidden_layers(cfg: Dict[str, Any], names: Sequence[str]) -> List[str]:
    """The Linear layers whose forward side is a hidden representation (not the 1-d output)."""
    out = [f"layers.{i}" for i in range(cfg["depth"])]
    if cfg["d_out"] < 2:
        out = out[:-1]
    return [n for n in out if n in names]


def tag(value) -> str:
    return f"{value:g}".replace("+", "")


# ----------------------------------------------------------------------------- figures
_REL_COLORS = {"forward_RGA": "#d62728", "forward_RWA": "#ff7f0e", "forward_GWA": "#bcbd22",
               "backward_RGA": "#1f77b4", "backward_RWA": "#17becf", "backward_GWA": "#9467bd"}


def plot_sweep(records: List[Dict[str, Any]], key: str, layers: Sequence[str], path, *,
               title: str, xlabel: str, logx: bool = True) -> str:
    """Left: RGA (mean of forward and backward) per layer against the swept value. Right: the
    six α, median over ``layers`` with a min–max band (paper Fig. 8 style)."""
    recs = sorted(records, key=lambda r: r[key])
    xs = [r[key] for r in recs]
    fig = figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for name in layers:
        ys = [rga(r["layers"][name]) if name in r["layers"] else float("nan") for r in recs]
        ax1.plot(xs, ys, "o-", label=name)
    ax1.set_title("RGA per layer (mean of forward and backward)")
    for rel in C.RELATIONS:
        vals = [[nan(r["layers"][n]["alpha"].get(rel)) for n in layers if n in r["layers"]] for r in recs]
        med = [C.median(v) for v in vals]
        lo = [min(C.finite(v), default=float("nan")) for v in vals]
        hi = [max(C.finite(v), default=float("nan")) for v in vals]
        ax2.plot(xs, med, "o-", color=_REL_COLORS[rel], label=rel.replace("_", " "))
        ax2.fill_between(xs, lo, hi, color=_REL_COLORS[rel], alpha=0.12)
    ax2.set_title("six α: median over layers, min–max band")
    for ax in (ax1, ax2):
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("α")
        ax.set_ylim(-0.2, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_history(record: Dict[str, Any], layers: Sequence[str], path, *, title: str) -> str:
    """RGA per layer against the training step, with the loss on a second axis."""
    hist = record.get("history") or []
    fig = figure(6.5, 4)
    ax = fig.subplots()
    steps = [max(h["step"], 1) for h in hist]
    for name in layers:
        ax.plot(steps, [rga(h["layers"][name]) if name in h["layers"] else float("nan") for h in hist],
                "o-", label=f"{name} RGA")
    ax.set_xscale("log")
    ax.set_xlabel("step (step 0 drawn at 1)")
    ax.set_ylabel("α (RGA, mean of forward and backward)")
    ax.set_ylim(-0.2, 1.02)
    ax.grid(alpha=0.3)
    curve = record.get("loss_curve") or []
    if curve:
        ax2 = ax.twinx()
        ax2.plot([max(s, 1) for s, _ in curve], [v for _, v in curve], color="grey", lw=0.8, alpha=0.6)
        ax2.set_yscale("log")
        ax2.set_ylabel("training loss (grey)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_rank_vs_alpha(records: List[Dict[str, Any]], layers: Sequence[str], path, *, title: str) -> str:
    """Paper Fig. 4: effective rank of H_a (as rank deficiency 1 − rank/D) against the backward
    RGA, one colour per weight decay, one point per layer."""
    fig = figure(5.5, 4)
    ax = fig.subplots()
    for r in sorted(records, key=lambda r: r["weight_decay"]):
        xs, ys = [], []
        for name in layers:
            e = r["layers"].get(name)
            if not e:
                continue
            d = (e.get("dims") or {}).get("h_a")
            er = e.get("effective_rank_h")
            a = e["alpha"].get("backward_RGA")
            if d and er is not None and a is not None:
                xs.append(1.0 - er / d)
                ys.append(a)
        ax.plot(xs, ys, "o", label=f"γ = {r['weight_decay']:g}")
    ax.set_xlabel("rank deficiency of H_a: 1 − effective rank / D")
    ax.set_ylabel("backward α(H_a, G_a)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return save_figure(fig, path)
