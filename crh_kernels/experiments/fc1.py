"""fc1: the controlled teacher-student study of paper appendix C.1 and §6 "Fully Connected Nets".

x ∈ R¹⁰⁰ ~ N(0, I), y = Σᵢ uᵢ sin(wᵢᵀx + bᵢ) (100 hidden sin units, scalar output); a ReLU net of
depth D = 4 (Linear layers), width d = 100, trained by online SGD with batch B = 100 and weight
decay γ; covariances of every Linear layer on 3000 fresh points. Sweeps of γ and B around the
base setting; the base run is also measured along training.

The paper trains 10⁵ steps at γ = 2·10⁻⁵ (profile ``paper``, also under the name ``cuda``;
learning rate not stated, 0.1 here). The CPU default trains 10⁴ steps. Alignment forms on the
weight-decay time scale 1/(ηγ) steps, so with 10× fewer steps the CPU profile's base γ is 10⁻³
(ηγT = 1 decay time) and its γ grid is 10⁻⁵ … 3·10⁻³; the batch-size sweep runs at the base γ.

The setting ``sweeps`` picks the parts a run trains besides the base run: ``weight_decay``,
``batch_size`` (both by default), ``width`` (Fig. 16: ``widths`` with SGD), ``adam`` (Fig. 17: the
same widths with Adam, learning rate ``adam_lr``) and ``tanh`` (C.8, Fig. 20: a tanh net with
``tanh_depth`` Linear layers, i.e. 4 hidden layers, the same width); the ``paper`` profile runs
all five. A part that is not run has no claim and no figure.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import claims as C
from . import fcnet
from .runs import Context, ExperimentError, RunResult

NAME = "fc1"
#: extras.json keys every run writes and the claims and figures read (`crh report` checks them)
EXTRAS = ("base", "weight_decay", "batch_size", "hidden_layers")
DESCRIPTION = ("teacher-student FC net (C.1 fc1): α vs weight decay, batch size, depth, training time; "
               "width with SGD and Adam, the tanh net (Figs. 16, 17, 20; profile paper)")
#: trains with checkpoints: `crh run fc1 --resume` continues an interrupted run
RESUMABLE = True
#: The parts a run can train (setting ``sweeps``); the base run is always trained.
SWEEPS = ("weight_decay", "batch_size", "width", "adam", "tanh")

_BASE = {
    "d_in": 100, "d_out": 1, "teacher_width": 100, "phi_x": None,
    "width": 100, "depth": 4, "activation": "relu", "optimizer": "sgd",
    "lr": 0.1, "momentum": 0.0, "batch_size": 100, "weight_decay": 1e-3,
    "steps": 10_000, "n_measure": 3000, "measure_batch": 1000,
    "weight_decays": [1e-5, 1e-4, 1e-3, 3e-3], "batch_sizes": [20, 100, 500],
    "sweeps": ["weight_decay", "batch_size"], "widths": [25, 100, 400],
    "adam_lr": 1e-3, "tanh_depth": 5, "similar_tol": 0.1,
    "checkpoints": 6, "modules": None, "streams": ["h_a", "h_b", "g_a", "g_b"],
    "state_dtype": "float64", "raw_moments": True, "checkpoint_every": 2000, "threads": 1, "seeds": 1,
}

#: The paper's setup (appendix C.1 fc1, Figs. 16–18, 20): 10⁵ steps, γ = 2·10⁻⁵, B = 100,
#: D = 4, d = 100, 3000 fresh points. The grids of γ, B and width are ours (the paper's figure
#: axes are not in its text): decades around the paper's values.
PAPER = dict(_BASE, steps=100_000, weight_decay=2e-5, weight_decays=[2e-6, 2e-5, 2e-4, 2e-3],
             batch_sizes=[10, 100, 1000], sweeps=list(SWEEPS), widths=[25, 100, 400], checkpoints=10,
             checkpoint_every=5000)

PROFILES: Dict[str, Dict[str, Any]] = {
    "cpu": dict(_BASE),
    "paper": PAPER,
    "cuda": dict(PAPER),  # the same settings, kept under the name `--device cuda` picks
    "tiny": dict(_BASE, d_in=16, teacher_width=16, width=16, steps=150, n_measure=256, measure_batch=128,
                 weight_decays=[1e-3, 1e-2], batch_sizes=[20, 100], widths=[8, 16], tanh_depth=3,
                 checkpoints=3, checkpoint_every=50),
}


def _sweeps(cfg: Dict[str, Any]) -> List[str]:
    parts = cfg["sweeps"]
    parts = [parts] if isinstance(parts, str) else list(parts)
    bad = [p for p in parts if p not in SWEEPS]
    if bad:
        raise ExperimentError(f"setting sweeps: unknown part {bad[0]!r}; choose among {', '.join(SWEEPS)}")
    return parts


def run(cfg: Dict[str, Any], ctx: Context) -> RunResult:
    parts = _sweeps(cfg)
    base_wd, base_bs, base_width = float(cfg["weight_decay"]), int(cfg["batch_size"]), int(cfg["width"])
    checkpoints = fcnet.checkpoint_steps(cfg["steps"], cfg["checkpoints"])
    _, rep, base = fcnet.train(cfg, ctx, weight_decay=base_wd, batch_size=base_bs,
                               checkpoints=checkpoints, label=f"base γ={base_wd:g} B={base_bs}", key="base")
    base["width"] = base_width
    ctx.log(f"base run: loss {C.fmt(base['loss'], 4)}")
    reports = {}
    by_wd: List[Dict[str, Any]] = [base]
    for wd in (cfg["weight_decays"] if "weight_decay" in parts else []):
        if float(wd) == base_wd:
            continue
        key = f"wd_{fcnet.tag(wd)}"
        _, r, rec = fcnet.train(cfg, ctx, weight_decay=float(wd), batch_size=base_bs, label=f"γ={wd:g}", key=key)
        reports[key] = r
        by_wd.append(rec)
    by_bs: List[Dict[str, Any]] = [base]
    for bs in (cfg["batch_sizes"] if "batch_size" in parts else []):
        if int(bs) == base_bs:
            continue
        key = f"bs_{int(bs)}"
        _, r, rec = fcnet.train(cfg, ctx, weight_decay=base_wd, batch_size=int(bs), label=f"B={bs}", key=key)
        reports[key] = r
        by_bs.append(rec)
    extras = {"base": base, "weight_decay": by_wd, "batch_size": by_bs,
              "hidden_layers": fcnet.hidden_layers(cfg, list(rep.layers)), "sweeps": parts}
    if "width" in parts:  # Fig. 16: width, SGD
        recs = [base]
        for w in cfg["widths"]:
            if int(w) == base_width:
                continue
            key = f"width_{int(w)}"
            _, r, rec = fcnet.train(dict(cfg, width=int(w)), ctx, weight_decay=base_wd, batch_size=base_bs,
                                    label=f"width {w}", key=key)
            rec["width"] = int(w)
            reports[key] = r
            recs.append(rec)
        extras["width"] = recs
    if "adam" in parts:  # Fig. 17: the same with Adam
        recs = []
        for w in cfg["widths"]:
            key = f"adam_width_{int(w)}"
            _, r, rec = fcnet.train(dict(cfg, width=int(w), optimizer="adam", lr=float(cfg["adam_lr"])), ctx,
                                    weight_decay=base_wd, batch_size=base_bs, label=f"Adam width {w}", key=key)
            rec["width"] = int(w)
            reports[key] = r
            recs.append(rec)
        extras["adam_width"] = recs
    if "tanh" in parts:  # C.8, Fig. 20: a tanh net with 4 hidden layers, the same width
        tcfg = _tanh_config(cfg)
        _, r, rec = fcnet.train(tcfg, ctx, weight_decay=base_wd, batch_size=base_bs,
                                label=f"tanh depth {tcfg['depth']}", key="tanh")
        reports["tanh"] = r
        rec["depth"] = tcfg["depth"]
        # the whole layer entries: the exponent and RGA claims need spectra and baselines
        extras["tanh"] = dict(rec, report_layers=r.layers, floor=float(r.meta.get("floor", 1e-6)))
    return RunResult(rep, extras, cfg, reports)


def _tanh_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return dict(cfg, activation="tanh", depth=int(cfg["tanh_depth"]))


#: The paper's words behind each fc1 claim (verbatim; tests/test_claims.py checks them against
#: the paper's text).
QUOTE_GAMMA = ("weight decay γ affects the alignment significantly and systematically; larger γ always "
               "leads to better alignment.")
QUOTE_GRADUAL = ("Gradual Alignment: deeper layers tend to have better alignment […] This is consistent "
                 "with the observation that the CRH holds much better in the latter layers than in the "
                 "beginning layers.")
QUOTE_BATCH = ("batch size B affects the alignment significantly; earlier layers have worse alignment as "
               "B increases; later layers have better alignment as B increases")
QUOTE_WIDTH_SGD = "wider networks have similar level of alignment as thinner ones for SGD"
QUOTE_WIDTH_ADAM = ("for Adam, it is more subtle: early layers have worse alignment for a large width, later "
                    "layers have better alignment for a large width")
QUOTE_TANH = ("See Figure 20. The task is the same as other fully connected net experiments. The model is a "
              "4-hidden-layer tanh net with the same width.")


def claims(rep, extras: Dict[str, Any], cfg: Dict[str, Any]) -> List[C.Claim]:
    """The claims of one run (one seed: numbers that need an interval over seeds are
    undetermined; :func:`claims_over_seeds` with several)."""
    return claims_over_seeds([(None, rep, extras)], cfg)


def claims_over_seeds(runs: Sequence[Tuple[Any, Any, Dict[str, Any]]], cfg: Dict[str, Any]) -> List[C.Claim]:
    """The claims of §6 "Fully Connected Nets (fc1)" over ``runs`` = ``[(seed, report, extras)]``:
    trends as least-squares slopes over every (setting, seed) point with their t intervals, the
    other numbers as means over seeds with their t intervals, every verdict from the interval."""
    rep0 = runs[0][1]
    hidden = fcnet.hidden_representations(cfg, list(rep0.layers))
    label = fcnet.hidden_label(hidden)
    out: List[C.Claim] = []
    # (c) γ: mean RGA over the hidden layers against log10 γ.
    if len({r["weight_decay"] for r in runs[0][2]["weight_decay"]}) >= 2:
        out.append(_gamma_claim(runs, hidden, label))
    # (1) gradual alignment: RGA of hidden layer k against k, at the base γ.
    xs, ys, by = [], [], {}
    for _, _, ex in runs:
        for h in hidden:
            y = fcnet.hidden_rga(ex["base"]["layers"], h)
            xs.append(h["k"])
            ys.append(y)
            by.setdefault(h["k"], []).append(y)
    out.append(C.trend_claim(
        "later layers align better (gradual alignment)", "§6 fc1 (1), §5, Fig. 18", xs, ys,
        x_name="hidden layer k", y_name=f"RGA (base γ={cfg['weight_decay']:g})", quote=QUOTE_GRADUAL,
        by_x=by, x_label=lambda k: f"h{k}"))
    # (b) batch size: the first hidden layer's RGA falls with log B, the last one's rises.
    if len(hidden) >= 2 and len({r["batch_size"] for r in runs[0][2]["batch_size"]}) >= 2:
        out += _early_late_claims(runs, hidden, "batch_size", "batch size", "B", QUOTE_BATCH,
                                  "§6 fc1 (b), Fig. 16")
    out.append(fcnet.rga_significance_claim(runs, hidden, source="abstract, §6 RGA (baseline: §6 llm)"))
    out.append(fcnet.exponent_claim(runs, hidden, source="§5, §6, C.8 Fig. 20"))
    ex0 = runs[0][2]
    if len(ex0.get("width") or []) >= 2:  # Fig. 16: width with SGD
        out.append(_similar_claim(runs, hidden, label, float(cfg.get("similar_tol", 0.1))))
    if len(hidden) >= 2 and len(ex0.get("adam_width") or []) >= 2:  # Fig. 17: width with Adam
        out += _early_late_claims(runs, hidden, "adam_width", "width with Adam", "width", QUOTE_WIDTH_ADAM,
                                  "§6 fc1 (b), Fig. 17", key="width")
    if ex0.get("tanh"):  # C.8, Fig. 20
        out += _tanh_claims(runs, cfg)
    return out


def _sweep_points(runs, sweep: str, y_of, key: Optional[str] = None):
    """``(xs, ys, by)`` of a sweep over every seed: x = log10 of the swept setting ``key``
    (default ``sweep``), y = ``y_of(run record)``, ``by``: setting -> its y values."""
    key = key or sweep
    xs, ys, by = [], [], {}
    for _, _, ex in runs:
        for r in ex[sweep]:
            y = y_of(r)
            xs.append(math.log10(r[key]))
            ys.append(y)
            by.setdefault(r[key], []).append(y)
    return xs, ys, by


def _mean_rga(hidden):
    return lambda r: C.mean(fcnet.hidden_rga(r["layers"], h) for h in hidden)


def _gamma_claim(runs, hidden, label) -> C.Claim:
    xs, ys, by = _sweep_points(runs, "weight_decay", _mean_rga(hidden))
    return C.trend_claim(
        "α rises with weight decay (larger γ always aligns better)", "§6 fc1 (c), Fig. 16", xs, ys,
        x_name="log10 γ", y_name=f"mean RGA over {label}", quote=QUOTE_GAMMA, by_x=by,
        x_label=lambda x: f"γ={x:g}")


def _early_late_claims(runs, hidden, sweep: str, what: str, x: str, quote: str, source: str,
                       key: Optional[str] = None) -> List[C.Claim]:
    """"Earlier layers align worse, later ones better, as ``x`` grows": the RGA of the first
    hidden layer against log10 x (slope < 0) and of the last one (slope > 0)."""
    out = []
    for hid, increasing, claim in ((hidden[0], False, f"earlier layers align worse as the {what} grows"),
                                   (hidden[-1], True, f"later layers align better as the {what} grows")):
        xs, ys, by = _sweep_points(runs, sweep, lambda r, hid=hid: fcnet.hidden_rga(r["layers"], hid), key)
        out.append(C.trend_claim(
            claim, source, xs, ys, x_name=f"log10 {x}", y_name=f"RGA of hidden layer {hid['k']}",
            increasing=increasing, quote=quote, by_x=by, x_label=lambda v, x=x: f"{x}={v:g}"))
    return out


def _similar_claim(runs, hidden, label: str, tol: float) -> C.Claim:
    """"Wider networks have similar alignment as thinner ones (SGD)": the least-squares slope
    of the mean RGA over the hidden layers against log10 width, with its 95 % interval; holds
    when the whole interval lies within ±``tol`` (α per decade of width), FAILS when it lies
    wholly outside, undetermined otherwise (an equivalence test: "no trend" is not shown by an
    interval that merely contains 0)."""
    xs, ys, by = _sweep_points(runs, "width", _mean_rga(hidden))
    iv = C.slope_interval(xs, ys)
    if not math.isfinite(iv.estimate):
        verdict = C.NA
    elif not iv.defined:
        verdict = C.UNDETERMINED
    elif -tol < iv.lo and iv.hi < tol:
        verdict = C.HOLDS
    elif iv.lo > tol or iv.hi < -tol:
        verdict = C.FAILS
    else:
        verdict = C.UNDETERMINED
    measured = (f"slope of the mean RGA over {label} per unit of log10 width: {iv.text(3, signed=True)} "
                f"({iv.n} points, {iv.df} df); mean by setting: "
                + ", ".join(f"width={w:g}→{C.fmt(C.mean(v))}" for w, v in sorted(by.items())))
    if verdict == C.UNDETERMINED:
        measured += C._why_undetermined(iv)
    rule = f"95 % interval of the slope within ±{tol:g} (α per decade of width)"
    return C.make_claim("wider nets align as well as thinner ones with SGD", "§6 fc1 (b), Fig. 16", measured,
                        rule, verdict, quote=QUOTE_WIDTH_SGD, value=iv.estimate, details={"slope": iv.to_dict()})


class _Layers:
    """What the shared claims read off a report (``layers``, ``meta``), from a sweep record that
    kept the whole layer entries (the tanh net's ``report_layers``)."""

    def __init__(self, layers, floor: float):
        self.layers, self.meta = layers, {"floor": floor}


def _tanh_claims(runs, cfg) -> List[C.Claim]:
    """C.8 / Fig. 20 on the tanh net: the RGA in its hidden layers and its exponents (the
    sorted-eigenvalue slopes) in [1/3, 3]."""
    tcfg = _tanh_config(cfg)
    tanh_runs = [(seed, _Layers(ex["tanh"]["report_layers"], ex["tanh"].get("floor", 1e-6)), ex)
                 for seed, _, ex in runs if ex.get("tanh")]
    hidden = fcnet.hidden_representations(tcfg, list(tanh_runs[0][1].layers))
    rga = fcnet.rga_significance_claim(tanh_runs, hidden, source="C.8, Fig. 20 (tanh net)")
    exp = fcnet.exponent_claim(tanh_runs, hidden, source="C.8, Fig. 20 (tanh net)")
    out = []
    for c in (rga, exp):
        c.claim = f"tanh net ({tcfg['depth'] - 1} hidden layers): {c.claim}"
        c.quote = QUOTE_TANH + " […] " + c.quote
        out.append(c)
    return out


def figures(rep, extras: Dict[str, Any], cfg: Dict[str, Any], out_dir: Path) -> List[str]:
    hidden = extras["hidden_layers"]
    out_dir = Path(out_dir)
    paths = [
        fcnet.plot_sweep(extras["weight_decay"], "weight_decay", hidden, out_dir / "alpha_vs_weight_decay.png",
                         title=f"fc1: alignment vs weight decay (B={cfg['batch_size']}, {cfg['steps']} steps)",
                         xlabel="weight decay γ"),
        fcnet.plot_sweep(extras["batch_size"], "batch_size", hidden, out_dir / "alpha_vs_batch_size.png",
                         title=f"fc1: alignment vs batch size (γ={cfg['weight_decay']:g})", xlabel="batch size B"),
        fcnet.plot_history(extras["base"], hidden, out_dir / "alpha_over_training.png",
                           title=f"fc1: RGA over training (γ={cfg['weight_decay']:g}, B={cfg['batch_size']})"),
    ]
    if len(extras.get("width") or []) >= 2:
        paths.append(fcnet.plot_sweep(extras["width"], "width", hidden, out_dir / "alpha_vs_width.png",
                                      title=f"fc1: alignment vs width, SGD (γ={cfg['weight_decay']:g}; paper Fig. 16)",
                                      xlabel="width d"))
    if len(extras.get("adam_width") or []) >= 2:
        paths.append(fcnet.plot_sweep(extras["adam_width"], "width", hidden, out_dir / "alpha_vs_width_adam.png",
                                      title=f"fc1: alignment vs width, Adam lr {cfg['adam_lr']:g} "
                                            f"(γ={cfg['weight_decay']:g}; paper Fig. 17)", xlabel="width d"))
    if extras.get("tanh"):
        tcfg = _tanh_config(cfg)
        t = extras["tanh"]
        hid = fcnet.hidden_representations(tcfg, list(t["report_layers"]))
        paths.append(fcnet.plot_scalings(t["report_layers"], hid, out_dir / "tanh_scalings.png",
                                         floor=float(t.get("floor", 1e-6)),
                                         title=f"fc1 tanh net ({tcfg['depth'] - 1} hidden layers): sorted "
                                               "eigenvalue pairs (paper Fig. 20)"))
    return paths
