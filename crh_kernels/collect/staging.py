"""Row staging: small per-call batches gathered into one kernel call per stream.

A training step hands each stream a few hundred to a few thousand rows; the fused update has
a cost per call proportional to D² (the accumulator: zeroing, the sum of the per-thread copies,
the mirror, the merge into the state), which dominates at N ≲ D. The stager copies each call's
rows into a preallocated buffer per Moments and runs ``Moments.update`` once the buffer holds
``rows`` rows (or when flushed), so the kernel sees N ≈ ``rows``. Merging is order-free
(docs/spec.md §1), so the state is the same, up to rounding, as with one update per call.

Copies are taken at once: activations may be modified in place after the hook returns.
A call with ``rows`` rows or more, 3-D rows, or a buffer that would exceed the byte budget
goes straight to ``Moments.update``.

Where the Moments' backend declares the ``row_staging`` capability (the C++ CPU kernels), the
copy does pass 1 of the update on the way, while the rows are in cache (row status, masked /
skipped / valid, and scale; the sum for the mean): the flush then starts at the product
(``Moments.update_staged``) instead of reading the whole buffer back from memory once more.

Sub-states (``Collector(blocks=K)``): rows fed for a :class:`~.blocks.BlockedMoments` are routed
to its blocks first and each block has its own buffer, so rows gathered in one step never reach
the block of a later one.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch

from ..moments import Moments
from .blocks import BlockedMoments, parts


class _Buffer:
    """Rows (and a mask once a masked call comes) copied as they are."""
    __slots__ = ("moments", "x", "mask", "filled")

    def __init__(self, moments: Moments, like: torch.Tensor, rows: int):
        self.moments = moments
        self.x = torch.empty(rows, like.shape[1], dtype=like.dtype, device=like.device)
        self.mask: Optional[torch.Tensor] = None  # made on the first masked call of a fill
        self.filled = 0

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() + (0 if self.mask is None else self.mask.numel())

    def put(self, x: torch.Tensor, mask: Optional[torch.Tensor], rows: int) -> None:
        lo, hi = self.filled, self.filled + x.shape[0]
        self.x[lo:hi].copy_(x)
        if mask is not None:
            if self.mask is None:
                self.mask = torch.ones(rows, dtype=torch.bool, device=self.x.device)
            self.mask[lo:hi].copy_(mask)
        elif self.mask is not None:
            self.mask[lo:hi].fill_(True)
        self.filled = hi

    def drain(self) -> None:
        n, self.filled = self.filled, 0
        mask, self.mask = (None if self.mask is None else self.mask[:n]), None
        self.moments.update(self.x[:n], mask)


class _StagedBuffer:
    """Rows copied by the backend's ``stage_rows`` with pass 1 done on the way."""
    __slots__ = ("moments", "backend", "x", "scale", "status", "sum", "filled")

    def __init__(self, moments: Moments, backend, like: torch.Tensor, rows: int):
        self.moments = moments
        self.backend = backend
        self.x = torch.empty(rows, like.shape[1], dtype=like.dtype, device=like.device)
        self.scale = torch.empty(rows, dtype=torch.float32, device=like.device)
        self.status = torch.empty(rows, dtype=torch.uint8, device=like.device)
        self.sum = torch.zeros(like.shape[1], dtype=torch.float64, device=like.device)
        self.filled = 0

    @property
    def nbytes(self) -> int:
        return (self.x.numel() * self.x.element_size() + 5 * self.scale.numel()
                + 8 * self.sum.numel())

    def put(self, x: torch.Tensor, mask: Optional[torch.Tensor], rows: int) -> None:
        lo, hi = self.filled, self.filled + x.shape[0]
        self.backend.stage_rows(x, mask, self.moments.normalize, self.x[lo:hi], self.scale[lo:hi],
                                self.status[lo:hi], self.sum)
        self.filled = hi

    def drain(self) -> None:
        n, self.filled = self.filled, 0
        try:
            self.moments.update_staged(self.x[:n], self.scale[:n], self.status[:n], self.sum)
        finally:
            self.sum.zero_()


