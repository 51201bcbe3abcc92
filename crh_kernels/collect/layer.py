"""What the collector keeps per measured layer: :class:`LayerStats` (four streams of Moments,
the optional raw streams, bookkeeping counters) and :class:`HeadGroup` (the per-head
LayerStats of one module).

Owns the stream names (``STREAMS``, ``RAW_STREAMS``) and where each stream's Moments lives on
a LayerStats (``STATE_ATTR``, ``RAW_ATTR``). Nothing here touches hooks or modules' forward
passes.

Raw streams (``Collector(raw_moments=True)``, docs/spec.md §4 "Which moments the lines are about"):
``h_a_raw`` are the rows ``(h_a, 1)`` (the 1 only when the module has a bias, whatever
``include_bias`` says) and ``g_b_raw`` the per-sample output gradients, both accumulated
unnormalized (``Moments(normalize=False)``); their uncentered second moments ``H̃_a`` and
``G_b`` give ``H_b = W̃ H̃_a W̃ᵀ`` and ``G̃_a = W̃ᵀ G_b W̃`` exactly, with ``W̃ = [W | b]``
(:meth:`LayerStats.raw_weight`), so those two are not accumulated.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..moments import Moments
from .adapters import Adapter
from .blocks import BlockedMoments

__all__ = ["STREAMS", "STATE_ATTR", "RAW_STREAMS", "RAW_ATTR", "LayerStats", "LeaveOneOut",
           "HeadGroup", "module_device"]

STREAMS = ("h_a", "h_b", "g_a", "g_b")
STATE_ATTR = {"h_a": "H_a", "h_b": "H_b", "g_a": "G_a", "g_b": "G_b"}
RAW_STREAMS = ("h_a_raw", "g_b_raw")
RAW_ATTR = {"h_a_raw": "H_a_raw", "g_b_raw": "G_b_raw"}
_ALL_ATTRS = tuple(STATE_ATTR.values()) + tuple(RAW_ATTR.values())


def module_device(module: nn.Module) -> Optional[torch.device]:
    """The device of a module's first parameter (or buffer); None for a module with neither."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


