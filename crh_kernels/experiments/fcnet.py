"""Training and measuring the fully connected teacher-student nets of fc1 and fc2 (paper C.1).

Online SGD: every step draws a fresh batch from the teacher, so there is no training set
to overfit and "unseen data" is any fresh draw. Covariances are measured on ``n_measure``
fresh points drawn from a fixed generator (the same points for every run of a sweep).
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..plots import figure, save_figure
from . import claims as C
from .claims import layer_summary, nan, rga
from .data import Teacher, make_teacher
from .models import FCNet
from .runs import Context, ExperimentError, make_collector, measure, rng_states, seed_everything, set_rng_states


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
    """Report of every Linear layer (or ``cfg['modules']``) on ``n_measure`` fresh points; with
    ``cfg['raw_moments']`` the collector also keeps the raw moments, on which the report fits the
    exponents and phases (``Collector(raw_moments=True)``)."""
    col = make_collector(model, ctx, modules=cfg["modules"], streams=cfg["streams"],
                         state_dtype=cfg["state_dtype"], what=f"{desc} collector",
                         raw_moments=bool(cfg.get("raw_moments", False)))
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


#: The optimizers a net can be trained with (setting ``optimizer``).
OPTIMIZERS = ("sgd", "adam")


def make_optimizer(cfg: Dict[str, Any], model: FCNet, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (learning rate ``lr``, ``momentum``) or Adam (learning rate ``lr``, default betas),
    both with the L2 weight decay ``weight_decay`` added to the gradient (the γ of the paper's
    loss L + γ‖θ‖²/2; for Adam this is ``torch.optim.Adam``'s coupled decay, not AdamW)."""
    name = str(cfg.get("optimizer", "sgd")).lower()
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                               weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=weight_decay)
    raise ExperimentError(f"setting optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def train(cfg: Dict[str, Any], ctx: Context, *, weight_decay: float, batch_size: int,
          checkpoints: Sequence[int] = (), label: str = "", key: str = ""
          ) -> Tuple[Any, Any, Dict[str, Any]]:
    """Train one net (seeded by ``ctx.seed``) and measure it at the end (and at ``checkpoints``).

    Returns ``(model, final report, record)`` with ``record = {"weight_decay", "batch_size",
    "loss" (final running mean), "loss_curve" [(step, loss)], "history" [{"step", "layers"}],
    "layers" (final layer summaries)}``.

    ``key`` names this sub-run in the run's checkpoints (``ctx.checkpoints``, a
    :class:`~.runs.CheckpointStore`; nothing is kept without one or without a key): a sub-run
    finished before is read back (its model is then None), an unfinished one continues from its
    last checkpoint (model, optimizer, the batch generator's and the global random states,
    step, the record so far) and gives the numbers of an uninterrupted run; while training, the
    state is saved every ``checkpoint_every`` steps.
    """
    store = ctx.checkpoints if key else None
    if store is not None:
        done = store.finished(key)
        if done is not None:
            record, rep = done
            ctx.log(f"{label or key}: finished before, read back from the checkpoints")
            return None, rep, record
    teacher, model = build(cfg, ctx)
    opt = make_optimizer(cfg, model, weight_decay)
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    steps = cfg["steps"]
    checkpoints = sorted({int(c) for c in checkpoints if 0 <= int(c) <= steps})
    record: Dict[str, Any] = {"weight_decay": weight_decay, "batch_size": batch_size,
                              "loss_curve": [], "history": []}
    every = max(steps // 100, 1)
    running = None
    first = 1
    state = store.load(key) if store is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        set_rng_states(state["rng"])
        record = json.loads(state["record"])
        running = state["running"]
        first = int(state["step"]) + 1
        ctx.log(f"{label or key}: resumed at step {first - 1} of {steps}")
    desc = f"{label} train" if label else "train"

    def checkpoint(step: int):
        rep = measure_fc(model, teacher, cfg, ctx, desc=f"{label} measure@{step}")
        record["history"].append({"step": step, "loss": running, "layers": layer_summary(rep)})

    def save_state(step: int):
        store.save(key, {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "generator": gen.get_state(), "rng": rng_states(), "running": running,
                         "record": json.dumps(C._jsonable(record), allow_nan=False)})

    with ctx.progress(total=steps, desc=desc, leave=False) as bar:
        if first > 1:
            bar.update(first - 1)
        if 0 in checkpoints and first == 1:
            checkpoint(0)
        with ctx.timed("train"):
            for step in range(first, steps + 1):
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
                if store is not None and store.due(step) and step != steps:
                    save_state(step)
                bar.update(1)
    rep = measure_fc(model, teacher, cfg, ctx, desc=f"{label} measure")
    record["loss"] = running
    record["layers"] = layer_summary(rep)
    if steps in checkpoints:
        record["history"].append({"step": steps, "loss": running, "layers": record["layers"]})
    if store is not None:
        store.finish(key, record, rep)
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


def hidden_representations(cfg: Dict[str, Any], names: Sequence[str]) -> List[Dict[str, Any]]:
    """The hidden layers of the net as the paper counts them (Fig. 18: "layer 0 is the input
    layer"; Fig. 8: "five hidden layers" of fc2's six Linear layers): hidden layer k (1 … depth−1)
    is seen from two Linear layers — as the output h_b of ``layers.{k−1}`` (its forward side,
    before the activation, with W_{k−1}) and as the input h_a of ``layers.{k}`` (its backward
    side, after the activation, with W_k). The input (``layers.0``'s backward side) and the
    output (the last layer's forward side) are not hidden layers. Returns ``[{"k", "forward":
    layer or None, "backward": layer or None}]`` for the layers present in ``names``."""
    names = set(names)
    out = []
    for k in range(1, int(cfg["depth"])):
        f, b = f"layers.{k - 1}", f"layers.{k}"
        hid = {"k": k, "forward": f if f in names else None, "backward": b if b in names else None}
        if hid["forward"] or hid["backward"]:
            out.append(hid)
    return out


def _side(rel: str) -> str:
    return "forward" if rel.startswith("forward") else "backward"


def hidden_alpha(layers: Dict[str, Any], hid: Dict[str, Any], rel: str) -> float:
    """α of relation ``rel`` at hidden layer ``hid`` (:func:`hidden_representations`): a forward
    relation read off the layer before it, a backward one off the layer after it. ``layers``:
    a report's layers or a sweep record's layer summaries."""
    name = hid.get(_side(rel))
    e = layers.get(name) if name else None
    if not e:
        return float("nan")
    a = e.get("alpha") if e.get("alpha") is not None else e.get("alpha_cov")
    return nan((a or {}).get(rel))


def hidden_rga(layers: Dict[str, Any], hid: Dict[str, Any]) -> float:
    """The RGA of a hidden layer: mean of its forward (before the activation) and backward
    (after it) RGA, the finite ones."""
    return C.mean([hidden_alpha(layers, hid, "forward_RGA"), hidden_alpha(layers, hid, "backward_RGA")])


def hidden_label(hids: Sequence[Dict[str, Any]]) -> str:
    ks = [h["k"] for h in hids]
    if not ks:
        return "no hidden layer"
    return f"hidden layer {ks[0]}" if len(ks) == 1 else f"hidden layers {ks[0]}–{ks[-1]}"


# ----------------------------------------------------------------------------- claims both share
#: The paper's words behind the claims fc1 and fc2 share (verbatim; tests/test_claims.py checks
#: them against the paper's text).
QUOTE_RGA = ("six alignment relations to universally govern the formation of representations in most "
             "hidden layers of a neural network […] we show that the RGA holds well across a broad "
             "range of tasks in common training settings.")
QUOTE_EXPONENTS = ("almost all positive exponents we observed are within the range [1/3,3], which is "
                   "exactly the range of exponents that the theorem predicts […] the observed positive "
                   "exponents between the eigenvalues of the matrices are almost aways within the range "
                   "[1/3, 3]")


def rga_significance_claim(runs: Sequence[Tuple[int, Any, Dict[str, Any]]], hidden: Sequence[Dict[str, Any]],
                           *, source: str) -> C.Claim:
    """"The RGA holds in most hidden layers": for each hidden layer and side, the margin of its
    RGA over the side's own random baseline (:func:`~.claims.side_baseline`), per seed, then the
    mean margin with its t interval over seeds; a side is significant when its interval lies
    above 0. Holds when more than half of the sides are (:func:`~.claims.most_of`)."""
    rows, verdicts, details = [], [], {}
    n_every = 0
    for hid in hidden:
        for side, rel, letter in (("forward", "forward_RGA", "b"),
                                  ("backward", "backward_RGA", "a")):
            name = hid[side]
            if not name:
                continue
            margins, bases, alphas = [], [], []
            for _, rep, _ in runs:
                e = rep.layers.get(name)
                if not e:
                    continue
                b = C.side_baseline(e, letter, rel)
                a = hidden_alpha(rep.layers, hid, rel)
                alphas.append(a)
                bases.append(b["baseline"])
                margins.append(a - b["baseline"])
            iv = C.mean_interval(margins)
            v = C.interval_verdict(iv, 0.0)
            verdicts.append(v)
            n_every += v == C.HOLDS
            key = f"h{hid['k']} {'fwd' if side == 'forward' else 'bwd'}"
            rows.append(f"{key} {C.fmt(C.mean(alphas))}−{C.fmt(C.mean(bases))}: {iv.text(2, signed=True)}")
            details[key] = {"layer": name, "alpha": alphas, "baseline": bases, "margin": iv.to_dict()}
    verdict = C.most_of(verdicts)
    seeds = [s for s, _, _ in runs]
    n = len([v for v in verdicts if v != C.NA])
    measured = (f"sides of {hidden_label(hidden)} whose interval lies above their baseline: {n_every}/{n} "
                f"({C.seeds_text(len(seeds))}); RGA − baseline, mean [95 % CI]: " + "; ".join(rows)
                ) if rows else "no hidden layer measured"
    if verdict == C.UNDETERMINED and len(runs) < 2:
        measured += " (no interval from one seed; --seeds 3 gives one)"
    rule = ("most sides (> half) have their RGA above their own baseline (α of two random covariances "
            "of the side's dimension at its effective ranks): interval of α − baseline > 0")
    return C.make_claim("the RGA is significant in most hidden layers (each hidden layer seen before "
                        "and after its activation)", source, measured, rule, verdict, quote=QUOTE_RGA,
                        value=(n_every / n if n else None), details=details)


def exponent_claim(runs: Sequence[Tuple[int, Any, Dict[str, Any]]], hidden: Sequence[Dict[str, Any]], *,
                   source: str, eps: float = 0.1, min_fraction: float = 0.8) -> C.Claim:
    """"Almost all positive exponents are within [1/3, 3]" (:func:`~.claims.pairing_exponent_claim`,
    the paper's sorted-spectrum slopes) over both sides of every hidden layer."""
    items = []
    for hid in hidden:
        for side, letter in (("forward", "b"), ("backward", "a")):
            if hid[side]:
                items.append((f"h{hid['k']} {'fwd' if side == 'forward' else 'bwd'}", hid[side], letter))
    return C.pairing_exponent_claim(runs, items, source=source, quote=QUOTE_EXPONENTS, eps=eps,
                                    min_fraction=min_fraction)


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


def plot_scalings(layers: Dict[str, Any], hidden: Sequence[Dict[str, Any]], path, *, title: str,
                  floor: float = 1e-6) -> str:
    """Paper Fig. 20: for each hidden layer (both sides), the sorted eigenvalues of H against
    those of G, of H against Z and of G against Z on log–log axes (one panel per pair), each
    normalized by its largest, with dashed power laws of exponents 1/3, 1/2, 1, 2, 3 through
    (1, 1); the legend gives each curve's slope (:func:`~.claims.pairing_exponents`)."""
    import numpy as np
    fig = figure(13, 4)
    axes = fig.subplots(1, len(C.EXPONENT_PAIRS))
    grid = np.logspace(-12, 0, 200)
    for ax, (xn, yn) in zip(axes, C.EXPONENT_PAIRS):
        ax.set_xscale("log")
        ax.set_yscale("log")
        for hid in hidden:
            for side, letter in (("forward", "b"), ("backward", "a")):
                name = hid[side]
                e = layers.get(name) if name else None
                if not e:
                    continue
                spec = C.side_spectra(e, letter)
                lx, ly = spec.get(xn), spec.get(yn)
                if lx is None or ly is None:
                    continue
                lx = np.array([np.nan if v is None else v for v in lx], dtype=float)
                ly = np.array([np.nan if v is None else v for v in ly], dtype=float)
                n = min(len(lx), len(ly))
                lx, ly = lx[:n], ly[:n]
                if not n or not np.nanmax(lx) > 0 or not np.nanmax(ly) > 0:
                    continue
                lx, ly = lx / np.nanmax(lx), ly / np.nanmax(ly)
                ok = (lx > floor) & (ly > floor)
                k = C.pairing_exponents(e, letter, floor).get(f"{xn}–{yn}")
                ax.plot(ly[ok], lx[ok], ".-", ms=3, lw=0.8,
                        label=f"h{hid['k']} {'fwd' if side == 'forward' else 'bwd'}"
                              + (f" k={k:.2f}" if k is not None else ""))
        if ax.lines:  # the power laws within the data's range (they would dwarf it otherwise)
            xlim, ylim = ax.get_xlim(), ax.get_ylim()
            for k in (1 / 3, 1 / 2, 1, 2, 3):
                ax.plot(grid, grid ** k, "--", color="grey", lw=0.7)
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
        ax.set_xlabel(f"λ_{yn} / max (sorted)")
        ax.set_ylabel(f"λ_{xn} / max (sorted)")
        ax.set_title(f"{xn} against {yn}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title + "; dashed: exponents 1/3, 1/2, 1, 2, 3")
    return save_figure(fig, path)
