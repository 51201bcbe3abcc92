"""Exact merge of :class:`~crh_kernels.Moments` states across torch.distributed ranks.

Owns the cross-rank reduction only: the wire layout, the bucketing, the rank-agreement
check and the choice of the device that carries the collectives. The Chan merge of SPEC §1
generalised to R ranks is

    N = Σ_r n_r,   μ = Σ_r n_r μ_r / N,   C = Σ_r [ C_r + n_r (μ_r − μ)(μ_r − μ)ᵀ ]

so one rank-wide sum of ``(n, n_skipped, n·μ)`` gives the global mean; every rank then
shifts its own scatter to that mean and a second rank-wide sum gives ``C``. Both sums are
plain ``all_reduce(SUM)``: the engine the user already runs (NCCL, gloo, ...) does the
transport, nothing here talks to sockets.

Collectives per call, whatever the number of Moments: one tiny agreement check, one for all
counts and means (float64, so counts stay exact), and one per bucket of packed upper
triangles (``bucket_bytes`` each, ``dtype`` on the wire). The public entry points are
:func:`all_reduce_moments` (alias :func:`sync_moments`); ``Moments.all_reduce`` and
``Collector.sync`` call it. :func:`full_weight` gathers a sharded weight (FSDP2, tensor
parallel) so that ``Z = WᵀW`` sees the whole matrix.

This module does not import :mod:`crh_kernels.moments` (which imports it for
``Moments.all_reduce``): it works on any object with the attributes of
:class:`MomentsState`, which :class:`crh_kernels.Moments` has.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Iterable, List, Optional, Protocol

import torch
import torch.distributed as dist

__all__ = ["all_reduce_moments", "sync_moments", "full_weight", "DEFAULT_BUCKET_BYTES"]

#: Default size of one scatter bucket on the wire (32 MiB, the order of DDP's 25 MB buckets):
#: large enough that latency does not dominate, small next to any state worth syncing.
DEFAULT_BUCKET_BYTES = 32 * 1024 * 1024

_WIRE_DTYPES = (torch.float64, torch.float32)


class MomentsState(Protocol):
    """What the reduction reads and writes of a state: the part of :class:`crh_kernels.Moments`
    it uses (types only; checked at run time by :func:`_is_state`)."""

    dim: int
    normalize: bool
    n: int
    n_skipped: int

    @property
    def mean(self) -> torch.Tensor: ...

    @property
    def scatter(self) -> torch.Tensor: ...

    @property
    def device(self) -> Optional[torch.device]: ...

    def load_packed(self, mean: torch.Tensor, packed: torch.Tensor) -> None: ...

    def reset(self) -> object: ...


_STATE_FIELDS = ("dim", "normalize", "n", "n_skipped")
_STATE_MEMBERS = ("mean", "scatter", "device", "load_packed", "reset")


def _is_state(obj) -> bool:
    """Whether ``obj`` has every attribute of :class:`MomentsState`. Properties are looked up on
    the class, never read: reading ``scatter`` of an unallocated state would allocate D×D."""
    cls = type(obj)
    fields = getattr(obj, "__dict__", {})
    return (all(hasattr(cls, a) for a in _STATE_MEMBERS)
            and all(a in fields or hasattr(cls, a) for a in _STATE_FIELDS))


# ------------------------------------------------------------------------------ helpers
def _tri(dim: int) -> int:
    return dim * (dim + 1) // 2


def _comm_device(group, device) -> torch.device:
    """The device whose tensors the group's backend reduces, chosen the same way on every rank
    (a rank-dependent choice would send ranks of a mixed backend down different transports).

    Accelerator-only backends (``nccl``, ``xccl``; also the accelerator half of a mixed
    ``"cpu:gloo,cuda:nccl"``) get the *current* accelerator device (``torch.cuda.set_device``
    is the user's job, as for any NCCL collective); host-capable ones (``gloo``, ``mpi``,
    ``ucc``) get the CPU.
    """
    if device is not None:
        return torch.device(device)
    name = str(dist.get_backend(group)).lower()
    capability = getattr(dist.Backend, "backend_capability", {})
    if ":" in name:  # "cpu:gloo,cuda:nccl"
        pairs = [tuple(p.split(":", 1)) for p in name.split(",") if ":" in p]
    else:
        pairs = [(dt, name) for dt in capability.get(name, ["cpu"])]
    for dev_type, backend in pairs:
        if dev_type == "cpu" or "cpu" in capability.get(backend, ["cpu"]):
            continue
        mod = getattr(torch, dev_type, None)
        if mod is not None and hasattr(mod, "is_available") and mod.is_available():
            return torch.device(dev_type, mod.current_device())
    return torch.device("cpu")


def _signature(moments: List[MomentsState], wire: torch.dtype, chunk: int) -> int:
    """48-bit digest of everything that fixes the message sizes and the meaning of the sum;
    48 bits so that it is exact in the float64 check vector."""
    text = repr((str(wire), chunk, [(m.dim, m.normalize) for m in moments]))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "big")


def _check_agreement(moments: List[MomentsState], wire: torch.dtype, chunk: int, total: int,
                     group, dev: torch.device) -> None:
    """One fixed-size collective (MAX of ``[s, −s, k, −k, t, −t]``) so that every rank learns
    whether all ranks passed the same list. Its size never depends on the list, so a mismatch
    is reported on every rank instead of hanging or silently mixing matrices."""
    sig = _signature(moments, wire, chunk)
    vals = [float(sig), float(len(moments)), float(total)]
    v = torch.tensor([x for a in vals for x in (a, -a)], dtype=torch.float64, device=dev)
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)
    v = v.tolist()
    if v[0] == -v[1] and v[2] == -v[3] and v[4] == -v[5]:
        return
    detail = []
    if v[2] != -v[3]:
        detail.append(f"the number of Moments ranges from {int(-v[3])} to {int(v[2])}")
    if v[4] != -v[5]:
        detail.append(f"the packed sizes range from {int(-v[5])} to {int(v[4])} elements")
    if not detail:
        detail.append("the dims, normalize flags, dtype or bucket_bytes differ")
    dims = [m.dim for m in moments]
    shown = dims if len(dims) <= 16 else dims[:16] + ["..."]
    raise RuntimeError(
        "all_reduce_moments: ranks passed different lists of Moments (" + "; ".join(detail)
        + f"). This rank (rank {dist.get_rank(group)} of the group) passed {len(moments)} "
        f"Moments with dims {shown}, dtype={wire}, bucket_bytes giving {chunk} elements per "
        "bucket. Every rank must pass the same Moments in the same order with the same "
        "options; no state was changed.")


def _triu_mask(dim: int, device: torch.device, cache: Dict) -> torch.Tensor:
    """Boolean upper-triangle mask: selecting with it packs row-major, the same order as
    ``torch.triu_indices`` (and so as ``Moments.load_packed`` and state dicts), at 1 byte per
    entry instead of the 16 of an index pair."""
    key = (dim, device)
    if key not in cache:
        cache[key] = torch.ones(dim, dim, dtype=torch.bool, device=device).triu_()
    return cache[key]


# ----------------------------------------------------------------------------- public
def all_reduce_moments(moments: Iterable[Optional[MomentsState]], group=None, *,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       dtype: torch.dtype = torch.float64,
                       device=None) -> List[MomentsState]:
    """Merge each Moments exactly across the ranks of ``group``, in place: afterwards every
    rank holds, for each Moments, the state over all ranks' rows (bitwise the same on every
    rank).

    Every rank must call this with the same Moments (same ``dim`` and ``normalize``, same
    order) and the same options; a mismatch raises ``RuntimeError`` on all ranks and changes
    nothing. A rank that saw no rows (``n = 0``, even with no state allocated yet) takes part
    and contributes nothing; its unallocated Moments are allocated on the communication device
    once the merged state has rows.

    Args:
        moments: an iterable of :class:`Moments` (a single Moments is accepted too); ``None``
            entries are skipped. Dims may differ.
        group: the process group (``None``: the default group).
        bucket_bytes: size of one scatter bucket on the wire; the packed upper triangles of
            all Moments are concatenated and cut into buckets of this size, one
            ``all_reduce`` each (a large matrix may span several buckets).
        dtype: wire dtype of the scatter buckets, ``torch.float64`` (default) or
            ``torch.float32`` (half the traffic, ~1e-7 relative rounding). Counts and means
            always travel in float64.
        device: device of the wire buffers; default: the current CUDA device for NCCL (and
            the CUDA half of ``"cpu:gloo,cuda:nccl"``), the CPU for gloo / MPI / UCC.

    Returns:
        the list of Moments that were reduced (``None`` entries dropped).

    Collectives: with one process the call returns at once; otherwise exactly
    ``2 + ceil(Σ D(D+1)/2 · itemsize / bucket_bytes)``, the same on every rank. Extra memory:
    the packed triangles of all Moments in ``dtype`` (≈ half the states) plus one
    ``D × D`` float64 temporary at a time. If a collective fails, no state is changed.
    """
    if _is_state(moments):
        moments = [moments]
    try:
        items = [m for m in moments if m is not None]
    except TypeError:
        raise TypeError(f"moments must be an iterable of Moments, got {type(moments).__name__}") from None
    for i, m in enumerate(items):
        if not _is_state(m):
            raise TypeError(f"moments[{i}] must be a Moments, got {type(m).__name__}")
    if len({id(m) for m in items}) != len(items):
        raise ValueError("moments lists the same Moments object more than once; its rows would "
                         "be counted twice")
    if dtype not in _WIRE_DTYPES:
        raise TypeError(f"dtype (the wire dtype of the scatter) must be torch.float64 or "
                        f"torch.float32, got {dtype}")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce_moments needs torch.distributed: call "
                           "torch.distributed.init_process_group(...) on every rank first")
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of group; call all_reduce_moments only "
                         "on the group's ranks")
    if dist.get_world_size(group) == 1:
        return items  # already the merged state; no collective needed

    dev = _comm_device(group, device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    chunk = max(1, bucket_bytes // itemsize)  # elements per bucket
    sizes = [_tri(m.dim) for m in items]
    total = sum(sizes)
    _check_agreement(items, dtype, chunk, total, group, dev)
    if not items:
        return items

    # Phase 1: one SUM of [n, n_skipped] for every Moments followed by every n·μ, in float64
    # (counts exact to 2^53). A rank with n = 0 writes zeros: its mean may be unallocated.
    k = len(items)
    counts = torch.tensor([float(v) for m in items for v in (m.n, m.n_skipped)],
                          dtype=torch.float64)
    parts = [counts.to(dev)]
    for m in items:
        parts.append(m.mean.to(device=dev, dtype=torch.float64) * m.n if m.n
                     else torch.zeros(m.dim, dtype=torch.float64, device=dev))
    head = torch.cat(parts)
    dist.all_reduce(head, op=dist.ReduceOp.SUM, group=group)
    tot = head[: 2 * k].tolist()  # one device-to-host copy for all counts
    glob = []  # (N, n_skipped, μ) per Moments, identical on every rank
    off = 2 * k
    for i, m in enumerate(items):
        n_all, skipped = int(round(tot[2 * i])), int(round(tot[2 * i + 1]))
        s = head[off: off + m.dim]
        glob.append((n_all, skipped, s / n_all if n_all else s))
        off += m.dim

    # Phase 2: each rank shifts its scatter to the global mean, C_r + n_r δδᵀ (δ = μ_r − μ,
    # in float64), and writes its packed upper triangle into one flat buffer; the buffer is
    # reduced in `chunk`-sized views (one all_reduce per bucket), each sent as soon as it is
    # filled so the transfer of bucket b overlaps the packing of the next Moments.
    flat = torch.zeros(total, dtype=dtype, device=dev)
    masks: Dict = {}
    works = []
    sent = 0  # elements of `flat` already handed to a collective
    off = 0
    for m, size, (_, _, mu) in zip(items, sizes, glob):
        if m.n:
            c = m.scatter.to(device=dev, dtype=torch.float64)
            delta = m.mean.to(device=dev, dtype=torch.float64) - mu
            shifted = torch.addr(c, delta, delta, alpha=float(m.n))
            flat[off: off + size] = shifted[_triu_mask(m.dim, dev, masks)].to(dtype)
            del c, shifted
        off += size
        while sent + chunk <= off:
            works.append(dist.all_reduce(flat[sent: sent + chunk], op=dist.ReduceOp.SUM,
                                         group=group, async_op=True))
            sent += chunk
    if sent < total:
        works.append(dist.all_reduce(flat[sent:], op=dist.ReduceOp.SUM, group=group,
                                     async_op=True))
    for w in works:
        w.wait()

    # Phase 3: commit only now that every collective succeeded, so a failure leaves all
    # states as they were.
    off = 0
    for m, size, (n_all, skipped, mu) in zip(items, sizes, glob):
        if n_all:
            # an unallocated state (a rank that saw no rows) is allocated on `dev` here
            m.load_packed(mu.to(m.device or dev), flat[off: off + size])
        else:
            m.reset()  # nobody counted a row: keep "no state" (unallocated stays unallocated)
        m.n = n_all
        m.n_skipped = skipped
        off += size
    return items


#: The name ``Collector.sync`` uses; the same function.
sync_moments = all_reduce_moments


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole (unsharded) value of a layer's weight, detached, for ``Z_a = WᵀW``, ``Z_b = WWᵀ``.

    * a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallel) is gathered with ``full_tensor()``:
      a collective, so every rank of its mesh must call this, for the same weights, in the
      same order;
    * a plain tensor (one process, DDP, FSDP1 inside ``FSDP.summon_full_params``) is returned
      as is (detached; no copy).

    Raises ``ValueError`` for a weight with fewer than 2 dims: that is what FSDP1
    (``use_orig_params=True``) exposes outside ``summon_full_params`` (a flat 1-D shard), and
    a Z built from it would be silently wrong.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor (a module's .weight), got {type(weight).__name__}")
    if hasattr(weight, "full_tensor"):  # DTensor, without importing the DTensor module eagerly
        weight = weight.full_tensor()
    if weight.dim() < 2:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, not a matrix: an FSDP1 shard? "
                         "Gather it with `with FSDP.summon_full_params(model, writeback=False):` "
                         "around the code that reads the weights")
    return weight.detach()
