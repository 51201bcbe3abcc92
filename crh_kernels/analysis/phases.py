"""The phase diagram of SPEC §4 (the paper's Table 1, re-derived): lines, points, classifier.

Owns: the six relation lines in the (p, q) exponent plane (:data:`LINES`), the phase points
(:data:`PHASES`, :func:`phase_point`, :data:`FORWARD_SLOPE`), distances to the lines
(:func:`line_distances`), the flatness test for z (:func:`is_flat`) and the classifier
(:func:`classify_phase`). Pure interpretation: the exponents come from
:func:`crh_kernels.analysis.spectra.fit_exponents`, the alignments from
:func:`crh_kernels.analysis.align.six_alignments`.

Why lines: with ``h ~ z^p`` and ``g ~ z^q`` in W's singular basis (commuting matrices),
``H_b ~ z^(p+1)``, ``G_b ~ z^(q−1)``, ``Z_b ~ z``, ``Z_a ~ z``, so each proportionality is one
linear equation in (p, q); a phase is where a backward line crosses a forward line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from .align import RELATIONS

__all__ = ["Line", "LINES", "PHASES", "FORWARD_SLOPE", "PhaseResult", "line_distances",
           "classify_phase", "phase_point", "is_flat", "BACKWARD", "FORWARD"]


class Line(NamedTuple):
    """The line ``a·p + b·q = c`` of one relation, with a human label."""

    a: float
    b: float
    c: float
    label: str


#: The six relations as lines in the (p, q) plane (SPEC §4 first table).
LINES: Dict[str, Line] = {
    "backward_RGA": Line(1.0, -1.0, 0.0, "H_a ∝ G_a: p = q"),
    "backward_RWA": Line(1.0, 0.0, 1.0, "H_a ∝ Z_a: p = 1"),
    "backward_GWA": Line(0.0, 1.0, 1.0, "G_a ∝ Z_a: q = 1"),
    "forward_RGA": Line(-1.0, 1.0, 2.0, "H_b ∝ G_b: q = p + 2"),
    "forward_RWA": Line(1.0, 0.0, 0.0, "H_b ∝ Z_b: p = 0"),
    "forward_GWA": Line(0.0, 1.0, 2.0, "G_b ∝ Z_b: q = 2"),
}
BACKWARD = ("backward_RGA", "backward_RWA", "backward_GWA")
FORWARD = ("forward_RGA", "forward_RWA", "forward_GWA")


class Phase(NamedTuple):
    point: Optional[Tuple[float, float]]  # (p, q), None where z is flat (exponents undefined)
    relations: Tuple[str, ...]            # the relations that hold in this phase
    description: str


#: SPEC §4 second table. Phases 4–9 are crossings of one backward and one forward line; the
#: three parallel pairs (RGA/RGA, RWA/RWA, GWA/GWA) never cross, which is why phases 1–3 need a
#: flat z (Z ∝ a projection) and are read from the alignments instead.
PHASES: Dict[str, Phase] = {
    "CRH": Phase(None, RELATIONS, "all six relations: H ∝ G ∝ Z ∝ a projection"),
    "backward CRH": Phase((1.0, 1.0), BACKWARD, "all three backward relations"),
    "forward CRH": Phase((0.0, 2.0), FORWARD, "all three forward relations"),
    "1": Phase(None, ("backward_RGA", "forward_RGA"), "RGA on both sides, Z ∝ a projection"),
    "2": Phase(None, ("backward_RWA", "forward_RWA"), "RWA on both sides, Z ∝ a projection"),
    "3": Phase(None, ("backward_GWA", "forward_GWA"), "GWA on both sides, Z ∝ a projection"),
    "4": Phase((0.0, 0.0), ("backward_RGA", "forward_RWA"), "H_a ∝ G_a and H_b ∝ Z_b"),
    "5": Phase((1.0, 3.0), ("backward_RWA", "forward_RGA"), "H_a ∝ Z_a and H_b ∝ G_b"),
    "6": Phase((2.0, 2.0), ("backward_RGA", "forward_GWA"), "H_a ∝ G_a and G_b ∝ Z_b"),
    "7": Phase((-1.0, 1.0), ("backward_GWA", "forward_RGA"), "G_a ∝ Z_a and H_b ∝ G_b"),
    "8": Phase((1.0, 2.0), ("backward_RWA", "forward_GWA"), "H_a ∝ Z_a and G_b ∝ Z_b"),
    "9": Phase((0.0, 1.0), ("backward_GWA", "forward_RWA"), "G_a ∝ Z_a and H_b ∝ Z_b"),
}

#: The forward slope log λ_Hb / log λ_Gb = (p+1)/(q−1) of each phase with a point; None where
#: G_b is flat (q = 1) and the slope is undefined.
FORWARD_SLOPE: Dict[str, Optional[float]] = {
    "backward CRH": None, "forward CRH": 1.0, "4": -1.0, "5": 1.0, "6": 3.0, "7": None,
    "8": 2.0, "9": None,
}


@dataclass
class PhaseResult:
    """``phase`` (a key of :data:`PHASES` or ``"none"``), ``distances`` (relation → distance of
    (p, q) to its line; NaN if p or q is NaN), ``holds`` (relations that hold: within ``tol`` of
    the line, or, for a flat z, α ≥ ``alpha_threshold``) and a one-paragraph ``explanation``."""

    phase: str
    distances: Dict[str, float] = field(default_factory=dict)
    holds: List[str] = field(default_factory=list)
    explanation: str = ""

    def to_dict(self) -> dict:
        return {"phase": self.phase,
                "distances": {k: (None if not math.isfinite(v) else v) for k, v in self.distances.items()},
                "holds": list(self.holds), "explanation": self.explanation}


def line_distances(p: float, q: float) -> Dict[str, float]:
    """Euclidean distance from (p, q) to each relation's line: ``|a·p + b·q − c| / √(a² + b²)``."""
    p, q = float(p), float(q)
    return {name: abs(ln.a * p + ln.b * q - ln.c) / math.hypot(ln.a, ln.b)
            for name, ln in LINES.items()}


