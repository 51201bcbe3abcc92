"""Row staging: small per-call batches gathered into one kernel call per stream.

A training step hands each stream a few hundred to a few thousand rows; the fused update has
a cost per call proportional to D² (the accumulator: zeroing, the sum of the per-thread copies,
the mirror, the merge into the state), which dominates at N ≲ D. The stager copies each call's
rows into a preallocated buffer per Moments and runs ``Moments.update`` once the buffer holds
``rows`` rows (or when flushed), so the kernel sees N ≈ ``rows``. Merging is order-free
(SPEC §1), so the state is the same, up to rounding, as with one update per call.

Copies are taken at once: activations may be modified in place after the hook returns.
A call with ``rows`` rows or more, 3-D rows, or a buffer that would exceed the byte budget
goes straight to ``Moments.update``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..moments import Moments


class _Buffer:
    __slots__ = ("moments", "x", "mask", "filled")

    def __init__(self, moments: Moments, like: torch.Tensor, rows: int):
        self.moments = moments
        self.x = torch.empty(rows, like.shape[1], dtype=like.dtype, device=like.device)
        self.mask: Optional[torch.Tensor] = None  # made on the first masked call of a fill
        self.filled = 0

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() + (0 if self.mask is None else self.mask.numel())


class RowStager:
    """Stage rows per :class:`Moments` until ``rows`` are gathered (0 disables staging);
    buffers never take more than ``max_bytes`` together."""

    def __init__(self, rows: int = 4096, max_bytes: int = 256 << 20):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"stage_rows must be a non-negative int, got {rows!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"stage_bytes must be a non-negative int, got {max_bytes!r}")
        self.rows = rows
        self.max_bytes = max_bytes
        self._bufs: Dict[int, _Buffer] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs.values())

    @property
    def pending(self) -> int:
        """Rows gathered but not yet in any state."""
        return sum(b.filled for b in self._bufs.values())

    def feed(self, m: Moments, x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
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
            buf = self._bufs[id(m)] = _Buffer(m, x, self.rows)
        start = 0
        while start < x.shape[0]:
            take = min(self.rows - buf.filled, x.shape[0] - start)
            buf.x[buf.filled:buf.filled + take].copy_(x[start:start + take])
            if mask is not None:
                if buf.mask is None:
                    buf.mask = torch.ones(self.rows, dtype=torch.bool, device=buf.x.device)
                buf.mask[buf.filled:buf.filled + take].copy_(mask[start:start + take])
            elif buf.mask is not None:
                buf.mask[buf.filled:buf.filled + take].fill_(True)
            buf.filled += take
            start += take
            if buf.filled == self.rows:
                self._flush(buf)

    def _room(self, x: torch.Tensor) -> bool:
        # the row buffer only: a mask buffer (1 byte a row) is made for masked streams alone
        need = self.rows * x.shape[1] * x.element_size()
        return self.nbytes + need <= self.max_bytes

    def _flush(self, buf: _Buffer) -> None:
        if buf.filled == 0:
            return
        n, buf.filled = buf.filled, 0
        mask, buf.mask = (None if buf.mask is None else buf.mask[:n]), None
        buf.moments.update(buf.x[:n], mask)

    def flush(self) -> None:
        """Put every gathered row into its state."""
        for buf in self._bufs.values():
            self._flush(buf)

    def clear(self) -> None:
        """Drop gathered rows and buffers (after a reset or a load)."""
        self._bufs.clear()