class LayerStats:
    """The four streams of one measured layer (or one attention head).

    Attributes:
        name: key in ``Collector.layers`` (heads: ``"<module name>.head<i>"``).
        module: the ``nn.Module`` measured (heads: the module whose output is split, or the
            ``nn.MultiheadAttention``).
        kind: ``"linear"``, ``"conv2d"``, ``"conv1d"`` or ``"head"``.
        H_a, H_b, G_a, G_b: :class:`~crh_kernels.Moments` of h_a, h_b, g_a, g_b, or None (stream
            not requested, not applicable, or no row seen yet). Heads only have H_b and G_b.
        parent, head: for heads, the module name and the head index (else None).
        dims: ``{stream: D}`` of the streams this layer can have (h_a includes a bias column
            when ``include_bias``).
        shared: ``{stream: owner layer name}`` for an H_a/G_a shared with another layer.
        raw: whether the raw streams are kept (``Collector(raw_moments=True)``, layers with a
            weight only); ``raw_dims``: ``{"h_a_raw": D_in (+1 with a bias), "g_b_raw": D_out}``.
        H_a_raw, G_b_raw: the raw streams' Moments (unnormalized rows; None until a row came).
        raw_weight0: ``W̃`` when the first raw row of these states came (None before), to tell
            whether W changed while the raw moments accumulated.
        n_blocks: K when the collector keeps sub-states (``Collector(blocks=K)``: every Moments
            above is then a :class:`~.blocks.BlockedMoments`, the exact merge of its K blocks),
            else None. See :meth:`leave_one_out`.
        forward_calls, grad_calls, forward_only_calls, unmasked_calls: bookkeeping counters.
        calls_without_grad, rows_without_grad: calls made with gradients enabled whose
            gradient rows never reached the collector (the step was aborted between forward
            and backward, the loss did not use the output, or the backward ran after
            ``stop()``), and the rows (after mask and ``max_rows``) their forward streams
            counted: by that many rows H_a/H_b hold more than G_a/G_b. Counted when the
            autograd graph of such a call is freed.
    """

    def __init__(self, name: str, module: nn.Module, kind: str, adapter: Optional[Adapter],
                 streams: Sequence[str], dims: Dict[str, int], bias_col: bool,
                 parent: Optional[str] = None, head: Optional[int] = None):
        self.name = name
        self.module = module
        self.kind = kind
        self.adapter = adapter
        self.streams = tuple(streams)
        self.dims = dict(dims)
        self.bias_col = bool(bias_col)
        self.parent = parent
        self.head = head
        self.H_a: Optional[Moments] = None
        self.H_b: Optional[Moments] = None
        self.G_a: Optional[Moments] = None
        self.G_b: Optional[Moments] = None
        self.shared: Dict[str, str] = {}
        self.raw = False
        self.raw_dims: Dict[str, int] = {}
        self.H_a_raw: Optional[Moments] = None
        self.G_b_raw: Optional[Moments] = None
        self.raw_weight0: Optional[torch.Tensor] = None
        self.n_blocks: Optional[int] = None
        self._loo = None          # (key of the states it was built from, [LeaveOneOut])
        self.forward_calls = 0
        self.grad_calls = 0
        self.forward_only_calls = 0
        self.unmasked_calls = 0
        self.calls_without_grad = 0
        self._without_grad: list = [0]   # ints, and 0-d row counts of masked calls

    # ------------------------------------------------------------------ views
    def moments(self) -> Dict[str, Optional[Moments]]:
        """``{stream: Moments or None}`` for the four streams."""
        return {s: getattr(self, STATE_ATTR[s]) for s in STREAMS}

    def raw_moments(self) -> Dict[str, Optional[Moments]]:
        """``{raw stream: Moments or None}`` (empty when the layer keeps no raw streams)."""
        return {s: getattr(self, RAW_ATTR[s]) for s in RAW_STREAMS} if self.raw else {}

    def enable_raw(self) -> bool:
        """Keep the raw streams of this layer (a layer with a weight only); returns whether it
        does."""
        if self.adapter is None:
            return False
        d_in, d_out = self.adapter.dims(self.module)
        bias = isinstance(getattr(self.module, "bias", None), torch.Tensor)
        self.raw = True
        self.raw_dims = {"h_a_raw": d_in + int(bias), "g_b_raw": d_out}
        return True

    def raw_weight(self) -> Optional[torch.Tensor]:
        """``W̃ = [W | b]`` (``(D_out, D_in + 1)``; just W for a module without bias), detached:
        the matrix of the raw streams, whatever ``include_bias`` says. None for heads."""
        if self.adapter is None:
            return None
        return self.adapter.weight(self.module, True)

    def weight(self) -> Optional[torch.Tensor]:
        """The layer's ``(D_out, D_in)`` matrix W (bias column appended when the collector has
        ``include_bias=True`` and the module has a bias), detached; None for heads."""
        if self.adapter is None:
            return None
        return self.adapter.weight(self.module, self.bias_col)

    def Z_a(self) -> Optional[torch.Tensor]:
        """WᵀW (D_in×D_in) in float64, or None for heads."""
        w = self._weight64()
        return None if w is None else w.t() @ w

    def Z_b(self) -> Optional[torch.Tensor]:
        """WWᵀ (D_out×D_out) in float64, or None for heads."""
        w = self._weight64()
        return None if w is None else w @ w.t()

    def _weight64(self) -> Optional[torch.Tensor]:
        w = self.weight()
        if w is None:
            return None
        return (w.cpu() if w.device.type == "mps" else w).double()   # MPS has no float64

    # ---------------------------------------------------------- sub-states
    def leave_one_out(self) -> Optional[List["LeaveOneOut"]]:
        """None without sub-states; else K :class:`LeaveOneOut` views, view i a LayerStats
        whose every Moments (the four streams and the raw ones) is the exact merge of all
        blocks but block i, and whose weight is the current W (weights are not blocked).

        Built lazily: a view's states are merged when first read, each stream's K merges at
        once (O(K²·D²)), and kept until that stream changes; calling again before any change
        returns the same views. Read it on ``col.layers[name]`` (staged rows flushed), as for
        the states themselves. :meth:`release_leave_one_out` frees the merges."""
        if self.n_blocks is None:
            return None
        key = tuple((id(m), m._version) if isinstance(m, BlockedMoments) else id(m)
                    for m in (getattr(self, a) for a in _ALL_ATTRS))
        loo = self._loo
        if loo is not None and loo[0] == key:
            return loo[1]
        views = [LeaveOneOut(self, i) for i in range(self.n_blocks)]
        self._loo = (key, views)
        return views

    def release_leave_one_out(self) -> None:
        """Free the leave-one-out merges (and the merged views) of this layer's states; they
        are built again when read."""
        self._loo = None
        for a in _ALL_ATTRS:
            m = getattr(self, a)
            if isinstance(m, BlockedMoments):
                m.release()

    def block_counts(self) -> Dict[str, List[int]]:
        """``{stream: rows counted per block}`` of the streams that hold blocks (empty without
        sub-states)."""
        out = {}
        for s, a in list(STATE_ATTR.items()) + list(RAW_ATTR.items()):
            m = getattr(self, a)
            if isinstance(m, BlockedMoments):
                out[s] = m.block_counts()
        return out

    # ---------------------------------------------------------- bookkeeping
    @property
    def rows_without_grad(self) -> int:
        """Rows counted by the forward streams of calls whose gradients never came."""
        counts = self._without_grad      # [total, counts not added yet...]
        while len(counts) > 1:
            c = counts.pop()
            counts[0] += int(c.sum()) if isinstance(c, torch.Tensor) else int(c)
        return counts[0]

    def note_without_grad(self, count) -> None:
        """One call's gradient rows will never come: ``count`` is its number of kept rows, or
        the mask (bool) of its kept rows."""
        self.calls_without_grad += 1
        self._without_grad.append(count.detach() if isinstance(count, torch.Tensor) else count)

    def counters(self) -> list:
        """``[forward_calls, grad_calls, forward_only_calls, unmasked_calls,
        calls_without_grad, rows_without_grad]`` (the checkpoint's order)."""
        return [self.forward_calls, self.grad_calls, self.forward_only_calls,
                self.unmasked_calls, self.calls_without_grad, self.rows_without_grad]

    def clear(self) -> None:
        """Forget every state, shared-input alias and counter (the configuration stays)."""
        self.H_a = self.H_b = self.G_a = self.G_b = None
        self.H_a_raw = self.G_b_raw = self.raw_weight0 = None
        self._loo = None
        self.shared = {}
        self.forward_calls = self.grad_calls = self.forward_only_calls = self.unmasked_calls = 0
        self.calls_without_grad = 0
        self._without_grad = [0]

    def __repr__(self) -> str:
        ns = {s: (m.n if m is not None else None) for s, m in self.moments().items()}
        return f"LayerStats({self.name!r}, kind={self.kind!r}, n={ns})"


