"""What the trainer callbacks share (:class:`Measurement`): the collector's life cycle over a
training run, the numbers and text logged every ``log_every`` steps, and the report files
written at the end. No trainer package is imported here; no statistic is computed here either
(the Collector, its α series and its Report do that).

Logged names: ``crh/alpha/<layer>/<relation>`` (the six α on covariances of each layer, from
the running state; an undefined α is not logged) and, with ``log_phase``, ``crh/phases``: a
Markdown table of each layer's phase and its explanation (the report's verdict), as text.
Files at the end, in ``out_dir``: ``report.json`` (:meth:`Report.to_json`), ``table.txt``
(:meth:`Report.table`) and, with ``plot=True``, the report's figures.
"""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Dict, Optional, Tuple

from ..collect import Collector
from ..collect.series import alpha_point

__all__ = ["Measurement", "ALPHA_PREFIX", "PHASES_TAG"]

ALPHA_PREFIX = "crh/alpha"
PHASES_TAG = "crh/phases"

_NOT_KWARGS = ("model", "alpha_every")


def _positive(name: str, v) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    return v


class Measurement:
    """A Collector over one training run, driven by a trainer callback.

    Args:
        out_dir: where the report is written at the end of training (None: nowhere; the
            report is still :attr:`report`).
        log_every: log every this many trainer steps (None: never).
        alpha_every: keep the α series every this many steps (``Collector(alpha_every=)``).
        log_phase: with each log, also the phase of every layer (builds a full report, with
            its eigendecompositions, at each log step; False logs the α alone, which need none).
        plot: also write the report's figures at the end (needs matplotlib).
        collector_kwargs: passed to :class:`~crh_kernels.Collector` (``modules``, ``streams``,
            ``max_rows``, ``heads``, …).
    """

    def __init__(self, out_dir=None, *, log_every: Optional[int] = None,
                 alpha_every: Optional[int] = None, log_phase: bool = True, plot: bool = False,
                 collector_kwargs: Optional[dict] = None):
        self.out_dir = None if out_dir is None else os.fspath(out_dir)
        self.log_every = _positive("log_every", log_every)
        self.alpha_every = _positive("alpha_every", alpha_every)
        self.log_phase = bool(log_phase)
        self.plot = bool(plot)
        kw = dict(collector_kwargs or {})
        clash = [k for k in _NOT_KWARGS if k in kw]
        if clash:
            raise TypeError(f"{clash[0]!r} is set by the callback, not a Collector argument here")
        try:
            inspect.signature(Collector).bind_partial(None, **kw)
        except TypeError as exc:
            raise TypeError(f"not a Collector argument: {exc}") from None
        self.collector_kwargs = kw
        self.collector: Optional[Collector] = None
        self.report = None
        self._on = False

    # ------------------------------------------------------------ life cycle
    def begin(self, model) -> Collector:
        """A new Collector on ``model`` (hooks not yet added: :meth:`resume` adds them)."""
        if model is None:
            raise ValueError("the trainer handed the callback no model to measure")
        self.pause()
        self.collector = Collector(model, alpha_every=self.alpha_every, **self.collector_kwargs)
        self.report = None
        return self.collector

    def resume(self) -> None:
        """Add the hooks (training passes are collected from here on)."""
        if self.collector is not None and not self._on:
            self.collector.start()
            self._on = True

    def pause(self) -> bool:
        """Remove the hooks (evaluation passes are not training rows); True if they were on."""
        if self.collector is not None and self._on:
            self.collector.stop()
            self._on = False
            return True
        return False

    def step(self) -> None:
        """One optimizer step of the trainer is over."""
        if self.collector is not None:
            self.collector.step()

    def due(self, global_step: int) -> bool:
        return self.log_every is not None and global_step > 0 and global_step % self.log_every == 0

    # -------------------------------------------------------------- logging
    def metrics(self) -> Tuple[Dict[str, float], Optional[str]]:
        """The numbers to log now and, with ``log_phase``, the phase table (Markdown)."""
        col = self.collector
        if col is None:
            return {}, None
        text = None
        if self.log_phase:
            rep = col.report()
            alphas = {name: e.get("alpha_cov") or {} for name, e in rep.layers.items()}
            text = phase_table(rep)
        else:
            alphas = alpha_point(col.layers)
        numbers = {f"{ALPHA_PREFIX}/{name}/{rel}": float(v)
                   for name, rels in alphas.items() for rel, v in rels.items() if v is not None}
        return numbers, text

    # ------------------------------------------------------------------ end
    def end(self, write: bool = True):
        """Remove the hooks, build the final report and, when ``write`` and ``out_dir`` is
        set, write it there. Returns the report (None when no training step ran)."""
        self.pause()
        if self.collector is None:
            return None
        self.report = self.collector.report()
        if write and self.out_dir is not None:
            write_report(self.report, self.out_dir, plot=self.plot)
        return self.report


def phase_table(rep) -> str:
    """Each layer's phase and its explanation as a Markdown table."""
    lines = ["| layer | phase | explanation |", "| --- | --- | --- |"]
    for name, e in rep.layers.items():
        why = (e.get("phase_explanation") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {e.get('phase') or '-'} | {why} |")
    return "\n".join(lines)


def write_report(rep, out_dir: str, *, plot: bool = False) -> list:
    """``report.json`` and ``table.txt`` under ``out_dir`` (and the figures with ``plot``; a
    figure that fails is a warning, the numbers are already written). Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [rep.to_json(os.path.join(out_dir, "report.json"))]
    table = os.path.join(out_dir, "table.txt")
    with open(table, "w") as f:
        f.write(rep.table() + "\n")
    paths.append(table)
    if plot:
        try:
            paths += rep.plot(out_dir, heatmaps=False)
        except Exception as exc:   # the numbers are on disk; a figure is not worth the run
            warnings.warn(f"CRHCallback: figures not written ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})", RuntimeWarning,
                          stacklevel=2)
    return paths
