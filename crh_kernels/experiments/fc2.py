"""fc2: the high-dimensional teacher-student setting of paper appendix C.1 (Figs. 2, 4, 8).

Teacher y(x) = Σᵢ uᵢ sin(wᵢᵀx + bᵢ) with uᵢ ∈ R¹⁰⁰ (100 outputs); input x = ((1 − ϕ_x) Z + ϕ_x I) x',
x' ~ N(0, I₁₀₀), Z a Bernoulli(0.8) 0/1 matrix (correlated features for small ϕ_x). A 5-hidden-layer
ReLU net (6 Linear layers, width 100), SGD with learning rate 0.1, momentum 0.9, batch 100,
γ = 10⁻⁴; covariances on 3000 fresh points. A sweep of γ gives Fig. 8 (six α against γ) and
Fig. 4 (rank of the representation against α).

The paper trains 10⁵ steps (profile ``paper``, also under the name ``cuda``); the CPU default
trains 1.2·10⁴ steps per γ. With
momentum 0.9 the effective step is η/(1 − β) = 1, so γ = 10⁻⁴ decays the weights by e⁻¹ in 10⁴
steps: the CPU run reaches about one weight-decay time at the paper's γ, and γ ≤ 10⁻⁵ are far
from stationary (the paper's small-γ runs are too, at 10⁵ steps).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from . import claims as C
from . import fcnet
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
    "weight_decays": [1e-6, 1e-5, 1e-4, 1e-3, 3e-3], "checkpoints": 5, "optimizer": "sgd",
    "high_alpha": 0.7, "modules": None, "streams": ["h_a", "h_b", "g_a", "g_b"],
    "state_dtype": "float64", "raw_moments": True, "checkpoint_every": 2000, "threads": 1, "seeds": 1,
}

#: The paper's setup (appendix C.1 fc2): SGD, learning rate 0.1, momentum 0.9, γ = 10⁻⁴, 10⁵ steps,
#: B = 100, 5 hidden layers of width 100, ϕ_x = 0.5, 3000 fresh points. The γ grid is the CPU
#: profile's (Fig. 4 names "from 10^{-6} to 10^{-4}"; Fig. 8's axis is not in the text).
PAPER = dict(_BASE, steps=100_000, checkpoints=10, checkpoint_every=5000)

PROFILES: Dict[str, Dict[str, Any]] = {
    "cpu": dict(_BASE),
    "paper": PAPER,
    "cuda": dict(PAPER),  # the same settings, kept under the name `--device cuda` picks
    "tiny": dict(_BASE, d_in=16, d_out=8, teacher_width=16, width=16, depth=4, steps=150, n_measure=256,
                 measure_batch=128, weight_decays=[1e-5, 1e-3], checkpoints=3, checkpoint_every=50),
}

#: trains with checkpoints: `crh run fc2 --resume` continues an interrupted run
RESUMABLE = True


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
                               checkpoints=checkpoints, label=f"base γ={base_wd:g}", key="base")
    ctx.log(f"base run: loss {C.fmt(base['loss'], 4)}")
    reports, by_wd = {}, [base]
    for wd in cfg["weight_decays"]:
        if float(wd) == base_wd:
            continue
        key = f"wd_{fcnet.tag(wd)}"
        _, r, rec = fcnet.train(cfg, ctx, weight_decay=float(wd), batch_size=cfg["batch_size"],
                                label=f"γ={wd:g}", key=key)
        reports[key] = r
        by_wd.append(rec)
    names = list(rep.layers)
    extras = {"base": base, "weight_decay": by_wd, "intermediate_layers": intermediate_layers(cfg, names),
              "hidden_input_layers": [n for n in names if n != "layers.0"]}
    return RunResult(rep, extras, cfg, reports)


#: The paper's words behind each fc2 claim (verbatim; tests/test_claims.py checks them against
#: the paper's text).
QUOTE_LARGE = ("all six relations (Eq. (3)-(5)) hold strongly at a large weight decay […] when the weight "
               "decay is not too small, the CRH is quite close to being perfectly satisfied for "
               "intermediate layers.")
QUOTE_GAMMA = ("weight decay γ affects the alignment significantly and systematically; larger γ always "
               "leads to better alignment.")
QUOTE_SMALL_ONE = "For a small weight decay, at least one forward and backward relation holds strongly."
QUOTE_READING_6 = ("at a small weight decay, the strongest alignments are the forward-RWA and the "
                   "backward-RGA, which will be presented in the experiment in Figure 8")
QUOTE_READING_10 = (r"when γ is small, the forward alignment between H_b and WW^{\dagger} are strong (because "
                    r"the prefactor is independent of γ), while the other two are weak […] Similarly, the "
                    r"backward alignment between G_a and $W^{\dagger}W$ is strong for a small γ . […] At a "
                    r"small γ , the best alignment is between H_a and $W^{\mathsf{T}}W$ for the forward "
                    r"relation, and G_a and WW^{T} for the backward, in agreement with the theoretical "
                    r"prediction. […] See Figure 8, which validates both forward and backward eNFA.")
QUOTE_RANK = ("the compactness of the representation is found to be negatively correlated with the "
              "alignment level (Figure 4) […] The rank of representation is strongly negatively "
              "correlated with α .")


def _short(rel: str) -> str:
    side, what = rel.split("_")
    return f"{side[0]}{what}"


def _medians(layers, hidden) -> Dict[str, float]:
    """Per relation, the median over the hidden layers (Fig. 8's solid lines)."""
    return {rel: C.median(fcnet.hidden_alpha(layers, h, rel) for h in hidden) for rel in C.RELATIONS}


def _pick(records, which):
    recs = sorted(records, key=lambda r: r["weight_decay"])
    return recs[0] if which == "low" else recs[-1]


def _strongest_claim(runs, hidden, cfg, *, backward: str, claim: str, source: str, quote: str) -> C.Claim:
    """"At a small γ the strongest forward relation is RWA and the strongest backward one is
    ``backward``": per seed, at the smallest γ, each claimed relation's median minus the larger
    median of the other two on its side; holds when both margins' intervals lie above 0."""
    parts, texts, details = [], [], {}
    gammas = set()
    for side, best in (("forward", "forward_RWA"), ("backward", backward)):
        others = [r for r in C.RELATIONS if r.startswith(side) and r != best]
        margins = []
        for _, _, ex in runs:
            low = _pick(ex["weight_decay"], "low")
            gammas.add(low["weight_decay"])
            med = _medians(low["layers"], hidden)
            margins.append(med[best] - max(C.finite([med[o] for o in others]), default=float("nan")))
        iv = C.mean_interval(margins, bounds=(-2.0, 2.0))
        parts.append(C.interval_verdict(iv, 0.0))
        texts.append(f"{_short(best)} − max({', '.join(_short(o) for o in others)}) = {iv.text(2, signed=True)}"
                     f" ({side}: {parts[-1]})")
        details[best] = iv.to_dict()
    means = {}
    for _, _, ex in runs:
        for rel, v in _medians(_pick(ex["weight_decay"], "low")["layers"], hidden).items():
            means.setdefault(rel, []).append(v)
    verdict = C.all_of(parts)
    measured = (f"γ={', '.join(f'{g:g}' for g in sorted(gammas))}, medians over {fcnet.hidden_label(hidden)} "
                f"(mean over {C.seeds_text(len(runs))}): "
                + ", ".join(f"{_short(r)} {C.fmt(C.mean(v))}" for r, v in means.items())
                + "; margins [95 % CI]: " + "; ".join(texts))
    if verdict == C.UNDETERMINED and len(runs) < 2:
        measured += " (no interval from one seed; --seeds 3 gives one)"
    rule = "both margins' 95 % intervals > 0 (the named relation is the strongest of its side)"
    return C.make_claim(claim, source, measured, rule, verdict, quote=quote, details=details)


def claims(rep, extras: Dict[str, Any], cfg: Dict[str, Any]) -> List[C.Claim]:
    """The claims of one run (one seed: numbers that need an interval over seeds are
    undetermined; :func:`claims_over_seeds` with several)."""
    return claims_over_seeds([(None, rep, extras)], cfg)


def claims_over_seeds(runs: Sequence[Tuple[Any, Any, Dict[str, Any]]], cfg: Dict[str, Any]) -> List[C.Claim]:
    """The claims of Fig. 8, Fig. 4 and §5–§6 on fc2 over ``runs`` = ``[(seed, report, extras)]``:
    per-seed numbers as means with t intervals over seeds, the γ trend as a least-squares slope
    over every (γ, seed) point, every verdict from its interval. Medians are over the five hidden
    layers as in Fig. 8 (:func:`~.fcnet.hidden_representations`)."""
    rep0 = runs[0][1]
    hidden = fcnet.hidden_representations(cfg, list(rep0.layers))
    label = fcnet.hidden_label(hidden)
    seeds = C.seeds_text(len(runs))
    thr = float(cfg.get("high_alpha", 0.7))
    out: List[C.Claim] = []
    one_seed = " (no interval from one seed; --seeds 3 gives one)"
    # Fig. 8: all six relations high at the largest γ.
    per_rel, gammas = {}, set()
    for _, _, ex in runs:
        top = _pick(ex["weight_decay"], "high")
        gammas.add(top["weight_decay"])
        for rel, v in _medians(top["layers"], hidden).items():
            per_rel.setdefault(rel, []).append(v)
    ivs = {rel: C.mean_interval(v, bounds=(-1.0, 1.0)) for rel, v in per_rel.items()}
    verdict = C.all_of([C.interval_verdict(iv, thr) for iv in ivs.values()])
    measured = (f"γ={', '.join(f'{g:g}' for g in sorted(gammas))}, median over {label}, mean [95 % CI] "
                f"over {seeds}: " + ", ".join(f"{_short(r)} {iv.text()}" for r, iv in ivs.items()))
    if verdict == C.UNDETERMINED and len(runs) < 2:
        measured += one_seed
    out.append(C.make_claim(
        "all six α high at large γ (CRH nearly exact in the hidden layers)", "Fig. 8, §6 CRH", measured,
        f"every relation's median: 95 % interval > {thr}", verdict, quote=QUOTE_LARGE,
        value=min(C.finite(iv.estimate for iv in ivs.values()), default=None),
        details={r: iv.to_dict() for r, iv in ivs.items()}))
    # Trend over γ: the mean of the six α over the hidden layers against log10 γ.
    xs, ys, by = [], [], {}
    for _, _, ex in runs:
        for r in ex["weight_decay"]:
            y = C.mean(C.mean(fcnet.hidden_alpha(r["layers"], h, rel) for rel in C.RELATIONS) for h in hidden)
            xs.append(math.log10(r["weight_decay"]))
            ys.append(y)
            by.setdefault(r["weight_decay"], []).append(y)
    out.append(C.trend_claim(
        "alignment rises with weight decay", "§6 fc1 (c), on fc2's Fig. 8 sweep", xs, ys, x_name="log10 γ",
        y_name=f"mean of the six α over {label}", quote=QUOTE_GAMMA, by_x=by, x_label=lambda g: f"γ={g:g}"))
    # Fig. 8: at the smallest γ at least one forward and one backward relation holds strongly.
    best = {"forward": [], "backward": []}
    gammas = set()
    for _, _, ex in runs:
        low = _pick(ex["weight_decay"], "low")
        gammas.add(low["weight_decay"])
        med = _medians(low["layers"], hidden)
        for side in best:
            best[side].append(max(C.finite(v for r, v in med.items() if r.startswith(side)), default=float("nan")))
    ivs = {side: C.mean_interval(v, bounds=(-1.0, 1.0)) for side, v in best.items()}
    verdict = C.all_of([C.interval_verdict(iv, thr) for iv in ivs.values()])
    measured = (f"γ={', '.join(f'{g:g}' for g in sorted(gammas))}, the largest median over {label}, "
                f"mean [95 % CI] over {seeds}: forward {ivs['forward'].text()}, backward {ivs['backward'].text()}")
    if verdict == C.UNDETERMINED and len(runs) < 2:
        measured += one_seed
    out.append(C.make_claim(
        "at small γ at least one forward and one backward relation still holds strongly", "Fig. 8",
        measured, f"the strongest forward and backward medians: 95 % intervals > {thr}", verdict,
        quote=QUOTE_SMALL_ONE, details={s: iv.to_dict() for s, iv in ivs.items()}))
    # The small-γ claim, read the two ways the paper states it.
    out.append(_strongest_claim(
        runs, hidden, cfg, backward="backward_RGA",
        claim="at small γ the strongest relations are the forward RWA and the backward RGA (reading of §6)",
        source="§6 Breaking of CRH", quote=QUOTE_READING_6))
    out.append(_strongest_claim(
        runs, hidden, cfg, backward="backward_GWA",
        claim="at small γ the strongest relations are the forward RWA and the backward GWA (reading of eq. 10, "
              "Fig. 8's caption and §7.4; the caption's \"H_a and WᵀW for the forward relation\" read as "
              "eq. 10's H_b ∝ WWᵀ)",
        source="§5 eq. 10, Fig. 8, §7.4", quote=QUOTE_READING_10))
    # Fig. 4: rank of the representation against the backward RGA, over hidden layers and γ.
    rhos, npts = [], []
    for _, _, ex in runs:
        ranks, alphas = [], []
        for r in ex["weight_decay"]:
            for h in hidden:
                e = r["layers"].get(h["backward"]) if h["backward"] else None
                if not e:
                    continue
                d = (e.get("dims") or {}).get("h_a")
                er, a = e.get("effective_rank_h"), (e.get("alpha") or {}).get("backward_RGA")
                if d and er is not None and a is not None:
                    ranks.append(er / d)
                    alphas.append(a)
        rhos.append(C.pearson(ranks, alphas))
        npts.append(len(ranks))
    iv = C.mean_interval(rhos, bounds=(-1.0, 1.0))
    verdict = C.interval_verdict(iv, -0.5, above=False)
    measured = (f"Pearson(effective rank of H_a / D, backward RGA) over the (γ, hidden layer) points: "
                f"{iv.text()} over {seeds} (per seed " + ", ".join(C.fmt(r) for r in rhos)
                + f"; {npts[0]} points each)")
    if verdict == C.UNDETERMINED and len(runs) < 2:
        measured += one_seed
    out.append(C.make_claim(
        "the rank of the representation is strongly negatively correlated with α (compact ⇒ aligned)",
        "Fig. 4, §6", measured, "95 % interval of Pearson < −0.5", verdict, quote=QUOTE_RANK,
        value=iv.estimate, details={"pearson": iv.to_dict()}))
    out.append(fcnet.rga_significance_claim(runs, hidden, source="abstract, §6 RGA, Fig. 8 (baseline: §6 llm)"))
    out.append(fcnet.exponent_claim(runs, hidden, source="§5, §6, C.8"))
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
