"""The phase diagram of docs/spec.md §4 (the paper's Table 1, re-derived): lines, points, classifier.

Owns: the six relation lines in the (p, q) exponent plane (:data:`LINES`), the phase points
(:data:`PHASES`, :func:`phase_point`, :data:`FORWARD_SLOPE`), distances to the lines
(:func:`line_distances`), the flatness test for z (:func:`is_flat`), the classifier
(:func:`classify_phase`), and a layer's verdict with its evidence (:func:`layer_verdict`: the α
reading against the layer's own baseline, the exponent reading through the quality gates of
:class:`VerdictGates`, the effective support, trivial layers; with standard errors, both
readings by 95 % intervals: a relation or line holds only when its whole interval clears the
bar, "undetermined" when it straddles it, issue 16). Pure interpretation: the exponents come from
:func:`crh_kernels.analysis.spectra.fit_exponents`, the alignments from
:func:`crh_kernels.analysis.align.six_alignments`.

Why lines: with ``h ~ z^p`` and ``g ~ z^q`` in W's singular basis (commuting matrices),
``H_b ~ z^(p+1)``, ``G_b ~ z^(q−1)``, ``Z_b ~ z``, ``Z_a ~ z``, so each proportionality is one
linear equation in (p, q); a phase is where a backward line crosses a forward line.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from .align import RELATIONS

__all__ = ["Line", "LINES", "PHASES", "FORWARD_SLOPE", "PhaseResult", "line_distances",
           "classify_phase", "phase_point", "is_flat", "BACKWARD", "FORWARD",
           "VerdictGates", "LayerVerdict", "layer_verdict", "alpha_reading", "exponent_reading",
           "effective_support", "isotropy", "name_relations", "trivial_reasons", "FLAT_FAMILY"]


class Line(NamedTuple):
    """The line ``a·p + b·q = c`` of one relation, with a human label."""

    a: float
    b: float
    c: float
    label: str


#: The six relations as lines in the (p, q) plane (docs/spec.md §4 first table).
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


#: docs/spec.md §4 second table. Phases 4–9 are crossings of one backward and one forward line; the
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
    """The (p, q) of a phase of docs/spec.md §4; None for CRH, 1, 2, 3 (flat z: no exponents) and "none".

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


def _phase_of_lines(p: float, q: float, holds) -> Tuple[str, List[str]]:
    """The phase :func:`classify_phase` names when the lines ``holds`` hold at (p, q), and the
    candidates: "backward CRH" (≥ 2 backward lines), "forward CRH" likewise, phase k ∈ 4..9
    (both its lines); the nearest phase point among several; ``("none", [])`` without one."""
    hs = set(holds)
    cands = []
    if len(hs & set(BACKWARD)) >= 2:
        cands.append("backward CRH")
    if len(hs & set(FORWARD)) >= 2:
        cands.append("forward CRH")
    for ph in ("4", "5", "6", "7", "8", "9"):
        if set(PHASES[ph].relations) <= hs:
            cands.append(ph)
    if not cands:
        return "none", []

    def dist(ph):
        pp, qq = PHASES[ph].point
        return math.hypot(p - pp, q - qq)

    return min(cands, key=dist), cands


