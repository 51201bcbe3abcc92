"""Hooks that feed :class:`crh_kernels.Moments` from a model: :class:`Collector`.

``collector.py`` owns module selection, the hook life cycle, step/every, masks and checkpoints;
``adapters.py`` says how each module kind (Linear, Conv2d, HF Conv1D, heads) yields its rows.
"""
from .collector import STREAMS, Collector, LayerStats

__all__ = ["Collector", "LayerStats", "STREAMS"]
