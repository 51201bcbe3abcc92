"""Sub-states: K disjoint blocks per stream (``Collector(blocks=K)``), merged exactly for the
point estimate, and the leave-one-out merges the jackknife reads (issue 16).

Owns :class:`BlockClock` (which block the rows of a call go to), :class:`BlockedMoments` (the
object a layer holds for a stream when the collector keeps blocks: a
:class:`~crh_kernels.Moments` whose state is the exact merge of its K blocks, built on first
read and kept until a block changes) and :class:`Block` (one sub-state; it tells its owner
when it changes).

Routing (``block_by``):

* ``"step"``: every row of a collected step goes to block ``(steps // every) mod K`` (round
  robin over the collected steps: every block sees the whole trajectory; H and G of a step land
  in the same block, the gradient hooks carry the block of their forward pass). One block, so
  one kernel update (or one staged copy) per call per stream, as without blocks.
* ``"row"``: each call's rows are cut into K contiguous slices of sizes differing by at most
  one (block j holds rows ``floor(j·R/K)`` to ``floor((j+1)·R/K) − 1`` of the call's R rows,
  masked ones included), the same cut for every stream of the call
  (same row, same block; within a ``(B, T)`` batch whole sequences stay together when K
  divides B). For one large batch or one measurement step; a call with fewer than K rows leaves
  blocks empty.

Exactness: the merged state is the Chan–Golub–LeVeque merge of the blocks (the same merge as
:meth:`Moments.merge`), equal to the state of all rows up to rounding; a leave-one-out state is
the merge of the other K − 1 blocks (never a subtraction).

Costs: memory K states per stream (``Collector.memory_plan`` and ``nbytes`` count them), plus
one merged state per stream while a merged view is held (built on read, dropped by the next
update of a block) and K leave-one-out states per stream once :meth:`leave_one_out` was read
(dropped by the next update, or :meth:`release`). Time: a read of the merged view costs K
merges of D×D (O(K·D²)); :meth:`leave_one_out` K·(K − 1) merges (O(K²·D²)), no
eigendecomposition.
"""
from __future__ import annotations

import threading
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..moments import Moments, _check_input

__all__ = ["BLOCK_BY", "BlockClock", "Block", "BlockedMoments", "parts", "copy_moments"]

BLOCK_BY = ("step", "row")


class BlockClock:
    """Which block the rows of a call go to. ``k`` blocks, ``by`` ``"step"`` or ``"row"``;
    ``step_index()`` gives the collected-step index (``steps // every`` of the collector)."""

    __slots__ = ("k", "by", "_index", "_last")

    def __init__(self, k: int, by: str, step_index: Optional[Callable[[], int]] = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"blocks must be an int >= 2 or None, got {k!r}")
        if by not in BLOCK_BY:
            raise ValueError(f"block_by must be one of {BLOCK_BY}, got {by!r}")
        self.k = k
        self.by = by
        self._index = step_index
        self._last = 0

    @property
    def now(self) -> Optional[int]:
        """The block of a call made now (``"step"``), None for ``"row"`` (rows are cut)."""
        if self.by != "step":
            return None
        if self._index is not None:
            i = self._index()
            if i is not None:
                self._last = int(i) % self.k
        return self._last

    def config(self) -> dict:
        return {"k": self.k, "by": self.by}


class Block(Moments):
    """One sub-state of a :class:`BlockedMoments`: a plain Moments whose every state change
    tells its owner (the merged view and the leave-one-out states are then built anew)."""

    _owner = None

    def _changed(self) -> None:
        owner = self._owner
        if owner is not None:
            owner._changed()

    def update(self, x, mask=None):
        try:
            return super().update(x, mask)
        finally:
            self._changed()

    def update_staged(self, x, scale, status, sum_):
        try:
            return super().update_staged(x, scale, status, sum_)
        finally:
            self._changed()

    def merge(self, other):
        try:
            return super().merge(other)
        finally:
            self._changed()

    def reset(self):
        try:
            return super().reset()
        finally:
            self._changed()

    def to(self, device):
        try:
            return super().to(device)
        finally:
            self._changed()

    def load_packed(self, mean, packed):
        try:
            return super().load_packed(mean, packed)
        finally:
            self._changed()

    def replace_state(self, n, n_skipped, mean=None, packed=None):
        try:
            return super().replace_state(n, n_skipped, mean, packed)
        finally:
            self._changed()

    def _set(self, state) -> None:
        """Put back a state taken by :meth:`BlockedMoments._take` (a rollback)."""
        with self._lock:
            self._state, self._warned, self._unchecked, self._unchecked_base = state
        self._changed()


