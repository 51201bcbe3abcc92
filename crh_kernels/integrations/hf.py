"""``CRHCallback`` for the Hugging Face ``transformers.Trainer`` (extra ``[hf]``).

Attaches a :class:`~crh_kernels.Collector` to the trained model when training begins, steps it
with every optimizer step, logs the six α per layer (and the phase of each layer) every
``log_every`` steps to the trainer's loggers and writes the report at the end of training.
Names and files: :mod:`._common`.

The loggers are the trainer's reporting integrations (``report_to``: TensorBoard, W&B, MLflow,
…; the TensorBoard one prefixes ``train/``): the callback hands them the logs itself, as
``Trainer.log`` would, but without the console printer and ``state.log_history`` (six numbers
per layer per log would flood both). A callback cannot reach the trainer from its events:
create it with :meth:`CRHCallback.attach` (or pass ``trainer=``). Without ``log_every`` no
trainer is needed: ``Trainer(..., callbacks=[CRHCallback(out_dir)])``.

Rows: training passes only. The hooks go on at the first step and come off for every
evaluation the trainer runs during training (``eval_strategy``), so evaluation batches are not
measured. Under several processes each process measures the rows it sees; the main process
(``state.is_world_process_zero``) logs and writes its own collector's numbers.
"""
from __future__ import annotations

import warnings
from typing import Optional

try:
    from transformers import TrainerCallback
    from transformers.integrations import INTEGRATION_TO_CALLBACK
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("crh_kernels.integrations.hf needs transformers (and accelerate): "
                      "pip install 'crh-kernels[hf]'") from exc

from ._common import PHASES_TAG, Measurement

__all__ = ["CRHCallback"]


class CRHCallback(TrainerCallback):
    """Measure a ``transformers.Trainer`` run with a Collector.

    Args:
        out_dir: where ``report.json`` and ``table.txt`` (and figures with ``plot``) go at the
            end of training; None: only :attr:`report`.
        log_every: log every this many optimizer steps (``state.global_step`` a multiple);
            needs ``trainer``. None: no logging.
        alpha_every: keep the α series every this many steps (stored in the report, drawn in
            ``alpha_series.png``).
        log_phase: log each layer's phase too (a full report, with its eigendecompositions,
            per log; False logs the α alone).
        plot: write the report's figures at the end (matplotlib).
        trainer: the ``Trainer`` whose reporting integrations receive the logs (:meth:`attach`
            sets it).
        **collector_kwargs: :class:`~crh_kernels.Collector` arguments (``modules``, ``heads``,
            ``max_rows``, ``streams``, …).

    After training: :attr:`collector` (the Collector) and :attr:`report` (the final Report).
    """

    def __init__(self, out_dir=None, *, log_every: Optional[int] = None,
                 alpha_every: Optional[int] = None, log_phase: bool = True, plot: bool = False,
                 trainer=None, **collector_kwargs):
        self._m = Measurement(out_dir, log_every=log_every, alpha_every=alpha_every,
                              log_phase=log_phase, plot=plot, collector_kwargs=collector_kwargs)
        if log_every is not None and trainer is None:
            raise ValueError("CRHCallback(log_every=...) logs through the trainer: create it with "
                             "CRHCallback.attach(trainer, ...) or pass trainer=")
        self._trainer = trainer

    @classmethod
    def attach(cls, trainer, out_dir=None, **kwargs) -> "CRHCallback":
        """A callback bound to ``trainer`` and added to it (``trainer.add_callback``)."""
        cb = cls(out_dir, trainer=trainer, **kwargs)
        trainer.add_callback(cb)
        return cb

    @property
    def collector(self):
        """The Collector of the latest ``train()`` (None before it)."""
        return self._m.collector

    @property
    def report(self):
        """The Report made at the end of the latest ``train()`` (None before)."""
        return self._m.report

    # ------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._m.begin(model)
        if self._m.log_every is not None and not self._loggers():
            warnings.warn(f"CRHCallback(log_every={self._m.log_every}): the trainer has no "
                          "reporting integration (report_to is empty), so the α are not logged; "
                          "the report is still made at the end", UserWarning, stacklevel=2)

    def _loggers(self) -> list:
        kinds = tuple(INTEGRATION_TO_CALLBACK.values())
        return [cb for cb in self._trainer.callback_handler.callbacks if isinstance(cb, kinds)]

    def on_step_begin(self, args, state, control, **kwargs):
        self._m.resume()

    def on_step_end(self, args, state, control, **kwargs):
        self._m.step()
        if self._m.due(state.global_step) and state.is_world_process_zero:
            numbers, text = self._m.metrics()
            logs = dict(numbers)
            if text is not None:
                logs[PHASES_TAG] = text
            for cb in self._loggers():
                cb.on_log(args, state, control, logs=dict(logs), model=kwargs.get("model"))
        if control.should_evaluate:
            self._m.pause()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            self._m.pause()

    def on_train_end(self, args, state, control, **kwargs):
        self._m.end(write=state.is_world_process_zero)
