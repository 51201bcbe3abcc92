"""Claims tables: the paper's claim, the measured value, the rule applied, holds or not.

A claim is evaluated by a stated threshold on numbers measured in this run; one that
cannot be evaluated (too few layers, NaN values) says so (``holds = None``) instead of
passing. Nothing here decides what the paper claims: each experiment writes its rows.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, List, Optional, Sequence

RELATIONS = ("forward_RGA", "forward_RWA", "forward_GWA", "backward_RGA", "backward_RWA", "backward_GWA")


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


def to_markdown(claims: Sequence[Claim], title: Optional[str] = None) -> str:
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += ["| claim (paper) | source | measured | rule | verdict |", "| --- | --- | --- | --- | --- |"]
    for c in claims:
        cells = [c.claim, c.source, c.measured, c.rule, f"**{c.verdict}**"]
        lines.append("| " + " | ".join(s.replace("|", "\\|").replace("\n", " ") for s in cells) + " |")
    n_hold = sum(c.holds is True for c in claims)
    n_fail = sum(c.holds is False for c in claims)
    n_na = sum(c.holds is None for c in claims)
    lines += ["", f"{n_hold} hold, {n_fail} fail, {n_na} not evaluated."]
    return "\n".join(lines) + "\n"


def to_text(claims: Sequence[Claim], width: int = 100) -> str:
    """Plain-text rendering for the terminal."""
    out = []
    for i, c in enumerate(claims, 1):
        out.append(f"[{c.verdict:>5s}] {i}. {c.claim}  ({c.source})")
        out.append(f"         measured: {c.measured}")
        out.append(f"         rule:     {c.rule}")
    n_hold = sum(c.holds is True for c in claims)
    out.append(f"{n_hold}/{len(claims)} claims hold")
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
