"""fc2: the high-dimensional teacher-student setting of paper appendix C.1 (Figs. 2, 4, 8).

Teacher y(x) = Σᵢ uᵢ sin(wᵢᵀx + bᵢ) with uᵢ ∈ R¹⁰⁰ (100 outputs); input x = ((1 − ϕ_x) Z + ϕ_x I) x',
x' ~ N(0, I₁₀₀), Z a Bernoulli(0.8) 0/1 matrix (correlated features for small ϕ_x). A 5-hidden-layer
ReLU net (6 Linear layers, width 100), SGD with learning rate 0.1, momentum 0.9, batch 100,
γ = 10⁻⁴; covariances on 3000 fresh points. A sweep of γ gives Fig. 8 (six α against γ) and
Fig. 4 (rank of the representation against α).

The paper trains 10⁵ steps (profile ``cuda``); the CPU default trains 1.2·10⁴ steps per γ. With
momentum 0.9 the effective step is η/(1 − β) = 1, so γ = 10⁻⁴ decays the weights by e⁻¹ in 10⁴
steps: the CPU run reaches about one weight-decay time at the paper's γ, and γ ≤ 10⁻⁵ are far
from stationary (the paper's small-γ runs are too, at 10⁵ steps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from . import claims as C
from . import fcnet
from .claims import baseline_claim, exponent_range_claim, mean_alpha, nan
from .runs import Context, RunResult

NAME = "fc2"
#: extras.json keys every run writes and the claims and figures read (`crh report` checks them)
EXTRAS = ("base", "weight_decay", "intermediate_layers", "hidden_input_layers")
DESCRIPTION = "high-dimensional teacher-student FC net (C.1 fc2): six α vs γ (Fig. 8), rank vs α (Fig. 4)"

_BASE = {
    "d_in": 100, "d_out": 100, "teacher_width": 100, "phi_x": 0.5,
    "width": 100, "depth": 6, "activation": "relu",
    "lr": 0.1, "momentum": 0.9, "batch_size": 100, "weight_decay": 1e-4,
    "steps": 12_000, "n_measure": 3000, "measure_batch": 1000,
    "weight_decays": [1e-6, 1e-5, 1e-4, 1e-3, 3e-3], "checkpoints": 5,
    "high_alpha": 0.7, "modules": None, "streams": ["h_a", "h_b", "g_a", "g_b"],
    "state_dtype": "float64", "threads": 1,
}

PROFILES: Dict[str, Dict[str, Any]] = {
    "cpu": dict(_BASE),
    "cuda": dict(_BASE, steps=100_000, weight_decays=[1e-6, 1e-5, 1e-4, 1e-3], checkpoints=10, threads=0),
    "tiny": dict(_BASE, d_in=16, d_out=8, teacher_width=16, width=16, depth=4, steps=150, n_measure=256,
                 measure_batch=128, weight_decays=[1e-5, 1e-3], checkpoints=3),
}


def intermediate_layers(cfg: Dict[str, Any], names) -> List[str]:
    """Linear layers with a hidden representation on both sides (layers.1 … layers.depth-2);
    with fewer than two of them, every Linear layer."""
    mid = [f"layers.{i}" for i in range(1, cfg["depth"] - 1)]
    mid = [n for n in mid if n in names]
    return mid if len(mid) >= 2 else [n for n in (f"layers.{i}" for i in range(cfg["depth"])) if n in names]


def run(cfg: Dict[str, Any], ctx: Context) -> RunResult:
    base_wd = float(cfg["weight_decay"])
    checkpoints = fcnet.checkpoint_steps(cfg["steps"], cfg["checkpoints"])
    _, rep, base = fcnet.train(cfg, ctx, weight_decay=base_wd, batch_size=cfg["batch_size"],
                               checkpoints=checkpoints, label=f"base γ={base_wd:g}")
    ctx.log(f"base run: loss {C.fmt(base['loss'], 4)}")
    reports, by_wd = {}, [base]
    for wd in cfg["weight_decays"]:
        if float(wd) == base_wd:
            continue
        _, r, rec = fcnet.train(cfg, ctx, weight_decay=float(wd), batch_size=cfg["batch_size"],
                                label=f"γ={wd:g}")
        reports[f"wd_{fcnet.tag(wd)}"] = r
        by_wd.append(rec)
    names = list(rep.layers)
    extras = {"base": base, "weight_decay": by_wd, "intermediate_layers": intermediate_layers(cfg, names),
              "hidden_input_layers": [n for n in names if n != "layers.0"]}
    return RunResult(rep, extras, cfg, reports)


def _median_alphas(record, layers):
    return {rel: C.median(nan(record["layers"][n]["alpha"].get(rel)) for n in layers if n in record["layers"])
            for rel in C.RELATIONS}


def claims(rep, extras: Dict[str, Any], cfg: Dict[str, Any]) -> List[C.Claim]:
    mid = extras["intermediate_layers"]
    wd = sorted(extras["weight_decay"], key=lambda r: r["weight_decay"])
    out: List[C.Claim] = []
    # Fig. 8: at a large γ all six relations hold strongly.
    top = wd[-1]
    med = _median_alphas(top, mid)
    thr = float(cfg.get("high_alpha", 0.7))
    worst = min(C.finite(med.values()), default=float("nan"))
    out.append(C.Claim(
        "all six α high at large γ (CRH nearly exact in intermediate layers)", "Fig. 8, §6 CRH",
        f"γ={top['weight_decay']:g}, median over {len(mid)} intermediate layers: "
        + ", ".join(f"{r.replace('_', ' ')} {C.fmt(v)}" for r, v in med.items()),
        f"every median α ≥ {thr}", None if worst != worst else worst >= thr, worst))
    out.append(C.monotone_claim(
        "alignment rises with weight decay", "Fig. 8, §6 fc1 (c)",
        [r["weight_decay"] for r in wd], [C.mean(mean_alpha(r["layers"][n]) for n in mid) for r in wd],
        x_name="γ", y_name="mean of the six α over intermediate layers"))
    # §6 "Breaking of CRH": at a small γ the strongest are forward RWA and backward RGA.
    low = wd[0]
    lm = _median_alphas(low, mid)
    fwd = {r: lm[r] for r in C.RELATIONS if r.startswith("forward")}
    bwd = {r: lm[r] for r in C.RELATIONS if r.startswith("backward")}
    f_best = max(fwd, key=lambda r: fwd[r] if fwd[r] == fwd[r] else -9.0)  # NaN never wins
    b_best = max(bwd, key=lambda r: bwd[r] if bwd[r] == bwd[r] else -9.0)
    out.append(C.Claim(
        "at small γ the strongest relations are the forward RWA and the backward RGA",
        "§6 Breaking of CRH (Fig. 8)",
        f"γ={low['weight_decay']:g}, medians: " + ", ".join(f"{r.replace('_', ' ')} {C.fmt(v)}" for r, v in lm.items())
        + f"; strongest forward: {f_best.split('_')[1]}, backward: {b_best.split('_')[1]}",
        "argmax of the forward medians is RWA and of the backward medians is RGA",
        f_best == "forward_RWA" and b_best == "backward_RGA"))
    # Fig. 4: rank of the representation against the backward RGA, over layers and γ.
    ranks, alphas = [], []
    for r in wd:
        for n in extras["hidden_input_layers"]:
            e = r["layers"].get(n)
            if not e:
                continue
            d = (e.get("dims") or {}).get("h_a")
            if d and e.get("effective_rank_h") is not None and e["alpha"].get("backward_RGA") is not None:
                ranks.append(e["effective_rank_h"] / d)
                alphas.append(e["alpha"]["backward_RGA"])
    rho = C.pearson(ranks, alphas)
    out.append(C.Claim(
        "the rank of the representation is negatively correlated with α (compact ⇒ aligned)", "Fig. 4",
        f"Pearson(effective rank of H_a / D, backward α(H_a, G_a)) = {C.fmt(rho)} over {len(ranks)} "
        f"(layer, γ) points; rank/D {C.fmt(min(ranks, default=float('nan')))}…{C.fmt(max(ranks, default=float('nan')))}",
        "Pearson ≤ −0.5 (equivalently: rank deficiency correlates positively with α)",
        None if rho != rho else rho <= -0.5, rho))
    out.append(baseline_claim(rep, list(rep.layers), source="§6 RGA (baseline ≈ 0.14)",
                              claim="the RGA is significant in every layer (forward and backward, base γ)",
                              skip=["layers.0:backward_RGA"]))
    out.append(exponent_range_claim(rep, list(rep.layers), source="§5, §6, C.8"))
    return out


def figures(rep, extras: Dict[str, Any], cfg: Dict[str, Any], out_dir: Path) -> List[str]:
    out_dir = Path(out_dir)
    mid = extras["intermediate_layers"]
    return [
        fcnet.plot_sweep(extras["weight_decay"], "weight_decay", mid, out_dir / "alpha_vs_weight_decay.png",
                         title=f"fc2: alignment vs weight decay ({cfg['steps']} steps; paper Fig. 8)",
                         xlabel="weight decay γ"),
        fcnet.plot_rank_vs_alpha(extras["weight_decay"], extras["hidden_input_layers"], out_dir / "rank_vs_alpha.png",
                                 title="fc2: rank deficiency vs backward RGA (paper Fig. 4)"),
        fcnet.plot_history(extras["base"], mid, out_dir / "alpha_over_training.png",
                           title=f"fc2: RGA over training (γ={cfg['weight_decay']:g})"),
    ]