def phase_point(phase) -> Optional[Tuple[float, float]]:
    """The (p, q) of a phase of SPEC §4; None for CRH, 1, 2, 3 (flat z: no exponents) and "none".

    Raises:
        ValueError: an unknown phase name (ints 1–9 are accepted as their strings).
    """
    key = str(phase)
    if key == "none":
        return None
    if key not in PHASES:
        raise ValueError(f"phase must be one of {list(PHASES)} or 'none', got {phase!r}")
    return PHASES[key].point


def is_flat(z, *, floor: float = 1e-6, tol: float = 0.1) -> bool:
    """Whether z is flat on its support, i.e. Z is (proportional to) a projection there.

    The support is ``z > floor·max z`` (the same floor as :func:`fit_exponents`); z is flat when
    ``ln(max z / min z) ≤ tol`` over it (default: within ~10 %). With so little spread the
    exponents p, q are undefined (or pure noise), so the phase must come from the alignments.
    An all-zero (or empty) z is not flat: there is no support at all.
    """
    arr = np.asarray(z.detach().cpu() if hasattr(z, "detach") else z, dtype=np.float64).ravel()
    if arr.size and not np.isfinite(arr).all():
        raise ValueError("z has NaN/inf entries")
    if not (0.0 <= floor < 1.0) or not tol >= 0.0:
        raise ValueError(f"need 0 ≤ floor < 1 and tol ≥ 0, got floor={floor!r}, tol={tol!r}")
    if arr.size == 0 or arr.max() <= 0:
        return False
    sup = arr[arr > floor * arr.max()]
    return bool(math.log(sup.max() / sup.min()) <= tol)


def _fmt(names) -> str:
    return ", ".join(names) if names else "none"


