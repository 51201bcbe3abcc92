"""Hooks into the trainers people already use: a callback per trainer that measures a training
run with a :class:`~crh_kernels.Collector`.

* :mod:`.hf` — ``CRHCallback``, a ``transformers.TrainerCallback`` (extra ``[hf]``);
* :mod:`.lightning` — ``CRHCallback``, a ``lightning.pytorch.Callback`` (extra ``[lightning]``);
* :mod:`._common` — what both share: the collector's life cycle over a run, what is logged and
  the files written at the end.

Thin glue: every number comes from the Collector and its Report. The submodules import their
trainer package when imported themselves; this package imports neither. See
docs/integrations.md.
"""
