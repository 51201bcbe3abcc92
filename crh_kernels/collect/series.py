"""The six α of every layer over training: :class:`AlphaSeries` and :func:`alpha_point`.

Owns the time series a :class:`~crh_kernels.collect.Collector` keeps with ``alpha_every=K``:
every K steps, the six α on covariances of every layer (docs/spec.md §3,
:func:`crh_kernels.analysis.six_alignments`) are computed from the collector's running states,
the very states the final report reads, so no second pass over data is made and the series'
point at step ``s`` is what ``col.report()`` would have said at that step. Its dict form
(:meth:`AlphaSeries.to_dict`) is what :class:`crh_kernels.Report` stores (``alpha_series``) and
:func:`crh_kernels.plots.plot_alpha_series` draws.

Cost of a point, per layer: the covariance view of each of the four states (O(D²)), the weight
Grams WᵀW and WWᵀ in float64 (O(D_out·D_in·(D_in + D_out))) and six Pearson correlations of
D×D matrices (O(D²)); no eigendecomposition. The series' memory is six floats per layer per
point.

What a point means: the states accumulate every collected row since the start (or the last
``reset()``), so a point is the α of the rows seen so far, against the weights of that step.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Optional

from ..analysis import RELATIONS, six_alignments
from ..report import check_alpha_series

__all__ = ["AlphaSeries", "alpha_point"]


def alpha_point(layers: Mapping[str, object]) -> Dict[str, Dict[str, Optional[float]]]:
    """``{layer name: {relation: α or None}}``, the six α on covariances of each layer's
    current states (``layers``: name -> :class:`~crh_kernels.collect.LayerStats`, every row
    already in its state, e.g. ``col.layers``). None where the relation is undefined (a
    stream without rows, a constant matrix): the report's convention. Warnings of the analysis
    (a constant matrix) are not repeated at every point: the final report keeps them."""
    out = {}
    for name, st in layers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            vals = six_alignments(st, "cov")
        out[name] = {r: (v if math.isfinite(v) else None) for r, v in vals.items()}
    return out


class AlphaSeries:
    """The six α per layer at steps ``every, 2·every, …`` (see the module docstring).

    Attributes:
        every: the spacing K in collector steps.
        steps: the collector step of each point (``col.steps`` after its ``step()`` call).
        layers: ``{layer name: {relation: [α or None per point]}}``, aligned with ``steps``.
    """

    def __init__(self, every: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"alpha_every must be a positive int or None, got {every!r}")
        self.every = every
        self.steps: List[int] = []
        self.layers: Dict[str, Dict[str, List[Optional[float]]]] = {}

    def __len__(self) -> int:
        return len(self.steps)

    def due(self, step: int) -> bool:
        """Whether a point is taken at collector step ``step``."""
        return step > 0 and step % self.every == 0

    def record(self, step: int, layers: Mapping[str, object]) -> Dict[str, Dict[str, Optional[float]]]:
        """Append the point of ``layers``' current states at ``step`` and return it. A second
        point at the step of the last one replaces it (the states may have changed since)."""
        point = alpha_point(layers)
        if self.steps and self.steps[-1] == step:
            self.steps.pop()
            for rels in self.layers.values():
                for vals in rels.values():
                    vals.pop()
        n = len(self.steps)
        for name in point:
            self.layers.setdefault(name, {r: [None] * n for r in RELATIONS})
        for name, rels in self.layers.items():
            got = point.get(name, {})
            for r in RELATIONS:
                rels[r].append(got.get(r))
        self.steps.append(int(step))
        return point

    def last(self) -> Optional[Dict[str, Dict[str, Optional[float]]]]:
        """The latest point (``{layer: {relation: α or None}}``), None before the first."""
        if not self.steps:
            return None
        return {name: {r: vals[-1] for r, vals in rels.items()} for name, rels in self.layers.items()}

    def clear(self) -> None:
        """Forget every point."""
        self.steps = []
        self.layers = {}

    def to_dict(self) -> dict:
        """JSON-ready: ``{"kind": "cov", "every", "steps", "layers"}`` (the form
        :class:`crh_kernels.Report` stores as ``alpha_series``)."""
        return {"kind": "cov", "every": self.every, "steps": list(self.steps),
                "layers": {n: {r: list(v) for r, v in rels.items()} for n, rels in self.layers.items()}}

    @classmethod
    def from_dict(cls, d, where: str = "α series") -> "AlphaSeries":
        """Inverse of :meth:`to_dict`; a malformed dict raises ``ValueError`` naming ``where``
        and the field (:func:`crh_kernels.report.check_alpha_series`)."""
        check_alpha_series(d, where)
        s = cls(d["every"])
        s.steps = [int(x) for x in d["steps"]]
        s.layers = {n: {r: [None if v is None else float(v) for v in rels[r]] for r in RELATIONS}
                    for n, rels in d["layers"].items()}
        return s

    def __repr__(self) -> str:
        return f"AlphaSeries(every={self.every}, {len(self.steps)} points, {len(self.layers)} layers)"