def classify_phase(p: float, q: float, *, tol: float = 0.25, z_flat: bool = False,
                   alignments: Optional[Mapping[str, float]] = None,
                   alpha_threshold: float = 0.5) -> PhaseResult:
    """The phase of SPEC §4 that exponents (p, q) (or, for a flat z, the alignments) indicate.

    Non-flat z (default): a relation holds when (p, q) is within ``tol`` of its line.
    Candidates are "backward CRH" if ≥ 2 backward relations hold (by the master theorem's
    directional redundancy two imply the third; requiring all three would miss e.g. (1.2, 0.8),
    which is within 0.25 of p = 1 and q = 1 but 0.28 from p = q), "forward CRH" likewise, and
    phase k ∈ 4..9 if both of its relations hold. Several candidates (only possible for a large
    ``tol``) are resolved by the nearest phase point; none gives "none" (the explanation lists
    what holds). NaN p or q gives "none". ``tol`` = 0.25 keeps the bands of neighbouring phases
    (points 1 apart) disjoint.

    Flat z (``z_flat=True``, e.g. from :func:`is_flat`): the exponents are undefined and p, q are
    ignored; a relation holds when ``alignments[rel] ≥ alpha_threshold`` (missing or NaN: does
    not hold). The rule, in order: all six → "CRH"; RGA (resp. RWA, GWA) on both sides → "1"
    ("2", "3") (if several pairs hold, the one with the largest smaller-α wins); all three
    backward → "backward CRH", all three forward → "forward CRH"; else "none". The default
    ``alpha_threshold`` = 0.5 sits well above the random baseline (≈ 0.14, rank 40 of 200) and
    below the paper's "very good" α > 0.7.

    ``alignments`` is optional when z is not flat; if given, the explanation also lists which
    relations have α ≥ ``alpha_threshold``, as a cross-check of the exponents.
    """
    if not tol > 0.0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if alignments is not None:
        unknown = set(alignments) - set(RELATIONS)
        if unknown:
            raise ValueError(f"alignments has unknown keys {sorted(unknown)}; expected {RELATIONS}")
    p = float("nan") if p is None else float(p)
    q = float("nan") if q is None else float(q)
    finite = math.isfinite(p) and math.isfinite(q)
    distances = line_distances(p, q) if finite else {k: float("nan") for k in LINES}

    def by_alpha():
        if alignments is None:
            return []
        return [r for r in RELATIONS
                if alignments.get(r) is not None and math.isfinite(float(alignments[r]))
                and float(alignments[r]) >= alpha_threshold]

    if z_flat:
        if alignments is None:
            raise ValueError("z_flat=True needs alignments (a dict like six_alignments' output): "
                             "with a flat z the exponents are undefined")
        holds = by_alpha()
        hs = set(holds)
        a = {r: float(alignments[r]) for r in holds}
        why = (f"z is flat (Z ∝ a projection), so the phase is read from the alignments with "
               f"threshold α ≥ {alpha_threshold}: holding {_fmt(holds)}.")
        if hs == set(RELATIONS):
            return PhaseResult("CRH", distances, holds, why + " All six hold: CRH.")
        pairs = [(min(a[f"backward_{k}"], a[f"forward_{k}"]), ph, k)
                 for ph, k in (("1", "RGA"), ("2", "RWA"), ("3", "GWA"))
                 if f"backward_{k}" in hs and f"forward_{k}" in hs]
        if pairs:
            _, ph, k = max(pairs)
            extra = ""
            if len(pairs) > 1:
                extra = (f" Several relation pairs hold ({', '.join(x[2] for x in pairs)}); by "
                         f"Theorem 2 that implies all six, so some α is just under the threshold; "
                         f"{k} has the strongest pair.")
            return PhaseResult(ph, distances, holds, why + f" {k} holds on both sides: phase {ph}."
                               + extra)
        if set(BACKWARD) <= hs:
            return PhaseResult("backward CRH", distances, holds, why + " All three backward hold.")
        if set(FORWARD) <= hs:
            return PhaseResult("forward CRH", distances, holds, why + " All three forward hold.")
        return PhaseResult("none", distances, holds,
                           why + " No phase of SPEC §4 matches (need a relation on both sides).")

    if not finite:
        return PhaseResult("none", distances, [],
                           f"exponents undefined (p={p}, q={q}); if z is flat (a projection), "
                           f"call with z_flat=True and alignments")
    holds = [r for r in RELATIONS if distances[r] <= tol]
    hs = set(holds)
    cands = []
    if len(hs & set(BACKWARD)) >= 2:
        cands.append("backward CRH")
    if len(hs & set(FORWARD)) >= 2:
        cands.append("forward CRH")
    for ph in ("4", "5", "6", "7", "8", "9"):
        if set(PHASES[ph].relations) <= hs:
            cands.append(ph)
    head = f"(p, q) = ({p:.3g}, {q:.3g}); relations within tol={tol} of their line: {_fmt(holds)}."
    if alignments is not None:
        head += f" Cross-check, α ≥ {alpha_threshold}: {_fmt(by_alpha())}."
    if not cands:
        return PhaseResult("none", distances, holds, head + " No backward and forward line "
                           "cross here, so this is no phase of SPEC §4 (partial CRH at most).")

    def dist(ph):
        pp, qq = PHASES[ph].point
        return math.hypot(p - pp, q - qq)

    best = min(cands, key=dist)
    pp, qq = PHASES[best].point
    text = head + f" Phase {best} ({PHASES[best].description}) at ({pp:g}, {qq:g})."
    if len(cands) > 1:
        text += f" Other candidates {', '.join(c for c in cands if c != best)} are farther."
    return PhaseResult(best, distances, holds, text)
