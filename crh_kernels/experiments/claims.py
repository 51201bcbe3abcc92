"""Claims tables: the paper's claim, the measured value, the rule applied, holds or not.

A claim is evaluated by a stated threshold on numbers measured in this run; one that
cannot be evaluated (too few layers, NaN values) says so (``holds = None``) instead of
passing. Each experiment writes its own rows; here live the record and its renderings, the
statistics the rules use, what the rows read off a :class:`~crh_kernels.report.Report`
(α, per-layer summaries, exponents) and the rules several experiments share (monotone trend,
exponent range, random-projection baseline).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ..analysis import RELATIONS  # noqa: F401  (the six relations, in the report's order)


@dataclass
class Claim:
    claim: str              # what the paper claims (short)
    source: str             # where: "§6 fc1 (c)", "Fig. 8", …
    measured: str           # the measured numbers, as text
    rule: str               # the threshold / test applied
    holds: Optional[bool]   # None: could not be evaluated (says why in `measured`)
    value: Optional[float] = None
    details: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return {True: "holds", False: "FAILS", None: "n/a"}[self.holds]


#: What the columns of a claims table and the abbreviations of its cells mean (claims.md).
LEGEND = (
    ("claim (paper)", "what Ziyin, Chuang, Galanti, Poggio, *Formation of Representations in Neural "
                      "Networks* (2024) states, in short"),
    ("source", "where the paper states it (section, figure; C.x: appendix)"),
    ("measured", "this run's numbers behind the verdict"),
    ("rule", "the threshold the verdict applies to them"),
    ("verdict", "**holds**: the rule is met; **FAILS**: it is not; **n/a**: it could not be "
                "evaluated (too few layers or finite values: the measured cell says why)"),
    ("α", "alignment of two matrices: the Pearson correlation of their entries, in [−1, 1], 1 when "
          "proportional (docs/spec.md §3)"),
    ("RGA, RWA, GWA", "representation–gradient α(H, G), representation–weight α(H, Z) and "
                      "gradient–weight α(G, Z) alignment; H, G: covariances of the normalized "
                      "activations and gradients; Z: the weight Gram"),
    ("forward, f (fRGA …)", "the layer's output side: h_b, g_b, Z_b = W Wᵀ"),
    ("backward, b (bRGA …)", "the layer's input side: h_a, g_a, Z_a = Wᵀ W"),
    ("p, q, p/q", "exponents h ~ z^p, g ~ z^q in W's singular basis (z = s²), and h ~ g^(p/q)"),
    ("forward_slope, pairing_slope", "slope of log H_b against log G_b: in W's basis, and of the "
                                     "sorted spectra paired by rank (paper Fig. 3)"),
    ("baseline", "α of two independent random rank-D/5 covariances of the layer's dimension D "
                 "(≈ 0.14 at D = 200): above it, an alignment is significant"),
    ("ρ", "Spearman's rank correlation of the listed pairs (x→y)"),
    ("γ, B", "weight decay, batch size"),
    ("r_g", "‖E[g]‖² / tr E[g gᵀ] of the normalized gradients (paper Fig. 10)"),
)


def legend_markdown() -> str:
    """The legend of a claims table, as a markdown list: :data:`LEGEND`, then the phase names
    of the paper's Table 1 (:data:`crh_kernels.analysis.PHASES`)."""
    from ..analysis import PHASES
    lines = ["Legend:", ""] + [f"- **{k}**: {v}" for k, v in LEGEND]
    lines.append("- **phases** (the paper's Table 1, docs/spec.md §4; (p, q) where the phase has a "
                 "point):")
    for name, ph in PHASES.items():
        where = "" if ph.point is None else f" — (p, q) = ({ph.point[0]:g}, {ph.point[1]:g})"
        lines.append(f"  - **{name}**: {ph.description}{where}")
    return "\n".join(lines) + "\n"


