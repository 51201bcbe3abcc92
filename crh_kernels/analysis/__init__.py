"""crh_kernels.analysis: turning accumulated moments into CRH / PAH statements (SPEC §3, §4).

* :mod:`.align` — the alignment α (eq. 11), the six relations of a layer, the random baseline;
* :mod:`.spectra` — eigendecomposition, effective rank, exponent fit (p, q, forward slope),
  sorted-spectrum pairing and its slope (:func:`pairing_fit`), commutation error: every fit;
* :mod:`.phases` — the (p, q) phase diagram (SPEC §4's re-derived Table 1) and the classifier.

Pure functions on tensors, float64. Public names only; no logic lives here.
"""
from .align import KINDS, RELATIONS, alignment, random_baseline, six_alignments
from .phases import (BACKWARD, FORWARD, FORWARD_SLOPE, LINES, PHASES, Line, PhaseResult,
                     classify_phase, is_flat, line_distances, phase_point)
from .spectra import (ExponentFit, LineFit, commutation_error, effective_rank, eigh,
                      fit_exponents, pairing_fit)

__all__ = [
    "alignment", "six_alignments", "random_baseline", "RELATIONS", "KINDS",
    "eigh", "effective_rank", "fit_exponents", "pairing_fit", "commutation_error", "LineFit",
    "ExponentFit",
    "LINES", "Line", "PHASES", "FORWARD_SLOPE", "BACKWARD", "FORWARD", "PhaseResult",
    "line_distances", "classify_phase", "phase_point", "is_flat",
]