def classify_phase(p: float, q: float, *, tol: float = 0.25, z_flat: bool = False,
                   alignments: Optional[Mapping[str, float]] = None,
                   alpha_threshold: float = 0.5) -> PhaseResult:
    """The phase of docs/spec.md §4 that exponents (p, q) (or, for a flat z, the alignments) indicate.

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
                           why + " No phase of docs/spec.md §4 matches (need a relation on both sides).")

    if not finite:
        return PhaseResult("none", distances, [],
                           f"exponents undefined (p={p}, q={q}); if z is flat (a projection), "
                           f"call with z_flat=True and alignments")
    holds = [r for r in RELATIONS if distances[r] <= tol]
    best, cands = _phase_of_lines(p, q, holds)
    head = f"(p, q) = ({p:.3g}, {q:.3g}); relations within tol={tol} of their line: {_fmt(holds)}."
    if alignments is not None:
        head += f" Cross-check, α ≥ {alpha_threshold}: {_fmt(by_alpha())}."
    if not cands:
        return PhaseResult("none", distances, holds, head + " No backward and forward line "
                           "cross here, so this is no phase of docs/spec.md §4 (partial CRH at most).")
    pp, qq = PHASES[best].point
    text = head + f" Phase {best} ({PHASES[best].description}) at ({pp:g}, {qq:g})."
    if len(cands) > 1:
        text += f" Other candidates {', '.join(c for c in cands if c != best)} are farther."
    return PhaseResult(best, distances, holds, text)


# =============================================================================== layer verdict
# Issue 13: a verdict a researcher can trust. Two independent readings of one layer, side by
# side: the α reading (which of the six relations hold against the layer's own random
# baseline) and the exponent reading (the (p, q) phase, named only when its fit passes the
# gates below); trivial layers are flagged and not classified. docs/spec.md §4 "When not to
# name a phase" states the rules; the numbers are the defaults of VerdictGates.

#: Phases of Table 1 that need a flat z (Z ∝ a projection on the effective support).
FLAT_FAMILY = ("CRH", "1", "2", "3")
#: Short names of the relations (the table's column headers).
SHORT = {"forward_RGA": "fRGA", "forward_RWA": "fRWA", "forward_GWA": "fGWA",
         "backward_RGA": "bRGA", "backward_RWA": "bRWA", "backward_GWA": "bGWA"}


@dataclass(frozen=True)
class VerdictGates:
    """The thresholds of :func:`layer_verdict`, with why each has its value.

    α reading — a relation *holds* when ``α ≥ max(alpha_threshold, baseline + alpha_margin)``:

    * ``alpha_threshold`` = 0.7: the paper's "very good alignment α > 0.7" (§6, res1).
    * ``alpha_margin`` = 0.5: α must also sit 0.5 above what two random covariances of the
      layer's dimension and of the two matrices' effective ranks give (:func:`~crh_kernels.
      analysis.align.relation_baselines`). That baseline is ≈ k/(d + 2k): ≤ 0.2 while the
      effective ranks are below d/3, so the margin binds only for high-rank matrices (the
      baseline of two full-rank random covariances is ≈ 1/3, making the bar ≈ 0.83). Since
      the baseline stays below 0.4, every α ≥ 0.9 holds.

    Effective support — the modes of W's singular basis that carry the layer's weight:

    * ``support_energy`` = 0.95: the fewest largest modes carrying 95 % of ``‖Z‖²_F = Σ z_i²``.
      Squared, because α is a correlation of entries: a mode weighs in α (and in the
      Frobenius distance to a projection) by z_i², so these are the modes α sees. (On Σ z_i a
      rank-one layer with a second mode at 0.17 would count two modes 6× apart.)
    * ``flat_log_span`` = ln 2: z is flat when max z / min z ≤ 2 over that support; two modes
      a factor 2 apart are still ≈ 0.95 aligned with a projection. A flat z makes the
      exponents undefined: the exponent reading is "flat" (Table 1's CRH and phases 1–3).

    Exponent reading — a (p, q) phase is named only when all gates pass:

    * ``min_modes`` = 5: modes in the fit (z, h and g above its floor). With 2 modes R² = 1
      whatever the data; 5 leaves 3 degrees of freedom to see a bend. Counted on the fit's
      support, not on the effective support: that one decides flatness, but for a clean power
      law (z over two decades on 12 modes) it holds only ~4 modes, while every mode measured
      above the floor is evidence for the exponent.
    * ``min_r2`` = 0.8 or ``max_scatter`` = 0.25, for p and for q separately: R² ≥ 0.8, or a
      residual spread rms(residual) / sd(log z) ≤ 0.25, i.e. the points scatter less than a
      slope change of 0.25 (``tol``) would move them. R² measures the variance the slope
      explains, which is small for any near-zero slope however clean (a flat h is a power
      law with p = 0), hence the second form.
    * ``max_commutation`` = 0.2: at most 20 % of H_a's energy off the diagonal in W's
      singular basis (:func:`~crh_kernels.analysis.commutation_error`; also G_a's when given).
      The lines assume commuting matrices; at 0.2 the diagonal part the exponents describe is
      still ≥ 0.89 (= √0.8) aligned with the whole matrix.
    * ``tol`` = 0.25: a relation's line holds within this distance of (p, q) (as
      :func:`classify_phase`).

    Trivial layers — flagged, not classified:

    * ``tiny_dim`` = 2: D_in or D_out ≤ 2 (α over ≤ 4 entries; d_out = 1 makes the forward
      matrices 1×1 and G_a ∝ Z_a by construction, since g_a = g_b·w).
    * ``white_isotropy`` = 0.9: H_a ∝ I (white inputs: p = 0 and H_b ∝ Z_b by construction)
      when its participation ratio (tr H)²/‖H‖²_F, corrected for the spread n white rows
      would show (× (1 + (d+1)/n)), is ≥ 0.9·d (:func:`isotropy`).
    """

    alpha_threshold: float = 0.7
    alpha_margin: float = 0.5
    support_energy: float = 0.95
    flat_log_span: float = math.log(2.0)
    min_modes: int = 5
    min_r2: float = 0.8
    max_scatter: float = 0.25
    max_commutation: float = 0.2
    tol: float = 0.25
    tiny_dim: int = 2
    white_isotropy: float = 0.9

    def __post_init__(self):
        checks = [("alpha_threshold", -1.0 <= self.alpha_threshold <= 1.0),
                  ("alpha_margin", self.alpha_margin >= 0.0),
                  ("support_energy", 0.0 < self.support_energy <= 1.0),
                  ("flat_log_span", self.flat_log_span >= 0.0),
                  ("min_modes", isinstance(self.min_modes, int) and self.min_modes >= 2),
                  ("min_r2", self.min_r2 <= 1.0),
                  ("max_scatter", self.max_scatter >= 0.0),
                  ("max_commutation", 0.0 <= self.max_commutation <= 1.0),
                  ("tol", self.tol > 0.0),
                  ("tiny_dim", isinstance(self.tiny_dim, int) and self.tiny_dim >= 1),
                  ("white_isotropy", self.white_isotropy > 0.0)]
        bad = [k for k, ok in checks if not ok]
        if bad:
            raise ValueError("VerdictGates: out of range: " + ", ".join(
                f"{k}={getattr(self, k)!r}" for k in bad))

    def to_dict(self) -> dict:
        return asdict(self)


def _arr(x) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    return a.ravel()


def _fin(v) -> Optional[float]:
    """A finite float or None."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def effective_support(z, energy: float = 0.95) -> np.ndarray:
    """The fewest largest z carrying ``energy`` of ``Σ z_i²`` (= ‖Z‖²_F), as a bool mask in
    z's order (ties at the cut are all kept). Empty when no z is positive.

    Raises:
        ValueError: a NaN/inf or negative z, or ``energy`` outside (0, 1].
    """
    arr = _arr(z)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError("z has NaN/inf entries")
    if arr.size and arr.min() < 0:
        raise ValueError(f"z must be ≥ 0 (squared singular values), got min {arr.min()!r}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    mask = np.zeros(arr.size, dtype=bool)
    if arr.size == 0 or arr.max() <= 0.0:
        return mask
    e = arr * arr
    order = np.argsort(-arr, kind="stable")
    cum = np.cumsum(e[order])
    k = int(np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12)) + 1)
    cut = arr[order[min(k, arr.size) - 1]]
    return arr >= cut