def _summary(claims: Sequence[Claim]) -> str:
    n_hold = sum(c.holds is True for c in claims)
    n_fail = sum(c.holds is False for c in claims)
    n_na = sum(c.holds is None for c in claims)
    return f"{n_hold} hold, {n_fail} fail, {n_na} not evaluated"


def to_markdown(claims: Sequence[Claim], title: Optional[str] = None, *, note: Optional[str] = None,
                legend: bool = False) -> str:
    """The claims table in markdown; ``note`` (a smoke-test banner) goes above the table and
    beside the tally, ``legend`` adds what every column and abbreviation means."""
    lines = []
    if title:
        lines += [f"### {title}", ""]
    if note:
        lines += [f"> **{note}**", ""]
    lines += ["| claim (paper) | source | measured | rule | verdict |", "| --- | --- | --- | --- | --- |"]
    for c in claims:
        cells = [c.claim, c.source, c.measured, c.rule, f"**{c.verdict}**"]
        lines.append("| " + " | ".join(s.replace("|", "\\|").replace("\n", " ") for s in cells) + " |")
    lines += ["", _summary(claims) + (" (smoke test: the verdicts mean nothing)." if note else ".")]
    if legend:
        lines += ["", legend_markdown().rstrip("\n")]
    return "\n".join(lines) + "\n"


def to_text(claims: Sequence[Claim], width: int = 100, note: Optional[str] = None) -> str:
    """Plain-text rendering for the terminal; ``note`` (a smoke-test banner) first and in the
    tally."""
    out = [note, ""] if note else []
    for i, c in enumerate(claims, 1):
        out.append(f"[{c.verdict:>5s}] {i}. {c.claim}  ({c.source})")
        out.append(f"         measured: {c.measured}")
        out.append(f"         rule:     {c.rule}")
    n_hold = sum(c.holds is True for c in claims)
    out.append(f"{n_hold}/{len(claims)} claims hold" + (" (smoke test: the verdicts mean nothing)"
                                                         if note else ""))
    return "\n".join(out)


def to_json(claims: Sequence[Claim], path) -> None:
    with open(path, "w") as f:
        json.dump([_jsonable(asdict(c)) for c in claims], f, indent=1)


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- statistics
def finite(values: Iterable) -> List[float]:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def mean(values: Iterable) -> float:
    v = finite(values)
    return sum(v) / len(v) if v else float("nan")


def median(values: Iterable) -> float:
    v = sorted(finite(values))
    if not v:
        return float("nan")
    m = len(v) // 2
    return v[m] if len(v) % 2 else 0.5 * (v[m - 1] + v[m])


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    pairs = [(float(a), float(b)) for a, b in zip(x, y)
             if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    if len(pairs) < 3:
        return float("nan")
    mx = sum(a for a, _ in pairs) / len(pairs)
    my = sum(b for _, b in pairs) / len(pairs)
    sxy = sum((a - mx) * (b - my) for a, b in pairs)
    sxx = sum((a - mx) ** 2 for a, _ in pairs)
    syy = sum((b - my) ** 2 for _, b in pairs)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def _ranks(v: Sequence[float]) -> List[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2.0
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (Pearson of the ranks, ties averaged); NaN with fewer than 3 finite pairs
    or when one side is constant."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y)
             if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    if len(pairs) < 2:
        return float("nan")
    if len(pairs) == 2:  # two points: the sign of the slope
        (a1, b1), (a2, b2) = pairs
        if a1 == a2 or b1 == b2:
            return float("nan")
        return 1.0 if (a2 - a1) * (b2 - b1) > 0 else -1.0
    xs, ys = zip(*pairs)
    return pearson(_ranks(list(xs)), _ranks(list(ys)))


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "nan"
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(v):
        return "nan"
    if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e4):
        return f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.1e}"
    return f"{v:.{digits}f}"


def fmt_list(values: Sequence, digits: int = 2) -> str:
    return "[" + ", ".join(fmt(v, digits) for v in values) + "]"


