"""Hooks that feed :class:`crh_kernels.Moments` from a model: :class:`Collector`.

One module per concept: ``collector.py`` is the facade (life cycle, step/every, masks,
subsampling, gradient scale, report, sync); ``selection.py`` picks the layers and plans their
memory; ``hooks.py`` holds the forward/gradient hooks of weight layers and the shared-input
dedup; ``attention.py`` the per-head streams and ``nn.MultiheadAttention``; ``checkpoint.py``
the ``state_dict`` format; ``layer.py`` :class:`LayerStats`; ``adapters.py`` says how each module
kind (Linear, Conv2d, HF Conv1D) yields its rows; ``staging.py`` gathers small calls' rows into
fewer updates; ``blocks.py`` the sub-states of ``Collector(blocks=K)``.
"""
from .collector import STREAMS, Collector, LayerStats

__all__ = ["Collector", "LayerStats", "STREAMS"]
