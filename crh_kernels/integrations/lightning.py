"""``CRHCallback`` for ``lightning.Trainer`` (extra ``[lightning]``).

Attaches a :class:`~crh_kernels.Collector` to the LightningModule when training starts, steps
it with every optimizer step (``trainer.global_step``), logs the six α per layer every
``log_every`` steps to every logger of the trainer (``logger.log_metrics``) and the phase table
as text to its TensorBoard loggers, and writes the report at the end of training. Names and
files: :mod:`._common`.

Rows: training batches only (the hooks come off during validation, and the sanity check runs
before they go on). Under several processes each measures the rows it sees; global rank 0 logs
and writes its own collector's numbers.
"""
from __future__ import annotations

import warnings
from typing import Optional

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("crh_kernels.integrations.lightning needs lightning: "
                      "pip install 'crh-kernels[lightning]'") from exc

from ._common import PHASES_TAG, Measurement

__all__ = ["CRHCallback"]


class CRHCallback(Callback):
    """Measure a ``lightning.Trainer`` run with a Collector.

    Args:
        out_dir: where ``report.json`` and ``table.txt`` (and figures with ``plot``) go at the
            end of training; None: only :attr:`report`.
        log_every: log every this many optimizer steps (``trainer.global_step`` a multiple);
            None: no logging.
        alpha_every: keep the α series every this many steps (stored in the report, drawn in
            ``alpha_series.png``).
        log_phase: log each layer's phase too (a full report, with its eigendecompositions,
            per log; False logs the α alone).
        plot: write the report's figures at the end (matplotlib).
        **collector_kwargs: :class:`~crh_kernels.Collector` arguments.

    After training: :attr:`collector` and :attr:`report`.
    """

    def __init__(self, out_dir=None, *, log_every: Optional[int] = None,
                 alpha_every: Optional[int] = None, log_phase: bool = True, plot: bool = False,
                 **collector_kwargs):
        self._m = Measurement(out_dir, log_every=log_every, alpha_every=alpha_every,
                              log_phase=log_phase, plot=plot, collector_kwargs=collector_kwargs)
        self._step = 0
        self._paused = False

    @property
    def collector(self):
        """The Collector of the latest ``fit()`` (None before it)."""
        return self._m.collector

    @property
    def report(self):
        """The Report made at the end of the latest ``fit()`` (None before)."""
        return self._m.report

    # ------------------------------------------------------------- hooks
    def on_train_start(self, trainer, pl_module):
        self._m.begin(pl_module)
        self._m.resume()
        self._step = trainer.global_step
        self._paused = False
        if self._m.log_every is not None and not trainer.loggers:
            warnings.warn(f"CRHCallback(log_every={self._m.log_every}): the trainer has no "
                          "logger (logger=False), so the α are not logged; the report is still "
                          "made at the end", UserWarning, stacklevel=2)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # global_step counts optimizer steps: with gradient accumulation it moves every few batches
        while self._step < trainer.global_step:
            self._step += 1
            self._m.step()
            if self._m.due(self._step) and trainer.is_global_zero:
                self._log(trainer, self._step)

    def _log(self, trainer, step: int) -> None:
        numbers, text = self._m.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=step)
            if text is not None and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(PHASES_TAG, text, step)

    def on_validation_start(self, trainer, pl_module):
        self._paused = self._m.pause() or self._paused

    def on_validation_end(self, trainer, pl_module):
        if self._paused:
            self._paused = False
            self._m.resume()

    def on_train_end(self, trainer, pl_module):
        self._m.end(write=trainer.is_global_zero)

    def on_exception(self, trainer, pl_module, exception):
        self._m.pause()   # leave no hooks on the model
