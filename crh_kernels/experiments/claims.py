"""Claims tables: the paper's claim, the measured value, the rule applied, holds or not.

A claim is evaluated by a stated threshold on numbers measured in this run; one that
cannot be evaluated (too few layers, NaN values) says so (``holds = None``) instead of
passing. Each experiment writes its own rows; here live the record and its renderings, the
statistics the rules use, what the rows read off a :class:`~crh_kernels.report.Report`
(α, per-layer summaries, exponents) and the rules several experiments share: intervals over
seeds (:func:`mean_interval`, :func:`slope_interval`) and the verdicts that use them
(:func:`interval_verdict`, :func:`trend_claim`, :func:`significance_claim` against each side's own
baseline, :func:`level_claim`, :func:`difference_claim`, :func:`pairing_exponent_claim`,
:func:`r_g_claim`). With one seed, a claim on an α uses the report's jackknife interval where the
report carries standard errors (``entry["se"]``, a collector with ``blocks``: :func:`alpha_se`,
:func:`alpha_bias`, :func:`jackknife_z`, :func:`seed_interval`), and is undetermined otherwise.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..analysis import RELATIONS  # noqa: F401  (the six relations, in the report's order)
from ..analysis.errors import t_quantile  # noqa: F401  (also C.t_quantile for the rules and tests)


@dataclass
class Claim:
    claim: str              # what the paper claims (short)
    source: str             # where: "§6 fc1 (c)", "Fig. 8", …
    measured: str           # the measured numbers, as text
    rule: str               # the threshold / test applied
    holds: Optional[bool]   # None: not decided (``undetermined``) or not evaluable
    value: Optional[float] = None
    details: dict = field(default_factory=dict)
    quote: str = ""         # the paper's own words, verbatim ("[…]" between fragments)
    undetermined: bool = False  # holds is None because the evidence is too weak (an interval
    #                             straddles the threshold, or one seed gives no interval)

    @property
    def verdict(self) -> str:
        if self.holds is None and self.undetermined:
            return "undetermined"
        return {True: "holds", False: "FAILS", None: "n/a"}[self.holds]


#: What the columns of a claims table and the abbreviations of its cells mean (claims.md).
LEGEND = (
    ("claim (paper)", "what Ziyin, Chuang, Galanti, Poggio, *Formation of Representations in Neural "
                      "Networks* (2024) states, in short"),
    ("source", "where the paper states it (section, figure; C.x: appendix)"),
    ("measured", "this run's numbers behind the verdict"),
    ("rule", "the threshold the verdict applies to them"),
    ("verdict", "**holds**: the rule is met (for a number with an interval: the whole interval "
                "lies on the claimed side of the threshold); **FAILS**: it is not (the whole "
                "interval lies on the other side); **undetermined**: the interval straddles the "
                "threshold, or one seed gives no interval; **n/a**: it could not be evaluated "
                "(too few layers or finite values: the measured cell says why)"),
    ("m [lo, hi]", "a number m with its 95 % confidence interval: over seeds, the mean ± the "
                   "Student-t interval (n − 1 degrees of freedom); for a trend, the least-squares "
                   "slope over every (setting, seed) point ± its t interval (n − 2 degrees of "
                   "freedom)"),
    ("hidden layer k (h1, h2, …)", "the k-th hidden representation of an MLP (the paper's layer "
                                    "numbering, Fig. 18: layer 0 is the input): its forward side is "
                                    "Linear layer k−1's output h_b (before the activation), its "
                                    "backward side Linear layer k's input h_a (after it)"),
    ("exponent (H–G, H–Z, G–Z)", "slope of log λ_X,i against log λ_Y,i with both spectra sorted "
                                 "(the paper's measure, Figs. 3, 20; `analysis.pairing_fit`)"),
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
    ("baseline", "α of two independent random covariances of the layer's dimension D (paper §6: "
                 "rank 40 of 200 ≈ 0.14, a rank \"roughly equivalent to the actual ranks\"): where "
                 "the rule says \"own baseline\", at the effective ranks of the two matrices (the "
                 "layer verdict's) or, in a report without one, the larger effective rank of the "
                 "side's H and G; else of rank D/5. Above it, an alignment is significant"),
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
    n_hold = sum(c.verdict == "holds" for c in claims)
    n_fail = sum(c.verdict == "FAILS" for c in claims)
    n_und = sum(c.verdict == "undetermined" for c in claims)
    n_na = sum(c.verdict == "n/a" for c in claims)
    return (f"{n_hold} hold, {n_fail} fail, " + (f"{n_und} undetermined, " if n_und else "")
            + f"{n_na} not evaluated")


def _quotes_markdown(claims: Sequence[Claim]) -> List[str]:
    """"The paper's words": each claim's verbatim quote, numbered as in the table."""
    quoted = [(i, c) for i, c in enumerate(claims, 1) if c.quote]
    if not quoted:
        return []
    lines = ["#### The paper's words", "",
             "Verbatim from Ziyin, Chuang, Galanti, Poggio, *Formation of Representations in Neural "
             "Networks* (2024); […] joins fragments of one passage or of the places listed.", ""]
    for i, c in quoted:
        lines.append(f"{i}. ({c.source}) \"{c.quote}\"")
    return lines + [""]


