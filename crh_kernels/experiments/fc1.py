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

from pathlib import Path
from typing import Any, Dict, List

from . import claims as C
from . import fcnet
from .claims import baseline_claim, exponent_range_claim, rga
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
    "state_dtype": "float64", "threads": 1,
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


def _layer_rga(records, layer):
    return [rga(r["layers"][layer]) if layer in r["layers"] else float("nan") for r in records]


def claims(rep, extras: Dict[str, Any], cfg: Dict[str, Any]) -> List[C.Claim]:
    hidden = extras["hidden_layers"]
    out: List[C.Claim] = []
    wd = sorted(extras["weight_decay"], key=lambda r: r["weight_decay"])
    out.append(C.monotone_claim(
        "α rises with weight decay (larger γ always aligns better)", "§6 fc1 (c), Fig. 16",
        [r["weight_decay"] for r in wd], [C.mean(rga(r["layers"][n]) for n in hidden) for r in wd],
        x_name="γ", y_name="mean RGA over hidden layers"))
    vals = [rga(extras["base"]["layers"][n]) for n in hidden]
    c = C.monotone_claim("later layers align better (gradual alignment)", "§6 fc1 (a), Fig. 18",
                         list(range(len(hidden))), vals, x_name="layer index", y_name="RGA")
    top = wd[-1]
    c.measured += (f" (base γ); at γ={top['weight_decay']:g}: "
                   + C.fmt_list([rga(top["layers"][n]) for n in hidden]))
    out.append(c)
    bs = sorted(extras["batch_size"], key=lambda r: r["batch_size"])
    if len(hidden) >= 2:
        out.append(C.monotone_claim(
            "earlier layers align worse as the batch size grows", "§6 fc1 (b), Fig. 16",
            [r["batch_size"] for r in bs], _layer_rga(bs, hidden[0]),
            x_name="B", y_name=f"RGA of {hidden[0]}", increasing=False))
        out.append(C.monotone_claim(
            "later layers align better as the batch size grows", "§6 fc1 (b), Fig. 16",
            [r["batch_size"] for r in bs], _layer_rga(bs, hidden[-1]),
            x_name="B", y_name=f"RGA of {hidden[-1]}", increasing=True))
    out.append(baseline_claim(rep, hidden, source="§6 RGA (baseline ≈ 0.14), Fig. 16",
                              claim="the RGA is significant in every hidden layer (forward and backward)",
                              skip=[f"{hidden[0]}:backward_RGA"] if hidden else []))
    out.append(exponent_range_claim(rep, hidden, source="§5, §6, C.8 Fig. 20"))
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