class RowStager:
    """Stage rows per :class:`Moments` until ``rows`` are gathered (0 disables staging);
    row buffers never take more than ``max_bytes`` together."""

    def __init__(self, rows: int = 4096, max_bytes: int = 256 << 20):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"stage_rows must be a non-negative int, got {rows!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"stage_bytes must be a non-negative int, got {max_bytes!r}")
        self.rows = rows
        self.max_bytes = max_bytes
        self._bufs: Dict[int, Union[_Buffer, _StagedBuffer]] = {}
        # called first by flush(): rows held elsewhere (the collector's shared inputs waiting
        # for their last claimant) come in before the buffers are drained
        self.before_flush: Optional[Callable[[], None]] = None

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs.values())

    @property
    def pending(self) -> int:
        """Rows gathered but not yet in any state."""
        return sum(b.filled for b in self._bufs.values())

    def feed(self, m: Moments, x: torch.Tensor, mask: Optional[torch.Tensor],
             block: Optional[int] = None) -> None:
        """Gather the rows ``x`` (mask ``mask``) of one call for ``m``. A
        :class:`~.blocks.BlockedMoments` hands them to its blocks (:meth:`~.blocks.BlockedMoments.route`;
        ``block``: the block of a ``"step"`` call, fixed when its forward pass ran), each block
        staged on its own: rows never wait in another block's buffer."""
        if isinstance(m, BlockedMoments):
            for b, xs, ms in m.route(x, mask, block):
                self._feed(b, xs, ms)
            return
        self._feed(m, x, mask)

    def _feed(self, m: Moments, x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        buf = self._bufs.get(id(m))
        if buf is not None and (buf.x.dtype != x.dtype or buf.x.device != x.device
                                or x.dim() != 2 or buf.x.shape[1] != x.shape[1]):
            self._flush(buf)
            del self._bufs[id(m)]
            buf = None
        if buf is None:
            if x.dim() != 2 or x.shape[0] >= self.rows or not self._room(x):
                m.update(x, mask)
                return
            buf = self._bufs[id(m)] = self._new_buffer(m, x)
        start = 0
        while start < x.shape[0]:
            take = min(self.rows - buf.filled, x.shape[0] - start)
            buf.put(x[start:start + take], None if mask is None else mask[start:start + take],
                    self.rows)
            start += take
            if buf.filled == self.rows:
                self._flush(buf)

    def _new_buffer(self, m: Moments, x: torch.Tensor):
        backend = m.backend_for(x)
        if x.device.type == "cpu" and backend.row_staging:
            return _StagedBuffer(m, backend, x, self.rows)
        return _Buffer(m, x, self.rows)

    def _room(self, x: torch.Tensor) -> bool:
        # row buffers only: the per-row extras (a mask, or status and scale) are < 1 % of them
        need = self.rows * x.shape[1] * x.element_size()
        have = sum(b.x.numel() * b.x.element_size() for b in self._bufs.values())
        return have + need <= self.max_bytes

    def _flush(self, buf) -> None:
        if buf.filled:
            buf.drain()

    def holds(self, m: Moments) -> bool:
        """Whether rows for ``m`` (one of its blocks) are gathered and not yet in its state."""
        for p in parts(m):
            buf = self._bufs.get(id(p))
            if buf is not None and buf.moments is p and buf.filled > 0:
                return True
        return False

    def flush_one(self, m: Moments) -> None:
        """Put the rows gathered for ``m`` (each of its blocks) into its state."""
        for p in parts(m):
            buf = self._bufs.get(id(p))
            if buf is not None and buf.moments is p:
                self._flush(buf)

    def flush(self) -> None:
        """Put every gathered row into its state."""
        if self.before_flush is not None:
            self.before_flush()
        for buf in list(self._bufs.values()):
            self._flush(buf)

    def adopt(self, other: "RowStager", keep) -> None:
        """Take over ``other``'s gathered rows of the Moments in ``keep`` (``other`` is not
        changed: the collector drops it, or keeps it if a restore is interrupted)."""
        ids = {id(p) for m in keep for p in parts(m)}
        self._bufs = {k: b for k, b in other._bufs.items() if k in ids and b.moments is not None}

    def clear(self) -> None:
        """Drop gathered rows and buffers (after a reset or a load)."""
        self._bufs.clear()