def to_markdown(claims: Sequence[Claim], title: Optional[str] = None, *, note: Optional[str] = None,
                legend: bool = False, preamble: Optional[str] = None) -> str:
    """The claims table in markdown, numbered; ``note`` (a smoke-test banner) goes above the
    table and beside the tally, ``preamble`` (how the numbers and verdicts were computed) above
    the table, the paper's words of each claim (:attr:`Claim.quote`) below it, and ``legend``
    adds what every column and abbreviation means."""
    lines = []
    if title:
        lines += [f"### {title}", ""]
    if note:
        lines += [f"> **{note}**", ""]
    if preamble:
        lines += [preamble, ""]
    lines += ["| # | claim (paper) | source | measured | rule | verdict |",
              "| --- | --- | --- | --- | --- | --- |"]
    for i, c in enumerate(claims, 1):
        cells = [str(i), c.claim, c.source, c.measured, c.rule, f"**{c.verdict}**"]
        lines.append("| " + " | ".join(s.replace("|", "\\|").replace("\n", " ") for s in cells) + " |")
    lines += ["", _summary(claims) + (" (smoke test: the verdicts mean nothing)." if note else "."), ""]
    lines += _quotes_markdown(claims)
    if legend:
        lines += [legend_markdown().rstrip("\n")]
    return "\n".join(lines).rstrip("\n") + "\n"


def to_text(claims: Sequence[Claim], width: int = 100, note: Optional[str] = None) -> str:
    """Plain-text rendering for the terminal; ``note`` (a smoke-test banner) first and in the
    tally."""
    out = [note, ""] if note else []
    for i, c in enumerate(claims, 1):
        out.append(f"[{c.verdict:>5s}] {i}. {c.claim}  ({c.source})")
        out.append(f"         measured: {c.measured}")
        out.append(f"         rule:     {c.rule}")
    n_hold = sum(c.holds is True for c in claims)
    n_und = sum(c.verdict == "undetermined" for c in claims)
    out.append(f"{n_hold}/{len(claims)} claims hold" + (" (smoke test: the verdicts mean nothing)" if note else "")
               + (f"; {n_und} undetermined" if n_und else ""))
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


# ----------------------------------------------------------------------------- intervals
#: The confidence level of every interval a claim shows.
CONFIDENCE = 0.95


# Student's t quantiles: one implementation, crh_kernels.analysis.errors.t_quantile (imported above)


@dataclass
class Interval:
    """A number with its confidence interval ``[lo, hi]`` (NaN bounds: no interval, e.g. one
    seed); ``n`` values or points, ``df`` degrees of freedom, ``method`` in words, ``values``
    the per-seed values behind a mean."""
    estimate: float
    lo: float
    hi: float
    n: int
    df: int
    method: str
    values: List[float] = field(default_factory=list)

    @property
    def defined(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def text(self, digits: int = 2, signed: bool = False) -> str:
        f = (lambda v: ("+" if v > 0 else "") + fmt(v, digits)) if signed else (lambda v: fmt(v, digits))
        if not math.isfinite(self.estimate):
            return "nan"
        if not self.defined:
            return f"{f(self.estimate)} [no interval]"
        if len(self.values) > 1 and max(self.values) == min(self.values):
            return f"{f(self.estimate)} [{fmt(self.lo, digits)}, {fmt(self.hi, digits)}: all {self.n} equal]"
        return f"{f(self.estimate)} [{fmt(self.lo, digits)}, {fmt(self.hi, digits)}]"

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "lo": self.lo, "hi": self.hi, "n": self.n, "df": self.df,
                "method": self.method, "values": list(self.values)}


