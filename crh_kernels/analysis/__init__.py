"""crh_kernels.analysis: turning accumulated moments into CRH / PAH statements (docs/spec.md §3, §4).

* :mod:`.align` — the alignment α (eq. 11), the six relations of a layer, the random baseline;
* :mod:`.spectra` — eigendecomposition, effective rank, exponent fit (p, q, forward slope),
  sorted-spectrum pairing and its slope (:func:`pairing_fit`), commutation error: every fit;
* :mod:`.phases` — the (p, q) phase diagram (docs/spec.md §4's re-derived Table 1), the classifier, and
  a layer's verdict with its evidence (:func:`layer_verdict`, gates in :class:`VerdictGates`);
* :mod:`.errors` — standard errors from mergeable sub-states: the delete-one-block jackknife
  (:func:`jackknife`), its t multiplier and intervals (issue 16).

Pure functions on tensors, float64. Public names only; no logic lives here.
"""
from .align import (KINDS, RELATION_MATRICES, RELATIONS, alignment,
                    effective_rank_of_spectrum, random_baseline, relation_baselines,
                    six_alignments)
from .errors import Jackknife, against, empty_blocks, jackknife, jackknife_dict, multiplier, t_quantile
from .phases import (BACKWARD, FLAT_FAMILY, FORWARD, FORWARD_SLOPE, LINES, PHASES, LayerVerdict,
                     Line, PhaseResult, VerdictGates, alpha_reading, classify_phase,
                     effective_support, exponent_reading, is_flat, isotropy, layer_verdict,
                     line_distances, name_relations, phase_point, trivial_reasons)
from .spectra import (ExponentFit, LineFit, commutation_error, effective_rank, eigh,
                      fit_exponents, identity_residual, pairing_fit)

__all__ = [
    "alignment", "six_alignments", "random_baseline", "relation_baselines", "RELATIONS",
    "RELATION_MATRICES", "KINDS", "effective_rank_of_spectrum",
    "eigh", "effective_rank", "fit_exponents", "pairing_fit", "commutation_error", "LineFit",
    "ExponentFit", "identity_residual",
    "LINES", "Line", "PHASES", "FORWARD_SLOPE", "BACKWARD", "FORWARD", "PhaseResult",
    "line_distances", "classify_phase", "phase_point", "is_flat",
    "VerdictGates", "LayerVerdict", "layer_verdict", "alpha_reading", "exponent_reading",
    "effective_support", "isotropy", "name_relations", "trivial_reasons", "FLAT_FAMILY",
    "Jackknife", "jackknife", "jackknife_dict", "multiplier", "t_quantile", "against", "empty_blocks",
]
