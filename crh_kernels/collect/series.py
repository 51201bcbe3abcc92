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

Standard errors (issue 16): when the collector keeps sub-states (``Collector(blocks=K)``), every
point also records the jackknife standard error of each α (:func:`alpha_point_se`,
:mod:`crh_kernels.analysis.errors`) from the layer's K leave-one-out views of the running
state. Extra cost of a point, per layer: the K leave-one-out merges of each stream (K − 1
Chan merges each, O(K²·D²), held only while the point is taken: they are released after it),
K times the four covariance views and the six correlations (W's Grams are shared, computed
once); no eigendecomposition. Memory of the series: twelve floats per layer per point.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Optional

from ..analysis import RELATIONS, six_alignments
from ..analysis.errors import empty_blocks, jackknife
from ..report import check_alpha_series

__all__ = ["AlphaSeries", "alpha_point", "alpha_point_se"]


def alpha_point(layers: Mapping[str, object]) -> Dict[str, Dict[str, Optional[float]]]:
    """``{layer name: {relation: α or None}}``, the six α on covariances of each layer's
    current states (``layers``: name -> :class:`~crh_kernels.collect.LayerStats`, every row
    already in its state, e.g. ``col.layers``). None where the relation is undefined (a
    stream without rows, a constant matrix): the report's convention. Warnings of the analysis
    (a constant matrix) are not repeated at every point: the final report keeps them."""
    out = {}
    for name, st in layers.items():
        vals = _six(st)
        out[name] = {r: (v if math.isfinite(v) else None) for r, v in vals.items()}
    return out


class _Without:
    """What :func:`six_alignments` reads of one leave-one-out view, with the layer's Grams
    (weights are not blocked: the same W for every view, computed once)."""

    def __init__(self, view, grams):
        for attr in ("H_a", "H_b", "G_a", "G_b"):
            setattr(self, attr, getattr(view, attr, None))
        self._grams = grams

    def Z_a(self):
        return self._grams[0]

    def Z_b(self):
        return self._grams[1]


def _six(layer) -> Dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return six_alignments(layer, "cov")


def alpha_point_se(layers: Mapping[str, object], point: Optional[Mapping[str, Mapping]] = None
                   ) -> Optional[Dict[str, Dict[str, Optional[float]]]]:
    """``{layer name: {relation: jackknife se or None}}`` of the six α on covariances, from each
    layer's leave-one-out views (``LayerStats.leave_one_out()``); None when no layer keeps
    sub-states. ``point``: the α of the full states (:func:`alpha_point`), computed when not
    given. A layer without sub-states gets None for every relation. The merges are released
    after use (``release_leave_one_out``) so that they hold no memory between points."""
    point = alpha_point(layers) if point is None else point
    out, any_blocks = {}, False
    for name, st in layers.items():
        if not getattr(st, "n_blocks", None):
            out[name] = {r: None for r in RELATIONS}
            continue
        any_blocks = True
        # checked before the K merges are built: empty blocks give no se (and say why)
        why_not = empty_blocks(st.block_counts())
        if why_not is not None:
            out[name] = {r: None for r in RELATIONS}
            continue
        try:
            grams = (st.Z_a(), st.Z_b())
            loo = [_six(_Without(v, grams)) for v in st.leave_one_out()]
        finally:
            st.release_leave_one_out()
        full = point.get(name, {})
        out[name] = {r: jackknife(full.get(r), [d[r] for d in loo]).se for r in RELATIONS}
    return out if any_blocks else None


class AlphaSeries:
    """The six α per layer at steps ``every, 2·every, …`` (see the module docstring).

    Attributes:
        every: the spacing K in collector steps.
        steps: the collector step of each point (``col.steps`` after its ``step()`` call).
        layers: ``{layer name: {relation: [α or None per point]}}``, aligned with ``steps``.
        se: ``{layer name: {relation: [jackknife se or None per point]}}`` when the collector
            keeps sub-states (``blocks=K``), else None; ``k``: that K (None without).
    """

    def __init__(self, every: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"alpha_every must be a positive int or None, got {every!r}")
        self.every = every
        self.steps: List[int] = []
        self.layers: Dict[str, Dict[str, List[Optional[float]]]] = {}
        self.se: Optional[Dict[str, Dict[str, List[Optional[float]]]]] = None
        self.k: Optional[int] = None

    def __len__(self) -> int:
        return len(self.steps)

    def due(self, step: int) -> bool:
        """Whether a point is taken at collector step ``step``."""
        return step > 0 and step % self.every == 0

    def record(self, step: int, layers: Mapping[str, object]) -> Dict[str, Dict[str, Optional[float]]]:
        """Append the point of ``layers``' current states at ``step`` and return it. A second
        point at the step of the last one replaces it (the states may have changed since).
        With sub-states, the standard errors of the point are recorded too (:attr:`se`)."""
        point = alpha_point(layers)
        se = alpha_point_se(layers, point)
        if self.steps and self.steps[-1] == step:
            self.steps.pop()
            for table in (self.layers, self.se or {}):
                for rels in table.values():
                    for vals in rels.values():
                        vals.pop()
        n = len(self.steps)
        if se is not None and self.se is None:
            self.se = {name: {r: [None] * n for r in RELATIONS} for name in self.layers}
        if se is not None:
            self.k = next((int(st.n_blocks) for st in layers.values()
                           if getattr(st, "n_blocks", None)), self.k)
        for name in point:
            self.layers.setdefault(name, {r: [None] * n for r in RELATIONS})
            if self.se is not None:
                self.se.setdefault(name, {r: [None] * n for r in RELATIONS})
        for name, rels in self.layers.items():
            got = point.get(name, {})
            for r in RELATIONS:
                rels[r].append(got.get(r))
        for name, rels in (self.se or {}).items():
            got = (se or {}).get(name, {})
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
        self.se = None
        self.k = None

    def to_dict(self) -> dict:
        """JSON-ready: ``{"kind": "cov", "every", "steps", "layers"}``, plus ``"se"`` (same
        shape as ``layers``) and ``"k"`` with sub-states (the form :class:`crh_kernels.Report`
        stores as ``alpha_series``)."""
        d = {"kind": "cov", "every": self.every, "steps": list(self.steps),
             "layers": {n: {r: list(v) for r, v in rels.items()} for n, rels in self.layers.items()}}
        if self.se is not None:
            d["se"] = {n: {r: list(v) for r, v in rels.items()} for n, rels in self.se.items()}
            d["k"] = self.k
        return d

    @classmethod
    def from_dict(cls, d, where: str = "α series") -> "AlphaSeries":
        """Inverse of :meth:`to_dict`; a malformed dict raises ``ValueError`` naming ``where``
        and the field (:func:`crh_kernels.report.check_alpha_series`)."""
        check_alpha_series(d, where)
        s = cls(d["every"])
        s.steps = [int(x) for x in d["steps"]]
        s.layers = {n: {r: [None if v is None else float(v) for v in rels[r]] for r in RELATIONS}
                    for n, rels in d["layers"].items()}
        if d.get("se") is not None:
            s.se = {n: {r: [None if v is None else float(v) for v in rels[r]] for r in RELATIONS}
                    for n, rels in d["se"].items()}
            s.k = d.get("k")
        return s

    def __repr__(self) -> str:
        return f"AlphaSeries(every={self.every}, {len(self.steps)} points, {len(self.layers)} layers)"