def mean_interval(values: Iterable, level: float = CONFIDENCE, bounds: Optional[Sequence[float]] = None
                  ) -> Interval:
    """Mean of the finite ``values`` ± the Student-t interval ``t_{(1+level)/2, n−1} · s/√n``;
    no interval (NaN bounds) with fewer than 2 values. ``bounds``: the range the quantity can
    take (a fraction: (0, 1)); the interval is clipped to it."""
    v = finite(values)
    n = len(v)
    est = sum(v) / n if n else float("nan")
    if n < 2:
        return Interval(est, float("nan"), float("nan"), n, 0, "one value" if n else "no value", v)
    sd = math.sqrt(math.fsum((x - est) ** 2 for x in v) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    lo, hi = est - half, est + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Interval(est, lo, hi, n, n - 1, f"mean ± t over {n}", v)


def slope_interval(xs: Sequence, ys: Sequence, level: float = CONFIDENCE) -> Interval:
    """Least-squares slope of ``ys`` on ``xs`` (finite pairs) ± its Student-t interval
    ``t_{(1+level)/2, n−2} · √(SSR/(n−2) / Sxx)``; NaN slope with fewer than 2 distinct x, no
    interval with fewer than 3 points."""
    pairs = [(float(a), float(b)) for a, b in zip(xs, ys)
             if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    n = len(pairs)
    nan = float("nan")
    if n < 2:
        return Interval(nan, nan, nan, n, 0, "fewer than two points")
    mx = math.fsum(a for a, _ in pairs) / n
    my = math.fsum(b for _, b in pairs) / n
    sxx = math.fsum((a - mx) ** 2 for a, _ in pairs)
    if sxx <= 0:
        return Interval(nan, nan, nan, n, 0, "one x value")
    sxy = math.fsum((a - mx) * (b - my) for a, b in pairs)
    slope = sxy / sxx
    if n < 3:
        return Interval(slope, nan, nan, n, 0, "two points")
    ssr = math.fsum((b - my - slope * (a - mx)) ** 2 for a, b in pairs)
    half = t_quantile(0.5 + level / 2, n - 2) * math.sqrt(ssr / (n - 2) / sxx)
    return Interval(slope, slope - half, slope + half, n, n - 2, f"least-squares slope ± t over {n} points")


# ----------------------------------------------------------------------------- interval verdicts
HOLDS, FAILS, UNDETERMINED, NA = "holds", "FAILS", "undetermined", "n/a"


def interval_verdict(iv: Interval, threshold: float, above: bool = True) -> str:
    """``holds`` when the whole interval lies beyond ``threshold`` on the claimed side (above, or
    below with ``above=False``), ``FAILS`` when it lies wholly on the other side, ``undetermined``
    when it straddles or touches it or there is no interval (one seed), ``n/a`` without an
    estimate."""
    if not math.isfinite(iv.estimate):
        return NA
    if not iv.defined:
        return UNDETERMINED
    if above:
        return HOLDS if iv.lo > threshold else FAILS if iv.hi < threshold else UNDETERMINED
    return HOLDS if iv.hi < threshold else FAILS if iv.lo > threshold else UNDETERMINED


def all_of(verdicts: Sequence[str]) -> str:
    """Every part must hold: ``FAILS`` if one fails, ``holds`` if all hold, else
    ``undetermined``; parts that are ``n/a`` are left out (all of them: ``n/a``)."""
    v = [x for x in verdicts if x != NA]
    if not v:
        return NA
    if FAILS in v:
        return FAILS
    return HOLDS if all(x == HOLDS for x in v) else UNDETERMINED


def most_of(verdicts: Sequence[str]) -> str:
    """More than half of the parts must hold: ``holds`` when more than half hold, ``FAILS`` when
    even the undetermined ones could not make a majority, else ``undetermined``; ``n/a`` parts
    are left out."""
    v = [x for x in verdicts if x != NA]
    if not v:
        return NA
    n_hold, n_und = v.count(HOLDS), v.count(UNDETERMINED)
    if 2 * n_hold > len(v):
        return HOLDS
    if 2 * (n_hold + n_und) <= len(v):
        return FAILS
    return UNDETERMINED


def make_claim(claim: str, source: str, measured: str, rule: str, verdict: str, *, quote: str = "",
               value: Optional[float] = None, details: Optional[dict] = None) -> Claim:
    """A :class:`Claim` from a verdict word (``holds``, ``FAILS``, ``undetermined``, ``n/a``)."""
    if verdict not in (HOLDS, FAILS, UNDETERMINED, NA):
        raise ValueError(f"unknown verdict {verdict!r}")
    holds = {HOLDS: True, FAILS: False}.get(verdict)
    return Claim(claim, source, measured, rule, holds, value, dict(details or {}), quote,
                 verdict == UNDETERMINED)


def _why_undetermined(iv: Interval) -> str:
    if math.isfinite(iv.estimate) and not iv.defined:
        return f" (no interval from {iv.method}; --seeds 3 gives one)"
    return ""


def trend_claim(claim: str, source: str, xs: Sequence[float], ys: Sequence[float], *, x_name: str,
                y_name: str, increasing: bool = True, quote: str = "",
                by_x: Optional[Dict[Any, List[float]]] = None, x_label=None, digits: int = 2) -> Claim:
    """"y rises (falls) with x": the least-squares slope of y on x over every (setting, seed)
    point, with its 95 % t interval (:func:`slope_interval`); holds when the interval lies above
    0 (below, with ``increasing=False``), FAILS when it lies on the other side, undetermined
    when it straddles 0. ``by_x``: the y values per setting (one per seed), shown as means."""
    iv = slope_interval(xs, ys)
    verdict = interval_verdict(iv, 0.0, above=increasing)
    label = x_label or (lambda x: f"{x:g}")
    measured = (f"slope of {y_name} per unit of {x_name}: {iv.text(3, signed=True)} "
                f"({iv.n} points, {iv.df} df)")
    if by_x:
        measured += "; mean by setting: " + ", ".join(
            f"{label(x)}→{fmt(mean(v), digits)}" for x, v in sorted(by_x.items()))
    if verdict == UNDETERMINED:
        measured += _why_undetermined(iv)
    elif verdict == NA:
        measured += " (too few finite points)"
    rule = f"95 % interval of the slope {'>' if increasing else '<'} 0"
    return make_claim(claim, source, measured, rule, verdict, quote=quote, value=iv.estimate,
                      details={"slope": iv.to_dict()})


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


def side_spectra(entry: Dict[str, Any], side: str) -> Dict[str, Optional[List[float]]]:
    """The sorted spectra (descending) of one side of a report entry: ``{"H", "G", "Z"}`` of the
    backward side (``side="a"``: H_a, G_a, Z_a = WᵀW) or the forward side (``"b"``: H_b, G_b,
    Z_b = WWᵀ); Z's nonzero eigenvalues are the same on both sides (the squared singular values
    of W, ``exponents.z``; of W with its bias column when the exponents were fitted on raw
    moments). H and G are always those of the matrices α is computed on (the report's ``kind``,
    the paper's normalized covariances): ``spectra`` where the report holds it, else the
    exponents' ``pairing`` unless that was fitted on raw moments. None where there is none."""
    if side not in ("a", "b"):
        raise ValueError(f"side must be 'a' or 'b', got {side!r}")
    ex = entry.get("exponents") or {}
    pair = {} if entry.get("exponent_moments") == "raw" else (ex.get("pairing") or {})
    spec = entry.get("spectra") or {}
    keys = {"a": ("H_a", "G_a", "lambda_H", "lambda_G"), "b": ("H_b", "G_b", "lambda_Hb", "lambda_Gb")}[side]
    h = spec.get(keys[0]) if spec.get(keys[0]) is not None else pair.get(keys[2])
    g = spec.get(keys[1]) if spec.get(keys[1]) is not None else pair.get(keys[3])
    return {"H": h, "G": g, "Z": ex.get("z")}


#: The spectrum pairs whose sorted-pair slope is an exponent of the PAH (λ_X ∝ λ_Y^k, X–Y).
EXPONENT_PAIRS = (("H", "G"), ("H", "Z"), ("G", "Z"))


def pairing_exponents(entry: Dict[str, Any], side: str, floor: float = 1e-6) -> Dict[str, float]:
    """The paper's exponents of one side of a layer: for each pair of :data:`EXPONENT_PAIRS` the
    slope of log λ_X,i against log λ_Y,i over the sorted spectra (:func:`crh_kernels.analysis.
    pairing_fit`, Figs. 3 and 20), ``{"H–G": k, ...}``; a pair without spectra or a fit (fewer
    than 3 ranks above the floor, a flat λ_Y) is left out."""
    from ..analysis import pairing_fit
    spec = side_spectra(entry, side)
    out = {}
    for x, y in EXPONENT_PAIRS:
        lx, ly = spec.get(x), spec.get(y)
        if lx is None or ly is None:
            continue
        lx = [float("nan") if v is None else float(v) for v in lx]
        ly = [float("nan") if v is None else float(v) for v in ly]
        fit = pairing_fit(lx, ly, floor)
        if fit is not None and math.isfinite(fit[0]):
            out[f"{x}–{y}"] = float(fit[0])
    return out


def spectrum_effective_rank(lam: Optional[Sequence]) -> Optional[float]:
    """:func:`crh_kernels.analysis.effective_rank` of a matrix with eigenvalues ``lam`` (the
    same definition, ``exp(−Σ p_i log p_i)`` of the normalized eigenvalues clipped at 0, read off
    a saved spectrum without a decomposition); None without a positive eigenvalue."""
    v = [max(x, 0.0) for x in finite(lam or [])]
    total = math.fsum(v)
    if not v or total <= 0:
        return None
    return math.exp(-math.fsum((x / total) * math.log(x / total) for x in v if x > 0))


@functools.lru_cache(maxsize=512)
def rank_baseline(dim: int, rank: int) -> float:
    """α of two independent random rank-``rank`` covariances in ``dim`` dimensions
    (:func:`crh_kernels.analysis.random_baseline`), cached."""
    from ..analysis import random_baseline
    return random_baseline(int(dim), int(rank), trials=10 if dim <= 512 else 3)


def side_baseline(entry: Dict[str, Any], side: str, relation: Optional[str] = None) -> Dict[str, Any]:
    """The significance baseline of one side of a layer, at the side's own ranks (the paper's
    rank-40 projection was chosen "roughly equivalent to the actual ranks of cov(h, h) and
    cov(g, g)"): the layer verdict's baseline of ``relation`` where the report holds one (α of
    two random covariances of the side's dimension at the effective ranks of the relation's two
    matrices), else α of two random covariances of dimension D with rank the larger effective
    rank of the side's H and G (from its spectra), else rank D/5. ``{"baseline", "rank", "dim",
    "how"}``; baseline NaN when D < 2."""
    dims = entry.get("dims") or {}
    d = dims.get("h_a" if side == "a" else "h_b")
    if not d or int(d) < 2:
        return {"baseline": float("nan"), "rank": None, "dim": d, "how": "dimension < 2"}
    d = int(d)
    if relation is not None:
        rel = ((((entry.get("verdict") or {}).get("alpha") or {}).get("relations") or {}).get(relation) or {})
        b = rel.get("baseline")
        if isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(float(b)):
            return {"baseline": float(b), "rank": rel.get("ranks"), "dim": d,
                    "how": "the layer verdict's, at the effective ranks of both matrices"}
    spec = side_spectra(entry, side)
    ranks = [r for r in (spectrum_effective_rank(spec["H"]), spectrum_effective_rank(spec["G"])) if r is not None]
    if ranks:
        rank, how = max(1, min(d, int(round(max(ranks))))), "effective rank of H and G (the larger)"
    else:
        rank, how = max(1, int(round(d / 5))), "D/5 (no spectra in the report)"
    return {"baseline": rank_baseline(d, rank), "rank": rank, "dim": d, "how": how}


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


# ----------------------------------------------------------------------------- one seed: jackknife
#: The normal quantile a report's jackknife interval uses when its meta does not say
#: (``meta["jackknife"]["z"]``, docs/usage.md "Standard errors").
JACKKNIFE_Z = 1.96


def _positive_finite(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) and v >= 0 else None


def jackknife_z(rep) -> float:
    """The z of a report's jackknife intervals: ``meta["jackknife"]["z"]`` where the report says
    so, else :data:`JACKKNIFE_Z`."""
    meta = getattr(rep, "meta", None) if not isinstance(rep, dict) else rep.get("meta")
    jk = (meta or {}).get("jackknife") if isinstance(meta, dict) else None
    z = _positive_finite((jk or {}).get("z")) if isinstance(jk, dict) else None
    return z if z else JACKKNIFE_Z


def entry_se(entry: Optional[Dict[str, Any]], key: str, relation: Optional[str] = None) -> Optional[float]:
    """The jackknife standard error a report entry carries for ``key`` (``"alpha_cov"`` or
    ``"alpha_second"`` with a ``relation``; ``"p"``, ``"q"``, ``"forward_slope"``, …), or None:
    a report without ``entry["se"]`` (a collector without ``blocks``, or a report written before
    they existed), a quantity without one, or a value that is not a finite number ≥ 0."""
    se = (entry or {}).get("se") if isinstance(entry, dict) else None
    if not isinstance(se, dict):
        return None
    v = se.get(key)
    if relation is not None:
        v = v.get(relation) if isinstance(v, dict) else None
    return _positive_finite(v)


def alpha_se(entry: Optional[Dict[str, Any]], relation: str, kind: str = "cov") -> Optional[float]:
    """:func:`entry_se` of one α (``kind`` ``"cov"`` or ``"second"``)."""
    return entry_se(entry, "alpha_cov" if kind == "cov" else "alpha_second", relation)


def entry_bias(entry: Optional[Dict[str, Any]], key: str, relation: Optional[str] = None) -> float:
    """The jackknife bias estimate ``entry["se"]["bias"][key][relation]`` (issue 16: the report's
    interval is centred on ``value − bias``); 0 where the report gives none (a report whose
    intervals are centred on the value itself) or where it is not a finite number."""
    se = (entry or {}).get("se") if isinstance(entry, dict) else None
    b = se.get("bias") if isinstance(se, dict) else None
    v = b.get(key) if isinstance(b, dict) else None
    if relation is not None:
        v = v.get(relation) if isinstance(v, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return 0.0
    return float(v)


def alpha_bias(entry: Optional[Dict[str, Any]], relation: str, kind: str = "cov") -> float:
    """:func:`entry_bias` of one α."""
    return entry_bias(entry, "alpha_cov" if kind == "cov" else "alpha_second", relation)


def se_bound(weights: Sequence[float], ses: Sequence[Optional[float]]) -> Optional[float]:
    """An upper bound on the standard error of ``Σ wᵢ xᵢ`` from the standard errors of the
    ``xᵢ``, whatever their correlations: ``Σ |wᵢ| seᵢ`` (the triangle inequality for standard
    deviations). None when one of them has none."""
    total = 0.0
    for w, s in zip(weights, ses):
        if s is None:
            return None
        total += abs(float(w)) * float(s)
    return total


def seed_interval(values: Sequence, ses: Optional[Sequence[Optional[float]]] = None, *,
                  biases: Optional[Sequence[float]] = None, z: float = JACKKNIFE_Z,
                  bounds: Optional[Sequence[float]] = None) -> Interval:
    """The interval of a number measured once per seed: over ≥ 2 seeds, the mean with its
    Student-t interval (:func:`mean_interval`; the per-seed standard errors are not used: the
    spread over seeds already holds the sampling error); with one seed whose report carries a
    jackknife standard error (``ses[0]``), the report's interval: the bias-corrected value
    ``value − biases[0]`` ± ``z``·se (issue 16; ``z`` the report's, :func:`jackknife_z`); else no
    interval (the claim is then undetermined)."""
    v = finite(values)
    if len(v) != 1 or not ses:
        return mean_interval(values, bounds=bounds)
    i = next(k for k, x in enumerate(values) if x is not None and math.isfinite(float(x)))
    se = _positive_finite(ses[i]) if i < len(ses) else None
    if se is None:
        return mean_interval(values, bounds=bounds)
    b = float(biases[i]) if biases is not None and i < len(biases) and biases[i] is not None else 0.0
    if not math.isfinite(b):
        b = 0.0
    est = v[0] - b
    lo, hi = est - z * se, est + z * se
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    what = "bias-corrected value" if b else "value"
    return Interval(est, lo, hi, 1, 0, f"one seed: jackknife {what} ± {z:.3g}·se (se {fmt(se, 3)})", v)


def within_verdict(iv: Interval, lo: float, hi: float) -> str:
    """``holds`` when the whole interval lies inside ``[lo, hi]``, ``FAILS`` when it lies wholly
    outside it, ``undetermined`` when it straddles a bound or there is no interval, ``n/a``
    without an estimate."""
    if not math.isfinite(iv.estimate):
        return NA
    if not iv.defined:
        return UNDETERMINED
    if lo <= iv.lo and iv.hi <= hi:
        return HOLDS
    if iv.hi < lo or iv.lo > hi:
        return FAILS
    return UNDETERMINED


def seeds_text(n: int) -> str:
    return "one seed" if n == 1 else f"{n} seeds"


def _ci_label(n_runs: int, ivs: Sequence[Interval]) -> str:
    """How a claim's intervals were made: over seeds, or (one seed) the report's jackknife."""
    if n_runs == 1 and any(iv.defined and iv.method.startswith("one seed: jackknife") for iv in ivs):
        return "one seed, jackknife-bias-corrected value [95 % jackknife interval]"
    return f"mean [95 % CI] over {seeds_text(n_runs)}"


def _no_interval_note(iv: Interval, n_runs: int) -> str:
    if math.isfinite(iv.estimate) and not iv.defined and n_runs < 2:
        return (" (no interval from one seed; --seeds 3 gives one, or a collector with blocks "
                "(--set blocks=10) gives jackknife standard errors)")
    return ""


def _entry(rep, layer: str) -> Optional[Dict[str, Any]]:
    layers = rep.layers if hasattr(rep, "layers") else rep
    return layers.get(layer)


def significance_claim(runs: Sequence[Tuple[Any, Any, Dict[str, Any]]], items: Sequence[Tuple[str, str, str]],
                       *, claim: str, source: str, quote: str = "", mode: str = "all") -> Claim:
    """"α is significant": for each ``(label, layer, relation)`` the margin of the layer's α over
    its side's own random baseline (:func:`side_baseline`), per seed, as an interval
    (:func:`seed_interval`: over seeds, or, with one seed and a jackknife se, the
    bias-corrected α ± z·se); an item holds when its interval lies above 0. ``mode="all"``:
    every item must hold (:func:`all_of`); ``"most"``: more than half (:func:`most_of`)."""
    if mode not in ("all", "most"):
        raise ValueError(f"mode must be 'all' or 'most', got {mode!r}")
    rows, verdicts, details, notes, ivs = [], [], {}, set(), []
    for label, layer, rel in items:
        margins, ses, biases, alphas, bases = [], [], [], [], []
        z = JACKKNIFE_Z
        for _, rep, _ in runs:
            e = _entry(rep, layer)
            if not e:
                continue
            b = side_baseline(e, "a" if rel.startswith("backward") else "b", rel)
            a = alpha(rep, layer, rel)
            alphas.append(a)
            bases.append(b["baseline"])
            margins.append(a - b["baseline"])
            ses.append(alpha_se(e, rel))
            biases.append(alpha_bias(e, rel))
            z = jackknife_z(rep)
        iv = seed_interval(margins, ses, biases=biases, z=z)
        ivs.append(iv)
        v = interval_verdict(iv, 0.0)
        verdicts.append(v)
        if v == UNDETERMINED:
            notes.add(_no_interval_note(iv, len(runs)))
        rows.append(f"{label} {fmt(mean(alphas))}−{fmt(mean(bases))}: {iv.text(2, signed=True)}")
        details[label] = {"layer": layer, "relation": rel, "alpha": alphas, "baseline": bases,
                          "margin": iv.to_dict()}
    verdict = (all_of if mode == "all" else most_of)(verdicts)
    n_hold = verdicts.count(HOLDS)
    n = len([v for v in verdicts if v != NA])
    measured = (f"{n_hold}/{n} above their own baseline ({seeds_text(len(runs))}); α − baseline, "
                f"{_ci_label(len(runs), ivs)}: " + "; ".join(rows)) if rows else "no layer measured"
    measured += "".join(sorted(notes))
    rule = ((("every" if mode == "all" else "most (> half)") + " α above its own baseline (α of two "
             "random covariances of the side's dimension at its effective ranks): interval of "
             "α − baseline > 0"))
    return make_claim(claim, source, measured, rule, verdict, quote=quote,
                      value=(n_hold / n if n else None), details=details)


def rga_of(rep, layer: str, sides: Sequence[str] = ("forward", "backward")
           ) -> Tuple[float, Optional[float], float]:
    """The RGA of a layer (mean of the finite forward and backward RGA, or one side), an upper
    bound on its jackknife standard error (:func:`se_bound`; None without se) and its jackknife
    bias (the mean of the two biases; 0 without)."""
    e = _entry(rep, layer) or {}
    vals, ses, bias = [], [], []
    for side in sides:
        a = alpha(rep, layer, f"{side}_RGA")
        if math.isfinite(a):
            vals.append(a)
            ses.append(alpha_se(e, f"{side}_RGA"))
            bias.append(alpha_bias(e, f"{side}_RGA"))
    if not vals:
        return float("nan"), None, 0.0
    w = [1.0 / len(vals)] * len(vals)
    return sum(vals) / len(vals), se_bound(w, ses), sum(bias) / len(bias)


def level_claim(runs: Sequence[Tuple[Any, Any, Dict[str, Any]]], layers: Sequence[str], threshold: float, *,
                claim: str, source: str, quote: str = "") -> Claim:
    """"Very good alignment, RGA > threshold" in every layer of ``layers``: per layer the RGA
    (:func:`rga_of`), as an interval over seeds (one seed: ± z·se bound); holds when every
    layer's interval lies above ``threshold``."""
    rows, verdicts, details, notes, ivs = [], [], {}, set(), []
    for name in layers:
        vals, ses, biases = [], [], []
        z = JACKKNIFE_Z
        for _, rep, _ in runs:
            v, s, b = rga_of(rep, name)
            vals.append(v)
            ses.append(s)
            biases.append(b)
            z = jackknife_z(rep)
        iv = seed_interval(vals, ses, biases=biases, z=z, bounds=(-1.0, 1.0))
        ivs.append(iv)
        verdicts.append(interval_verdict(iv, threshold))
        if verdicts[-1] == UNDETERMINED:
            notes.add(_no_interval_note(iv, len(runs)))
        rows.append(f"{name} {iv.text()}")
        details[name] = iv.to_dict()
    verdict = all_of(verdicts)
    measured = f"RGA (mean of forward and backward), {_ci_label(len(runs), ivs)}: " + \
        "; ".join(rows) + "".join(sorted(notes))
    return make_claim(claim, source, measured, f"every layer's RGA: 95 % interval > {threshold}", verdict,
                      quote=quote, details=details)


def difference_claim(runs: Sequence[Tuple[Any, Any, Dict[str, Any]]], better: Sequence[str], worse: Sequence[str],
                     *, claim: str, source: str, quote: str = "", better_name: str = "", worse_name: str = ""
                     ) -> Claim:
    """"The RGA of ``better`` layers exceeds that of ``worse`` ones": per seed, the mean RGA of
    ``better`` minus that of ``worse`` (:func:`rga_of`; one seed: ± z times the bound of
    :func:`se_bound` on its jackknife se); holds when the interval lies above 0."""
    diffs, ses, biases, means_b, means_w = [], [], [], [], []
    z = JACKKNIFE_Z
    for _, rep, _ in runs:
        rb = [rga_of(rep, n) for n in better if _entry(rep, n)]
        rw = [rga_of(rep, n) for n in worse if _entry(rep, n)]
        rb = [r for r in rb if math.isfinite(r[0])]
        rw = [r for r in rw if math.isfinite(r[0])]
        if not rb or not rw:
            continue
        mb, mw = mean(r[0] for r in rb), mean(r[0] for r in rw)
        means_b.append(mb)
        means_w.append(mw)
        diffs.append(mb - mw)
        ses.append(se_bound([1.0 / len(rb)] * len(rb) + [1.0 / len(rw)] * len(rw),
                            [r[1] for r in rb] + [r[1] for r in rw]))
        biases.append(mean(r[2] for r in rb) - mean(r[2] for r in rw))
        z = jackknife_z(rep)
    iv = seed_interval(diffs, ses, biases=biases, z=z, bounds=(-2.0, 2.0))
    verdict = interval_verdict(iv, 0.0)
    bn, wn = better_name or ", ".join(better), worse_name or ", ".join(worse)
    measured = (f"mean RGA of {bn} {fmt(mean(means_b))}, of {wn} {fmt(mean(means_w))}; difference, "
                f"{_ci_label(len(runs), [iv])}: {iv.text(2, signed=True)}")
    if verdict == UNDETERMINED:
        measured += _no_interval_note(iv, len(runs))
    elif verdict == NA:
        measured += " (no finite RGA on one of the two sides)"
    return make_claim(claim, source, measured, "95 % interval of the difference > 0", verdict, quote=quote,
                      value=iv.estimate, details={"difference": iv.to_dict()})


def pairing_exponent_claim(runs: Sequence[Tuple[Any, Any, Dict[str, Any]]], items: Sequence[Tuple[str, str, str]],
                           *, source: str, quote: str = "", eps: float = 0.1, min_fraction: float = 0.8
                           ) -> Claim:
    """"Almost all positive exponents are within [1/3, 3]" with the paper's measure (the
    sorted-spectrum slopes of :func:`pairing_exponents`: H–G, H–Z, G–Z) over ``items`` =
    ``[(label, layer, side "a"|"b")]``: per seed, the fraction of the exponents above ``eps``
    that lie in [1/3, 3]; holds when its t interval over seeds lies above ``min_fraction``
    (one seed: undetermined — a fraction has no jackknife se)."""
    fracs, counts, outside, allv = [], [], [], []
    for seed, rep, _ in runs:
        floor = float(rep.meta.get("floor", 1e-6)) if hasattr(rep, "meta") else 1e-6
        vals = []
        for label, layer, side in items:
            e = _entry(rep, layer)
            if not e:
                continue
            for pair, k in pairing_exponents(e, side, floor).items():
                vals.append((f"{label} {pair}", k))
        pos = [(w, k) for w, k in vals if k > eps]
        inside = [(w, k) for w, k in pos if 1 / 3 <= k <= 3]
        allv += [k for _, k in pos]
        counts.append((len(inside), len(pos), len(vals)))
        if pos:
            fracs.append(len(inside) / len(pos))
        outside += [("" if seed is None else f"seed {seed} ") + f"{w}={k:.2f}"
                    for w, k in pos if not 1 / 3 <= k <= 3]
    iv = mean_interval(fracs, bounds=(0.0, 1.0))
    verdict = interval_verdict(iv, min_fraction)
    claim = "positive spectral exponents lie within [1/3, 3] (sorted-eigenvalue slopes)"
    rule = (f"of the exponents > {eps} (H–G, H–Z, G–Z of every measured side), the fraction in [1/3, 3]: "
            f"95 % interval > {min_fraction:.0%}")
    if not fracs:
        return make_claim(claim, source, "no positive exponent fitted", rule, NA, quote=quote)
    measured = (f"fraction in range {iv.text(2)} ({seeds_text(len(runs))}; per seed "
                + ", ".join(f"{a}/{b}" for a, b, _ in counts)
                + f" of the positive; {counts[0][2]} fitted per seed); exponents: median "
                  f"{fmt(median(allv))}, range {fmt(min(allv))}…{fmt(max(allv))}")
    if outside:
        measured += "; outside: " + ", ".join(outside[:4]) + (f" and {len(outside) - 4} more" if len(outside) > 4 else "")
    if verdict == UNDETERMINED:
        measured += _why_undetermined(iv)
    return make_claim(claim, source, measured, rule, verdict, quote=quote, value=iv.estimate,
                      details={"fraction": iv.to_dict(), "counts": counts})


def r_g_claim(runs: Sequence[Tuple[Any, Any, Dict[str, Any]]], layers_of, *, source: str = "Fig. 10, C.2",
              quote: str = "", threshold: float = 0.05, claim: str = "r_g ≈ 0: E[ggᵀ] = cov(g) (Fig. 10)"
              ) -> Claim:
    """"r_g ≈ 0": per seed the median r_g over ``layers_of(rep)``, its t interval over seeds
    below ``threshold`` (one seed: undetermined)."""
    meds, rhs, n = [], [], 0
    for _, rep, _ in runs:
        names = list(layers_of(rep))
        n = len(names)
        meds.append(median(rep.layers[x].get("r_g") for x in names))
        rhs.append(median(rep.layers[x].get("r_h") for x in names))
    iv = mean_interval(meds, bounds=(0.0, 1.0))
    verdict = interval_verdict(iv, threshold, above=False)
    measured = (f"median r_g over {n} layers: {iv.text(3)} ({seeds_text(len(runs))}); median r_h "
                f"{fmt(mean(rhs), 3)}")
    if verdict == UNDETERMINED:
        measured += _why_undetermined(iv)
    return make_claim(claim, source, measured, f"median r_g: 95 % interval < {threshold}", verdict, quote=quote,
                      value=iv.estimate, details={"r_g": iv.to_dict()})