class BlockedMoments(Moments):
    """The state of one stream kept as K disjoint blocks (:class:`Block`), read as one Moments.

    Every read (``n``, ``mean``, ``scatter``, ``cov()``, ``state_dict()``, …) sees the exact
    merge of the blocks, built on the first read after a block changed and kept until the next
    change. Rows come in through :meth:`update` (routed by the :class:`BlockClock`: one block for
    ``"step"``, K contiguous slices for ``"row"``; all or nothing) or, in the collector, through
    the row stager, which feeds the blocks themselves (:func:`parts`). :meth:`leave_one_out`
    gives the K merges of all blocks but one.

    ``merge``, ``load_packed`` and ``replace_state`` are refused (a merged state cannot be split
    into blocks): change the blocks instead. ``reset`` and ``to`` apply to every block, all or
    nothing."""

    def __init__(self, blocks: Sequence[Block], clock: BlockClock, device=None):
        blocks = list(blocks)
        if len(blocks) != clock.k or not all(isinstance(b, Block) for b in blocks):
            raise ValueError(f"a BlockedMoments needs {clock.k} Block states, got {len(blocks)}")
        b0 = blocks[0]
        for b in blocks[1:]:
            if (b.dim, b.normalize, b.dtype) != (b0.dim, b0.normalize, b0.dtype):
                raise ValueError("the blocks of one stream must share dim, normalize and dtype")
        self.__dict__["_building"] = True
        super().__init__(b0.dim, normalize=b0.normalize, backend=b0.backend, strict=b0.strict,
                         dtype=b0.dtype, fp32_precision=b0.fp32_precision)
        self.__dict__["_building"] = False
        self.blocks: List[Block] = blocks
        self.clock = clock
        self._home = None if device is None else torch.device(device)
        self._version = 0
        self._cache: Optional[Tuple[int, object]] = None        # (version, merged _State)
        self._loo: Optional[Tuple[int, List[Moments]]] = None   # (version, K states)
        for b in blocks:
            b._owner = self

    @classmethod
    def new(cls, dim: int, clock: BlockClock, *, normalize: bool, device, backend, dtype
            ) -> "BlockedMoments":
        """K empty blocks on ``device``."""
        blocks = [Block(dim, normalize=normalize, device=device, backend=backend, dtype=dtype)
                  for _ in range(clock.k)]
        return cls(blocks, clock, device)

    @property
    def k(self) -> int:
        return len(self.blocks)

    # ----------------------------------------------------------- the merged view
    @property
    def _state(self):
        cache = self.__dict__.get("_cache")
        version = self.__dict__.get("_version", 0)
        if cache is not None and cache[0] == version:
            return cache[1]
        st = self._fold(self.blocks)._state
        self._cache = (version, st)
        return st

    @_state.setter
    def _state(self, value) -> None:
        if not self.__dict__.get("_building", False):
            raise TypeError("a BlockedMoments changes through its blocks only")

    def _fold(self, blocks: Sequence[Block]) -> Moments:
        """A new plain Moments: the exact merge of ``blocks``."""
        dev = self.device
        out = Moments(self.dim, normalize=self.normalize, device=dev, backend=self.backend,
                      dtype=self.dtype, fp32_precision=self.fp32_precision)
        for b in blocks:
            out.merge(b)
        return out

    def _changed(self) -> None:
        self._version += 1
        self._cache = None
        self._loo = None

    def leave_one_out(self) -> List[Moments]:
        """``[merge of every block but block i for i in range(K)]`` (plain Moments), built on the
        first call after a change and kept until the next (:meth:`release` drops them)."""
        version = self._version
        loo = self._loo
        if loo is not None and loo[0] == version:
            return loo[1]
        out = [self._fold([b for j, b in enumerate(self.blocks) if j != i])
               for i in range(self.k)]
        self._loo = (version, out)
        return out

    def release(self) -> None:
        """Drop the cached merged view and leave-one-out states (rebuilt when read again)."""
        self._cache = None
        self._loo = None

    def block_counts(self) -> List[int]:
        """Rows counted per block."""
        return [b.n for b in self.blocks]

    @property
    def n(self) -> int:
        return sum(b.n for b in self.blocks)

    @property
    def n_skipped(self) -> int:
        return sum(b.n_skipped for b in self.blocks)

    @property
    def device(self) -> Optional[torch.device]:
        for b in self.blocks:
            if b.device is not None:
                return b.device
        return self._home

    def nbytes(self) -> int:
        """Bytes of the K block states (the cached merged view is not counted)."""
        return sum(b.nbytes() for b in self.blocks)

    # ----------------------------------------------------------- changes
    def route(self, x: torch.Tensor, mask: Optional[torch.Tensor], block: Optional[int] = None):
        """``[(Block, rows, mask)]``: where the rows of one call go. ``block``: the block of a
        ``"step"`` call fixed when it was made (None: the clock's block now)."""
        if self.clock.by == "step":
            return [(self.blocks[self.clock.now if block is None else block], x, mask)]
        d = x.shape[-1]
        x2 = x.reshape(-1, d)
        m2 = None if mask is None else mask.reshape(-1)
        r, k = x2.shape[0], self.k
        cuts = [(i * r) // k for i in range(k + 1)]
        return [(self.blocks[i], x2[lo:hi], None if m2 is None else m2[lo:hi])
                for i, (lo, hi) in enumerate(zip(cuts, cuts[1:])) if hi > lo]

    def _take(self, b: Block):
        """A copy of ``b``'s whole state, for a rollback."""
        with b._lock:
            st = b._state
            copy = type(st)(None if st.counts is None else st.counts.clone(),
                            None if st.mean is None else st.mean.clone(),
                            None if st.scatter is None else st.scatter.clone(), st.device)
            return copy, b._warned, b._unchecked, b._unchecked_base

    def update(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
               block: Optional[int] = None) -> "BlockedMoments":
        """Add the rows of ``x`` to their blocks (see :meth:`route`). All or nothing: with
        ``"row"`` the touched blocks are copied first and put back if any of their updates
        fails."""
        _check_input(x, self.dim, mask)
        routes = self.route(x, mask, block)
        if len(routes) == 1:
            b, xs, ms = routes[0]
            b.update(xs, ms)
            return self
        saved = []
        try:
            for b, _, _ in routes:
                saved.append((b, self._take(b)))
            for b, xs, ms in routes:
                b.update(xs, ms)
        except BaseException:
            for b, state in saved:
                b._set(state)
            raise
        return self

    def update_staged(self, x, scale, status, sum_):
        raise TypeError("a BlockedMoments takes staged rows through its blocks")

    def _replace_all(self, make) -> None:
        """Give every block what ``make(block)`` builds, ``(state, _warned, _unchecked,
        _unchecked_base)``: all built first, then stored; put back if the stores are
        interrupted."""
        new = [make(b) for b in self.blocks]
        old = [(b, (b._state, b._warned, b._unchecked, b._unchecked_base)) for b in self.blocks]
        try:
            for b, state in zip(self.blocks, new):
                b._set(state)
        except BaseException:
            for b, state in old:
                b._set(state)
            raise

    def reset(self) -> "BlockedMoments":
        """Forget every row of every block (all or nothing)."""
        def zero(b):
            st = b._state
            if st.mean is None:
                st = type(st)(None, None, None, st.device)
            else:
                st = type(st)(torch.zeros_like(st.counts), torch.zeros_like(st.mean),
                              torch.zeros_like(st.scatter), st.device)
            return st, b._warned, False, None
        self._replace_all(zero)
        return self

    def to(self, device) -> "BlockedMoments":
        """Move every block to ``device`` (all or nothing)."""
        device = torch.device(device)

        def move(b):
            st = b._state
            if st.mean is None:
                st = type(st)(st.counts, None, None, device)
            else:
                st = type(st)(st.counts.to(device), st.mean.to(device), st.scatter.to(device),
                              device)
            return st, b._warned, b._unchecked, b._unchecked_base
        self._replace_all(move)
        self._home = device
        return self

    def merge(self, other):
        raise TypeError("cannot merge into a BlockedMoments (a merged state has no blocks): "
                        "merge into its blocks, or merge it into a plain Moments")

    def load_packed(self, mean, packed):
        raise TypeError("a BlockedMoments cannot load a merged state: change its blocks")

    def replace_state(self, n, n_skipped, mean=None, packed=None):
        raise TypeError("a BlockedMoments cannot take a merged state: change its blocks")

    def all_reduce(self, group=None, *, timeout=None) -> "BlockedMoments":
        """Block i merged with block i across the ranks of ``group`` (all or nothing)."""
        from .. import distributed
        distributed.all_reduce_moments(self.blocks, group=group, timeout=timeout)
        return self

    def copy(self) -> "BlockedMoments":
        """An independent copy (same clock)."""
        blocks = [Block.from_state_dict(b.state_dict(), device=b.device or self._home,
                                        backend=b.backend) for b in self.blocks]
        return BlockedMoments(blocks, self.clock, self._home)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_cache", None)
        state.pop("_loo", None)
        return state

    def __setstate__(self, state):
        state = dict(state)
        state.setdefault("_cache", None)
        state.setdefault("_loo", None)
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (f"BlockedMoments(dim={self.dim}, k={self.k}, by={self.clock.by!r}, "
                f"n={self.block_counts()}, normalize={self.normalize}, device={self.device})")


def parts(m: Moments) -> Sequence[Moments]:
    """The states that hold ``m``'s rows: its blocks, or ``m`` itself."""
    return m.blocks if isinstance(m, BlockedMoments) else (m,)


def copy_moments(m: Moments) -> Moments:
    """An independent copy of ``m`` (a BlockedMoments keeps its blocks and clock)."""
    if isinstance(m, BlockedMoments):
        return m.copy()
    return Moments.from_state_dict(m.state_dict(), device=m.device, backend=m.backend)