# ----------------------------------------------------------------------------- reading a report
def alpha(rep, layer: str, relation: str, kind: str = "cov") -> float:
    e = rep.layers.get(layer) if hasattr(rep, "layers") else rep.get(layer)
    if e is None:
        return float("nan")
    v = (e.get("alpha_cov" if kind == "cov" else "alpha_second") or {}).get(relation)
    return float("nan") if v is None else float(v)


def layer_summary(rep, layers: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """The compact per-layer numbers a sweep keeps: six α (cov), effective ranks, dims, p, q,
    forward slope, phase."""
    out = {}
    for name, e in rep.layers.items():
        if layers is not None and name not in layers:
            continue
        out[name] = {
            "alpha": {r: (e.get("alpha_cov") or {}).get(r) for r in RELATIONS},
            "alpha_second": {r: (e.get("alpha_second") or {}).get(r) for r in RELATIONS},
            "effective_rank_h": e.get("effective_rank_h"),
            "effective_rank_g": e.get("effective_rank_g"),
            "dims": e.get("dims"),
            "p": e.get("p"), "q": e.get("q"),
            "forward_slope": e.get("forward_slope"),
            "pairing_slope": e.get("pairing_slope"),
            "phase": e.get("phase"),
        }
    return out


def rga(summary_layer: Dict[str, Any]) -> float:
    """Mean of the forward and backward RGA of a layer summary (finite ones)."""
    a = summary_layer["alpha"]
    return mean([a.get("forward_RGA"), a.get("backward_RGA")])


def mean_alpha(summary_layer: Dict[str, Any]) -> float:
    return mean(summary_layer["alpha"].values())


def exponent_values(rep, layers: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Every power-law exponent the report holds, as ``{layer, what, value, r2}``: p (h vs z),
    q (g vs z), p/q (h vs g, backward), the forward slope (H_b vs G_b in W's basis) and the
    sorted-spectrum pairing slope (paper Fig. 3)."""
    out = []
    for name, e in rep.layers.items():
        if layers is not None and name not in layers:
            continue
        ex = e.get("exponents") or {}
        r2 = {"p": (ex.get("p") or {}).get("r2"), "q": (ex.get("q") or {}).get("r2"),
              "forward_slope": (ex.get("forward") or {}).get("r2")}
        p, q = e.get("p"), e.get("q")
        vals = [("p", p, r2["p"]), ("q", q, r2["q"])]
        if p is not None and q is not None and abs(q) > 1e-12:
            vals.append(("p/q", p / q, None))
        vals.append(("forward_slope", e.get("forward_slope"), r2["forward_slope"]))
        vals.append(("pairing_slope", e.get("pairing_slope"), None))
        for what, v, r in vals:
            if v is not None and math.isfinite(float(v)):
                out.append({"layer": name, "what": what, "value": float(v), "r2": r})
    return out


def nan(v) -> float:
    return float("nan") if v is None else float(v)


# ----------------------------------------------------------------------------- shared rules
def monotone_claim(claim: str, source: str, xs: Sequence[float], ys: Sequence[float], *,
                   x_name: str, y_name: str, increasing: bool = True, min_rho: float = 0.8,
                   digits: int = 2) -> Claim:
    """"y rises (falls) with x": holds when Spearman's ρ(x, y) ≥ min_rho (≤ −min_rho)."""
    rho = spearman(xs, ys)
    pairs = ", ".join(f"{x:g}→{fmt(y, digits)}" if isinstance(x, (int, float)) else f"{x}→{fmt(y, digits)}"
                      for x, y in zip(xs, ys))
    measured = f"{y_name} by {x_name}: {pairs}; Spearman ρ = {fmt(rho)}"
    sign = "≥" if increasing else "≤"
    rule = f"ρ {sign} {'' if increasing else '−'}{min_rho}"
    if not math.isfinite(rho):
        return Claim(claim, source, measured + " (too few finite points)", rule, None, rho)
    holds = rho >= min_rho if increasing else rho <= -min_rho
    return Claim(claim, source, measured, rule, holds, rho)


def exponent_range_claim(rep, layers: Optional[Sequence[str]] = None, *, eps: float = 0.1,
                         min_fraction: float = 0.8, source: str = "§5, §6, C.8 (PAH)",
                         which: Sequence[str] = ("p", "q", "p/q", "forward_slope", "pairing_slope")
                         ) -> Claim:
    """"Almost all positive exponents are within [1/3, 3]": the fraction of the measured
    exponents above ``eps`` (smaller ones are "flat", exponent 0 is a legal value) that lie in
    [1/3, 3] must be ≥ ``min_fraction``."""
    vals = [v for v in exponent_values(rep, layers) if v["what"] in which]
    pos = [v for v in vals if v["value"] > eps]
    inside = [v for v in pos if 1 / 3 <= v["value"] <= 3]
    claim = "positive spectral exponents lie within [1/3, 3]"
    rule = f"of the exponents > {eps} ({', '.join(which)}), ≥ {min_fraction:.0%} in [1/3, 3]"
    if not pos:
        return Claim(claim, source, f"no positive exponent among {len(vals)} fitted", rule, None)
    frac = len(inside) / len(pos)
    outside = [f"{v['layer']}:{v['what']}={v['value']:.2f}" for v in pos if v not in inside][:4]
    measured = (f"{len(inside)}/{len(pos)} = {frac:.0%} in range (median {fmt(median(v['value'] for v in pos))}"
                f", range {fmt(min(v['value'] for v in pos))}…{fmt(max(v['value'] for v in pos))})")
    if outside:
        measured += "; outside: " + ", ".join(outside)
    return Claim(claim, source, measured, rule, frac >= min_fraction, frac)


@functools.lru_cache(maxsize=64)
def paper_baseline(dim: int) -> float:
    """The paper's significance baseline at dimension ``dim``: α between the covariances of two
    independent random projections of rank dim/5 (its example: rank 40 of 200 ≈ 0.14)."""
    from ..analysis import random_baseline
    return random_baseline(int(dim), max(1, int(round(dim / 5))), trials=10 if dim <= 512 else 3)


def baseline_claim(rep, layers: Sequence[str], relations: Sequence[str] = ("forward_RGA", "backward_RGA"),
                   *, source: str, claim: Optional[str] = None, skip: Sequence[str] = ()) -> Claim:
    """Each ``relation`` α of each layer above :func:`paper_baseline` of its dimension. ``skip``
    lists ``"layer:relation"`` pairs left out (e.g. the backward side of a first layer, whose
    H_a is the data's covariance, which training cannot change)."""
    rows, ok = [], []
    for name in layers:
        e = rep.layers.get(name) or {}
        dims = e.get("dims") or {}
        for rel in relations:
            if f"{name}:{rel}" in skip:
                continue
            a = alpha(rep, name, rel)
            d = dims.get("h_a" if rel.startswith("backward") else "h_b")
            if not d or d < 2 or not math.isfinite(a):
                continue
            base = paper_baseline(int(d))
            rows.append((f"{name} {rel.split('_')[0][0]}{rel.split('_')[1]} {a:.2f}/{base:.2f}", a > base))
            ok.append(a > base)
    names = " and ".join(r.replace("_", " ") for r in relations)
    claim = claim or f"the {names} are significant (above the random baseline)"
    rule = "every α > α of two random rank-D/5 covariances of its dimension D (paper: 0.14 at 40/200)"
    if not ok:
        return Claim(claim, source, "no layer with a finite α", rule, None)
    if len(rows) <= 12:
        measured = "α/baseline: " + "; ".join(r for r, _ in rows)
    else:
        below = [r for r, good in rows if not good]
        measured = (f"{sum(ok)}/{len(ok)} α above the baseline"
                    + (f"; below: {'; '.join(below[:8])}" + (f" and {len(below) - 8} more" if len(below) > 8 else "")
                       if below else ""))
    return Claim(claim, source, measured, rule, all(ok), sum(ok) / len(ok))