def _loo_state(attr: str):
    def get(self):
        m = self._states[attr]
        return m.leave_one_out()[self.block] if isinstance(m, BlockedMoments) else m
    return property(get, doc=f"{attr} without block i (a plain Moments, or None)")


class LeaveOneOut(LayerStats):
    """What a :class:`LayerStats` exposes, with every state the merge of all blocks but one
    (:meth:`LayerStats.leave_one_out`). ``block``: the block left out; ``source``: the
    LayerStats. Everything else (name, kind, dims, streams, shared, parent, head, the module,
    ``weight()``, ``raw_weight()``, ``Z_a()``, ``Z_b()``, counters) is the source's; its
    states are read only."""

    H_a = _loo_state("H_a")
    H_b = _loo_state("H_b")
    G_a = _loo_state("G_a")
    G_b = _loo_state("G_b")
    H_a_raw = _loo_state("H_a_raw")
    G_b_raw = _loo_state("G_b_raw")

    def __init__(self, source: LayerStats, block: int):   # noqa: no super().__init__: a view
        d = {k: v for k, v in source.__dict__.items() if k not in _ALL_ATTRS and k != "_loo"}
        d["dims"], d["shared"], d["raw_dims"] = dict(source.dims), dict(source.shared), dict(source.raw_dims)
        d["_without_grad"] = [source.rows_without_grad]
        self.__dict__.update(d)
        self._states = {a: getattr(source, a) for a in _ALL_ATTRS}
        self._loo = None
        self.source = source
        self.block = int(block)

    def leave_one_out(self):
        raise TypeError("a leave-one-out view has no blocks of its own")

    def clear(self) -> None:
        raise TypeError("a leave-one-out view is read only")

    def __repr__(self) -> str:
        return f"LeaveOneOut({self.name!r}, block={self.block}, kind={self.kind!r})"


class HeadGroup:
    """The per-head LayerStats of one module (a ``heads=`` entry or an nn.MultiheadAttention)."""

    def __init__(self, name: str, module: nn.Module, n_heads: int, mha: bool):
        self.name = name
        self.module = module
        self.n_heads = int(n_heads)
        self.mha = mha
        self.layers: List[LayerStats] = []