def isotropy(H, n: Optional[int] = None) -> float:
    """How close H is to ∝ I: the participation ratio ``(tr H)² / ‖H‖²_F`` over d, times
    ``1 + (d + 1)/n`` when the row count n is given (n white rows have an expected
    ``tr S² ≈ d·(1 + (d+1)/n)``, so their corrected value is ≈ 1). 1 for H ∝ I, 1/d for a
    rank-one H; NaN for H = 0. (``tr H`` of an indefinite H can make it meaningless: PSD only.)
    """
    m = np.asarray(H.detach().cpu() if hasattr(H, "detach") else H, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.size == 0:
        raise ValueError(f"H must be a non-empty square matrix, got shape {m.shape}")
    d = m.shape[0]
    fro2 = float((m * m).sum())
    if fro2 == 0.0:
        return float("nan")
    pr = float(np.trace(m)) ** 2 / fro2
    corr = 1.0 + (d + 1) / n if n else 1.0
    return pr * corr / d


def name_relations(holds, alphas: Optional[Mapping[str, float]] = None) -> Tuple[str, List[str]]:
    """The Table 1 row (docs/spec.md §4) that a set of holding relations makes: the phase with the most
    relations all of which hold (ties: the larger smallest α), else "partial" (some hold) or
    "none". Returns ``(name, extra)``, ``extra`` the holding relations the name leaves out.
    """
    hs = [r for r in RELATIONS if r in set(holds)]
    al = {r: (float(alphas[r]) if alphas and _fin(alphas.get(r)) is not None else 0.0) for r in hs}
    cands = [ph for ph, info in PHASES.items() if set(info.relations) <= set(hs)]
    if not cands:
        return ("partial" if hs else "none"), hs
    best = max(cands, key=lambda ph: (len(PHASES[ph].relations),
                                      min(al[r] for r in PHASES[ph].relations)))
    return best, [r for r in hs if r not in PHASES[best].relations]


def _subset_names(sure, unsure, name_of) -> List[str]:
    """The names ``name_of(sure ∪ S)`` over every subset S of ``unsure`` (at most 2⁶), sorted,
    without repeats: what the reading could be, however the undetermined relations resolve."""
    unsure = list(unsure)
    names = set()
    for mask in range(1 << len(unsure)):
        names.add(name_of(list(sure) + [r for i, r in enumerate(unsure) if mask >> i & 1]))
    return sorted(names)


def _interval_of(iv) -> Tuple[Optional[float], Optional[float], Optional[float], str]:
    """``(lo, hi, se, reason)`` of one entry of ``intervals`` (a dict or None)."""
    iv = iv or {}
    lo, hi = _fin(iv.get("lo")), _fin(iv.get("hi"))
    if lo is None or hi is None:
        lo = hi = None
    return lo, hi, _fin(iv.get("se")), str(iv.get("reason") or "")


def alpha_reading(alphas: Mapping[str, float], baselines: Optional[Mapping[str, dict]] = None,
                  gates: VerdictGates = VerdictGates(), *,
                  intervals: Optional[Mapping[str, Optional[dict]]] = None) -> dict:
    """Which relations hold by α: ``α ≥ max(alpha_threshold, baseline + alpha_margin)``.

    ``baselines``: :func:`~crh_kernels.analysis.align.relation_baselines` output (a missing or
    None baseline leaves only the threshold). Per relation ``{"alpha", "baseline", "ranks",
    "required", "status"}`` with status ``holds``, ``above baseline`` (α > baseline but short
    of the bar), ``not above baseline`` or ``undefined`` (α missing); then ``holds``, the
    phase ``name`` (:func:`name_relations`; ``"undefined"`` when no α is defined) and ``extra``.

    ``intervals`` (issue 16; a collector with ``blocks``): ``{relation: {"lo", "hi", "se",
    "reason"}}``, the 95 % interval of each α (:mod:`crh_kernels.analysis.errors`: the
    jackknife's, centred on the bias-corrected α). Then a relation holds only when the whole
    interval clears the bar (``lo ≥ required``); when it straddles the bar (``lo < required ≤
    hi``), or the interval is undefined while α is not, the status is ``undetermined`` with
    ``why``; an interval wholly below the bar gives the statuses above (from the point α). The
    ``name`` is the Table 1 row of the relations that hold if every way the undetermined ones
    could resolve gives that same row; else ``"undetermined"``, with the possible rows in
    ``candidates``. Each relation then also has ``se`` and ``interval`` ([lo, hi] or None).
    """
    rels, holds, unsure = {}, [], []
    for r in RELATIONS:
        a = _fin(alphas.get(r)) if alphas else None
        b = (baselines or {}).get(r) or {}
        base = _fin(b.get("baseline"))
        req = gates.alpha_threshold if base is None else max(gates.alpha_threshold,
                                                               base + gates.alpha_margin)
        extra = {}
        if intervals is not None:
            lo, hi, se, reason = _interval_of(intervals.get(r))
            extra = {"se": se, "interval": None if lo is None else [lo, hi]}
        if a is None:
            status = "undefined"
        elif intervals is not None and extra["interval"] is None:
            status = "undetermined"
            extra["why"] = f"no interval: {reason or 'its standard error is undefined'}"
        elif intervals is not None and lo < req <= hi:
            status = "undetermined"
            extra["why"] = (f"the 95 % interval [{lo:.3f}, {hi:.3f}] straddles the bar "
                            f"{req:.3f}")
        elif (a >= req) if intervals is None else (lo >= req):
            status = "holds"
            holds.append(r)
        elif base is not None and a > base:
            status = "above baseline"
        elif base is None:
            status = "below threshold"
        else:
            status = "not above baseline"
        if status == "undetermined":
            unsure.append(r)
        rels[r] = {"alpha": a, "baseline": base, "ranks": b.get("ranks"), "required": req,
                   "status": status, **extra}
    name, extra_rel = name_relations(holds, alphas)
    out = {"name": name, "holds": holds, "extra": extra_rel, "relations": rels,
           "rule": f"α ≥ max({gates.alpha_threshold:g}, baseline + {gates.alpha_margin:g})"}
    if intervals is not None:
        out["rule"] += " for the whole 95 % interval"
        out["undetermined"] = unsure
        cands = _subset_names(holds, unsure, lambda hs: name_relations(hs, alphas)[0])
        out["candidates"] = cands
        if len(cands) > 1:
            out["name"] = "undetermined"
    if all(r["status"] == "undefined" for r in rels.values()):
        out["name"] = "undefined"   # no α at all (no gradients seen, no weight, …): not "none"
    return out


def _scatter(fit_line, x: np.ndarray, y: np.ndarray) -> float:
    """rms of the residuals of ``y ≈ slope·x + intercept`` over sd(x); inf for a flat x."""
    slope, icpt = _fin(getattr(fit_line, "slope", None)), _fin(getattr(fit_line, "intercept", None))
    if slope is None or icpt is None or x.size < 2:
        return float("inf")
    sd = float(x.std())
    if sd == 0.0:
        return float("inf")
    res = y - (slope * x + icpt)
    return float(math.sqrt(float((res * res).mean())) / sd)


def _gate(value, limit, passed, text) -> dict:
    return {"value": value, "limit": limit, "passed": bool(passed), "text": text}


def exponent_reading(fit, gates: VerdictGates = VerdictGates(), *,
                     commutation_g: Optional[float] = None,
                     intervals: Optional[Mapping[str, object]] = None) -> dict:
    """The (p, q) phase of an :class:`~crh_kernels.analysis.ExponentFit`, named only through the
    gates of :class:`VerdictGates`.

    First the effective support (:func:`effective_support`): if z is flat there, the phase is
    ``"flat"`` (exponents undefined; Table 1 allows CRH, 1, 2, 3 and the α reading says which).
    Otherwise the gates ``modes``, ``p``, ``q``, ``commutation`` are evaluated; when all pass,
    :func:`classify_phase` names the phase (a point phase or ``"none"``), else the phase is
    ``"undetermined"`` and ``failed`` lists the gates that did not pass, ``reason`` the first
    with its value. ``commutation_g``: G_a's commutation error, gated with H_a's when given.

    Returns ``{"phase", "compatible" (the Table 1 rows the reading allows), "support": {"modes",
    "energy", "log_span", "flat", "flat_limit"}, "gates": {name: {value, limit, passed, text}},
    "failed", "p", "q", "holds" (relations within tol of their line, gated fits only),
    "reason"}``.

    ``intervals`` (issue 16; a collector with ``blocks``): ``{"p": {"lo", "hi", "se",
    "reason"}, "q": {...}, "lines": {relation: {...}}}``, the 95 % intervals of p, q and of
    each line's *signed* distance ``(a·p + b·q − c)/√(a² + b²)`` (its jackknife: the
    covariance of p and q is in it). When the gates pass, a line then holds only when its
    whole interval lies within ``[−tol, tol]``; it is out when the interval misses that band,
    and undetermined when it overlaps the band's edge (or has no interval). The phase is
    named when every way the undetermined lines could resolve names the same phase (the rule
    of :func:`classify_phase`); else it is ``"undetermined"`` through the gate ``interval``
    (value: the undetermined lines; the reason lists the possible phases). Adds ``p_se``,
    ``q_se``, ``p_interval``, ``q_interval`` and ``lines``: ``{relation: {"distance",
    "interval", "se", "status"}}`` (status ``holds``, ``out``, ``undetermined``).
    """
    z = _arr(fit.z)
    sup = effective_support(z, gates.support_energy) if z.size else np.zeros(0, dtype=bool)
    k = int(sup.sum())
    out = {"phase": "undetermined", "compatible": [], "gates": {}, "failed": [], "holds": [],
           "p": _fin(fit.p.slope), "q": _fin(fit.q.slope), "reason": "",
           "support": {"modes": k, "energy": gates.support_energy, "log_span": None,
                       "flat": False, "flat_limit": gates.flat_log_span}}
    if intervals is not None:
        for w in ("p", "q"):
            lo, hi, se, _ = _interval_of(intervals.get(w))
            out[f"{w}_se"], out[f"{w}_interval"] = se, (None if lo is None else [lo, hi])
    if k == 0:
        out["failed"] = ["support"]
        out["reason"] = "W = 0: no mode carries weight, so there are no exponents"
        return out
    zs = z[sup]
    span = float(math.log(zs.max() / zs.min()))
    out["support"]["log_span"] = span
    if span <= gates.flat_log_span:
        out["support"]["flat"] = True
        out.update(phase="flat", compatible=list(FLAT_FAMILY), p=None, q=None)
        out["reason"] = (f"z is flat on the effective support ({k} mode"
                         f"{'s carry' if k != 1 else ' carries'} "
                         f"{gates.support_energy:.0%} of ‖Z‖²; ln(max z/min z) = {span:.3g} "
                         f"≤ {gates.flat_log_span:.3g}): Z ∝ a projection there, the exponents "
                         f"are undefined, and Table 1 allows only CRH and phases 1–3 (the α "
                         f"reading says which)")
        return out

    g = out["gates"]
    n_modes = int(fit.p.n_modes)
    g["modes"] = _gate(n_modes, gates.min_modes, n_modes >= gates.min_modes,
                       f"modes in the fit {n_modes} (need ≥ {gates.min_modes})")
    mask = np.asarray(fit.support, dtype=bool)
    h, gg = _arr(fit.h), _arr(fit.g)
    usable = mask.size == z.size and mask.any()
    x = np.log(z[mask]) if usable else np.zeros(0)
    for name, line, y in (("p", fit.p, h), ("q", fit.q, gg)):
        slope, r2 = _fin(line.slope), _fin(line.r2)
        sc = _scatter(line, x, np.log(y[mask])) if usable and slope is not None else float("inf")
        ok = slope is not None and ((r2 is not None and r2 >= gates.min_r2)
                                    or sc <= gates.max_scatter)
        g[name] = dict(_gate(r2, gates.min_r2, ok,
                             f"{name} = {'undefined' if slope is None else f'{slope:.3g}'}: "
                             f"R² {'-' if r2 is None else f'{r2:.2f}'} (need ≥ {gates.min_r2:g}) "
                             f"or scatter {sc:.2f} (need ≤ {gates.max_scatter:g})"),
                       scatter=_fin(sc), scatter_limit=gates.max_scatter)
    comm = [c for c in (_fin(fit.commutation), _fin(commutation_g)) if c is not None]
    cval = max(comm) if comm else None
    if commutation_g is not None and _fin(fit.commutation) is not None:
        which = f"(H_a {fit.commutation:.3g}, G_a {commutation_g:.3g}) "
    else:
        which = ""
    g["commutation"] = _gate(cval, gates.max_commutation,
                             cval is not None and cval <= gates.max_commutation,
                             f"commutation error with Z_a {'-' if cval is None else f'{cval:.3g}'} "
                             f"{which}(need ≤ {gates.max_commutation:g})")
    if commutation_g is not None:
        g["commutation"]["H_a"] = _fin(fit.commutation)
        g["commutation"]["G_a"] = _fin(commutation_g)
    failed = [name for name, v in g.items() if not v["passed"]]
    out["failed"] = failed
    if failed:
        out["reason"] = ("not named: " + "; ".join(g[f]["text"] for f in failed))
        return out
    res = classify_phase(out["p"], out["q"], tol=gates.tol)
    if intervals is not None:
        named = _lines_by_interval(out, res, intervals, gates)
        if not named:
            return out
    holds = list(res.holds)
    if "lines" in out:   # with intervals: the lines whose whole interval is within tol
        holds = [r for r in RELATIONS if out["lines"][r]["status"] == "holds"]
    out.update(phase=res.phase, holds=holds,
               compatible=[] if res.phase == "none" else [res.phase])
    out["reason"] = "gates passed (" + "; ".join(v["text"] for v in g.values()) + "). " + \
        res.explanation
    return out


def _lines_by_interval(out: dict, res: PhaseResult, intervals: Mapping[str, object],
                       gates: VerdictGates) -> bool:
    """The exponent reading's line test with intervals (see :func:`exponent_reading`): fills
    ``out["lines"]`` and the gate ``interval``; on an undetermined phase also ``phase``,
    ``failed`` and ``reason``, and returns False. True: the phase ``res`` stands."""
    tol = gates.tol
    lines_iv = intervals.get("lines") or {}
    lines, sure, unsure = {}, [], []
    for r in RELATIONS:
        lo, hi, se, reason = _interval_of(lines_iv.get(r))
        d = _fin(res.distances.get(r))
        if lo is None:
            status = "undetermined"
        elif -tol <= lo and hi <= tol:
            status = "holds"
        elif hi < -tol or lo > tol:
            status = "out"
        else:
            status = "undetermined"
        (sure if status == "holds" else unsure if status == "undetermined" else []).append(r)
        lines[r] = {"distance": d, "interval": None if lo is None else [lo, hi], "se": se,
                    "status": status}
        if lo is None:
            lines[r]["why"] = f"no interval: {reason or 'its standard error is undefined'}"
    out["lines"] = lines
    p, q = out["p"], out["q"]
    names = _subset_names(sure, unsure, lambda hs: _phase_of_lines(p, q, hs)[0])
    ok = len(names) == 1
    pq = []
    for w in ("p", "q"):
        iv = out.get(f"{w}_interval")
        pq.append(f"{w} ∈ [{iv[0]:.3g}, {iv[1]:.3g}]" if iv else f"{w} without interval")
    text = (f"95 % intervals {', '.join(pq)}; lines whose interval of the signed distance "
            f"overlaps ±tol={tol:g} at its edge: {_fmt([SHORT[r] for r in unsure])}; possible "
            f"phases: {', '.join(names)}")
    out["gates"]["interval"] = _gate(len(unsure), 0, ok, text)
    if ok:
        return True
    out["failed"] = ["interval"]
    out["reason"] = "not named: " + text
    return False


@dataclass
class LayerVerdict:
    """One layer's verdict (:func:`layer_verdict`). ``verdict``: the α reading's name, or
    "trivial"; ``label``: the same with extras for the table; ``agreement``: whether the
    exponent reading names the same Table 1 row — a point phase equal to the α reading's, "none"
    beside "none"/"partial", or a flat z beside CRH/1/2/3 (None when it cannot tell:
    undetermined, not applicable, a flat z beside another name, or a trivial layer);
    ``trivial``: ``[{"kind", "reason"}]``; ``alpha`` and ``exponent``: the two readings
    (:func:`alpha_reading`, :func:`exponent_reading`); ``explanation``: one paragraph."""

    verdict: str
    label: str
    agreement: Optional[bool]
    trivial: List[dict]
    alpha: dict
    exponent: dict
    explanation: str
    gates: dict = field(default_factory=dict)

    @property
    def agree_text(self) -> str:
        if self.trivial:
            return "-"
        return {True: "yes", False: "no", None: "?"}[self.agreement]

    def to_dict(self) -> dict:
        def clean(v):
            if isinstance(v, dict):
                return {str(k): clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, (float, np.floating)):
                return _fin(v)
            if isinstance(v, np.integer):
                return int(v)
            if isinstance(v, np.bool_):
                return bool(v)
            return v

        return clean({"verdict": self.verdict, "label": self.label, "agreement": self.agreement,
                      "agree": self.agree_text, "trivial": self.trivial, "alpha": self.alpha,
                      "exponent": self.exponent, "explanation": self.explanation,
                      "gates": self.gates})


def trivial_reasons(dims: Mapping[str, Optional[int]], *, isotropy_a: Optional[float] = None,
                    gates: VerdictGates = VerdictGates()) -> List[dict]:
    """Why a layer is trivial (empty: it is not). ``dims``: ``{"a": D_in, "b": D_out}``;
    ``isotropy_a``: :func:`isotropy` of H_a (the covariance α uses), with the row count."""
    out = []
    d_in, d_out = dims.get("a"), dims.get("b")
    if d_out == 1:
        out.append({"kind": "d_out=1", "reason": "d_out = 1: H_b, G_b and Z_b are 1×1 (the "
                    "forward α are undefined) and g_a = g_b·w makes G_a ∝ w wᵀ = Z_a, so the "
                    "backward GWA holds by construction"})
    if d_in == 1:
        out.append({"kind": "d_in=1", "reason": "d_in = 1: H_a, G_a and Z_a are 1×1 (the "
                    "backward α are undefined) and H_b ∝ Z_b by construction"})
    small = [f"{s} = {d}" for s, d in (("D_in", d_in), ("D_out", d_out))
             if d is not None and 1 < d <= gates.tiny_dim]
    if small:
        out.append({"kind": "tiny", "reason": f"{', '.join(small)} ≤ {gates.tiny_dim}: α over "
                    f"at most {gates.tiny_dim ** 2} entries says little"})
    iso = _fin(isotropy_a)
    if iso is not None and iso >= gates.white_isotropy:
        out.append({"kind": "white input", "value": iso, "limit": gates.white_isotropy,
                    "reason": f"white input: H_a ∝ I (isotropy {iso:.3f} ≥ "
                    f"{gates.white_isotropy:g}), so h has the same variance in every direction: "
                    f"p = 0 and H_b = W H_a Wᵀ ∝ Z_b by construction"})
    return out


def _label(name: str, extra) -> str:
    if name == "partial":
        return "partial: " + " ".join(SHORT[r] for r in extra)
    if extra:
        return name + " +" + " ".join(SHORT[r] for r in extra)
    return name


def layer_verdict(alphas: Mapping[str, float], *, dims: Mapping[str, Optional[int]],
                  fit=None, baselines: Optional[Mapping[str, dict]] = None,
                  isotropy_a: Optional[float] = None, commutation_g: Optional[float] = None,
                  no_fit_reason: str = "no exponent fit", applicable: bool = True,
                  gates: VerdictGates = VerdictGates(),
                  intervals: Optional[Mapping[str, object]] = None) -> LayerVerdict:
    """A layer's verdict with its evidence (issue 13; docs/spec.md §4 "When not to name a phase").

    Args:
        alphas: the six α (covariances, :func:`~crh_kernels.analysis.six_alignments`).
        dims: ``{"a": D_in, "b": D_out}`` (None where unknown).
        fit: the layer's :class:`~crh_kernels.analysis.ExponentFit`, or None.
        baselines: :func:`~crh_kernels.analysis.align.relation_baselines` of the layer.
        isotropy_a: :func:`isotropy` of H_a with the row count (white-input test).
        commutation_g: G_a's commutation error (gated with H_a's).
        no_fit_reason: why ``fit`` is None (shown as the exponent reading's reason).
        applicable: False when exponents cannot exist (no weight: an attention head).
        intervals: the 95 % intervals of a collector with ``blocks`` (issue 16; None: point
            estimates only): ``{"alpha": {relation: {"lo", "hi", "se", "reason"}}, "p": {..},
            "q": {..}, "lines": {relation: {..}}}``, read by :func:`alpha_reading` and
            :func:`exponent_reading` (a relation or a line holds only when its whole interval
            clears the bar; "undetermined" when it straddles it).

    The verdict is the α reading (the paper's own measure); the exponent reading stands beside
    it, and ``agreement`` says whether both name the same Table 1 row. A trivial layer
    (:func:`trivial_reasons`) gets the verdict "trivial": both readings are still computed and
    kept as evidence, but neither is a finding.
    """
    al = alpha_reading(alphas, baselines, gates,
                       intervals=None if intervals is None else (intervals.get("alpha") or {}))
    if fit is not None:
        ex = exponent_reading(fit, gates, commutation_g=commutation_g, intervals=intervals)
    else:
        ex = {"phase": "not applicable" if not applicable else "undetermined", "compatible": [],
              "gates": {}, "failed": [] if not applicable else ["fit"], "holds": [],
              "p": None, "q": None, "support": None, "reason": no_fit_reason}
    triv = trivial_reasons(dims, isotropy_a=isotropy_a, gates=gates)
    name = al["name"]
    if triv:
        verdict, label, agreement = "trivial", "trivial: " + triv[0]["kind"], None
    else:
        verdict, label = name, _label(name, al["extra"])
        if name == "undetermined":
            label = "undet: " + "/".join(al["candidates"])
        elif al.get("undetermined"):
            label += " ?" + " ?".join(SHORT[r] for r in al["undetermined"])
        if ex["phase"] in ("undetermined", "not applicable") or name in ("undefined",
                                                                          "undetermined"):
            agreement = None
        elif ex["phase"] == "flat":
            # A flat z is what CRH and phases 1–3 need, not a phase itself: it confirms those
            # and contradicts nothing else (with a flat z every line "holds" for z alone).
            agreement = True if name in FLAT_FAMILY else None
        elif ex["phase"] == "none":
            agreement = name in ("none", "partial")
        else:
            agreement = name == ex["phase"]

    holds = ", ".join(SHORT[r] for r in al["holds"]) or "none"
    verb = "holds" if len(al["holds"]) == 1 else "hold"
    parts = []
    if triv:
        parts.append("Trivial, not classified: " + "; ".join(t["reason"] for t in triv) + ".")
    alpha_text = f"α reading: {holds} {verb} ({al['rule']}, baseline at the layer's effective " \
                 f"ranks)"
    if al.get("undetermined"):
        alpha_text += (f"; undetermined (the interval straddles the bar, or has none): "
                       f"{', '.join(SHORT[r] for r in al['undetermined'])}")
    if name == "undetermined":
        alpha_text += f" → undetermined: could be {' or '.join(al['candidates'])}."
    else:
        alpha_text += f" → {_label(name, al['extra'])}."
    parts.append(alpha_text)
    parts.append(f"Exponent reading: {ex['phase']} — {ex['reason'].rstrip('.')}.")
    if not triv:
        if agreement is None and ex["phase"] == "flat":
            parts.append(f"Agreement: cannot tell (a flat z makes the exponents undefined; it "
                         f"supports only CRH and phases 1–3, and the α reading says {name}).")
        elif agreement is None and name == "undetermined":
            parts.append("Agreement: cannot tell (the α reading names no row).")
        elif agreement is None:
            parts.append("Agreement: cannot tell (the exponent reading names no phase).")
        else:
            also = " → " + "/".join(ex["compatible"]) if ex["phase"] == "flat" else ""
            parts.append(f"Agreement: {'yes' if agreement else 'no'} (α: {name}; exponents: "
                         f"{ex['phase']}{also}).")
    return LayerVerdict(verdict=verdict, label=label, agreement=agreement, trivial=triv,
                        alpha=al, exponent=ex, explanation=" ".join(parts),
                        gates=gates.to_dict())
