"""fc1: the controlled teacher-student study of paper appendix C.1 and §6 "Fully Connected Nets".

x ∈ R¹⁰⁰ ~ N(0, I), y = Σᵢ uᵢ sin(wᵢᵀx + bᵢ) (100 hidden sin units, scalar output); a ReLU net of
depth D = 4 (Linear layers), width d = 100, trained by online SGD with batch B = 100 and weight
decay γ; covariances of every Linear layer on 3000 fresh points. Sweeps of γ and B around the
base setting; the base run is also measured along training.

The paper trains 10⁵ steps at γ = 2·10⁻⁵ (profile ``cuda``; learning rate not stated, 0.1 here).
The CPU default trains 10⁴ steps. Alignment forms on the weight-decay time scale 1/(ηγ) steps,
so with 10× fewer steps the CPU profile's base γ is 10⁻³ (ηγT = 1 decay time) and its γ grid is
10⁻⁵ … 3·10⁻³; the batch-size sweep runs at the base γ.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from . import claims as C
from . import fcnet
from .runs import Context, RunResult

NAME = "fc1"
#: extras.json keys every run writes and the claims and figures read (`crh report` checks them)
EXTRAS = ("base", "weight_decay", "batch_size", "hidden_layers")
DESCRIPTION = "teacher-student FC net (C.1 fc1): α vs weight decay, batch size, depth, training time"

_BASE = {
    "d_in": 100, "d_out": 1, "teacher_width": 100, "phi_x": None,
    "width": 100, "depth": 4, "activation": "relu",
    "lr": 0.1, "momentum": 0.0, "batch_size": 100, "weight_decay": 1e-3,
    "steps": 10_000, "n_measure": 3000, "measure_batch": 1000,
    "weight_decays": [1e-5, 1e-4, 1e-3, 3e-3], "batch_sizes": [20, 100, 500],
    "checkpoints": 6, "modules": None, "streams": ["h_a", "h_b", "g_a", "g_b"],
    "state_dtype": "float64", "threads": 1, "seeds": 1,
}

PROFILES: Dict[str, Dict[str, Any]] = {
    "cpu": dict(_BASE),
    "cuda": dict(_BASE, steps=100_000, weight_decay=2e-5, weight_decays=[2e-6, 2e-5, 1e-4, 3e-4, 1e-3],
                 batch_sizes=[10, 100, 1000], checkpoints=10, threads=0),
    "tiny": dict(_BASE, d_in=16, teacher_width=16, width=16, steps=150, n_measure=256, measure_batch=128,
                 weight_decays=[1e-3, 1e-2], batch_sizes=[20, 100], checkpoints=3),
}


def run(cfg: Dict[str, Any], ctx: Context) -> RunResult:
    base_wd, base_bs = float(cfg["weight_decay"]), int(cfg["batch_size"])
    checkpoints = fcnet.checkpoint_steps(cfg["steps"], cfg["checkpoints"])
    _, rep, base = fcnet.train(cfg, ctx, weight_decay=base_wd, batch_size=base_bs,
                               checkpoints=checkpoints, label=f"base γ={base_wd:g} B={base_bs}")
    ctx.log(f"base run: loss {C.fmt(base['loss'], 4)}")
    reports = {}
    by_wd: List[Dict[str, Any]] = [base]
    for wd in cfg["weight_decays"]:
        if float(wd) == base_wd:
            continue
        _, r, rec = fcnet.train(cfg, ctx, weight_decay=float(wd), batch_size=base_bs, label=f"γ={wd:g}")
        reports[f"wd_{fcnet.tag(wd)}"] = r
        by_wd.append(rec)
    by_bs: List[Dict[str, Any]] = [base]
    for bs in cfg["batch_sizes"]:
        if int(bs) == base_bs:
            continue
        _, r, rec = fcnet.train(cfg, ctx, weight_decay=base_wd, batch_size=int(bs), label=f"B={bs}")
        reports[f"bs_{int(bs)}"] = r
        by_bs.append(rec)
    extras = {"base": base, "weight_decay": by_wd, "batch_size": by_bs,
              "hidden_layers": fcnet.hidden_layers(cfg, list(rep.layers))}
    return RunResult(rep, extras, cfg, reports)


#: The paper's words behind each fc1 claim (verbatim; tests/test_claims.py checks them against
#: the paper's text).
QUOTE_GAMMA = ("weight decay γ affects the alignment significantly and systematically; larger γ always "
               "leads to better alignment.")
QUOTE_GRADUAL = ("Gradual Alignment: deeper layers tend to have better alignment […] This is consistent "
                 "with the observation that the CRH holds much better in the latter layers than in the "
                 "beginning layers.")
QUOTE_BATCH = ("batch size B affects the alignment significantly; earlier layers have worse alignment as "
               "B increases; later layers have better alignment as B increases")


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
    xs, ys, by = [], [], {}
    for _, _, ex in runs:
        for r in ex["weight_decay"]:
            y = C.mean(fcnet.hidden_rga(r["layers"], h) for h in hidden)
            xs.append(math.log10(r["weight_decay"]))
            ys.append(y)
            by.setdefault(r["weight_decay"], []).append(y)
    out.append(C.trend_claim(
        "α rises with weight decay (larger γ always aligns better)", "§6 fc1 (c), Fig. 16", xs, ys,
        x_name="log10 γ", y_name=f"mean RGA over {label}", quote=QUOTE_GAMMA, by_x=by,
        x_label=lambda x: f"γ={x:g}"))
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
    if len(hidden) >= 2:
        for hid, increasing, what in ((hidden[0], False, "earlier layers align worse as the batch size grows"),
                                      (hidden[-1], True, "later layers align better as the batch size grows")):
            xs, ys, by = [], [], {}
            for _, _, ex in runs:
                for r in ex["batch_size"]:
                    y = fcnet.hidden_rga(r["layers"], hid)
                    xs.append(math.log10(r["batch_size"]))
                    ys.append(y)
                    by.setdefault(r["batch_size"], []).append(y)
            out.append(C.trend_claim(
                what, "§6 fc1 (b), Fig. 16", xs, ys, x_name="log10 B",
                y_name=f"RGA of hidden layer {hid['k']}", increasing=increasing, quote=QUOTE_BATCH,
                by_x=by, x_label=lambda b: f"B={b:g}"))
    out.append(fcnet.rga_significance_claim(runs, hidden, source="abstract, §6 RGA (baseline: §6 llm)"))
    out.append(fcnet.exponent_claim(runs, hidden, source="§5, §6, C.8 Fig. 20"))
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
    return paths
