"""Exact merge of :class:`~crh_kernels.Moments` states across torch.distributed ranks.

Owns the cross-rank reduction only: the wire layout, the bucketing, the rank-agreement
check and the choice of the device that carries the collectives. The Chan merge of docs/spec.md §1
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

Failures: the agreement check compares every position's dim, ``normalize`` and name (when
given) and the options, and a rank that refuses its own arguments still joins it, so a
mismatch raises on every rank before any data moves. Every collective is waited for at most
``timeout`` (``Work.wait``), so a rank that fails later in the call makes the others raise
instead of hanging for the group's timeout. States are replaced only after the last
collective: a failed call changes no state.

This module does not import :mod:`crh_kernels.moments` (which imports it for
``Moments.all_reduce``): it works on any object with the attributes of
:class:`MomentsState`, which :class:`crh_kernels.Moments` has.
"""
from __future__ import annotations

import hashlib
import math
from datetime import timedelta
from typing import Dict, Iterable, List, Optional, Protocol, Sequence

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

    def replace_state(self, n: int, n_skipped: int, mean: Optional[torch.Tensor],
                      packed: Optional[torch.Tensor]) -> None: ...


_STATE_FIELDS = ("dim", "normalize", "n", "n_skipped")
_STATE_MEMBERS = ("mean", "scatter", "device", "replace_state")


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


def _digest(text: str) -> int:
    """48-bit digest, so that it is exact in a float64 vector; never 0 (0 marks "no entry")."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "big") or 1


def _fingerprints(moments: List[MomentsState], names: Optional[List[str]]) -> List[int]:
    """One digest per position of the list: its dim, ``normalize`` and name (when given). Two
    states passed in a different order on two ranks differ here unless they agree on all three;
    names (``Collector.sync`` passes its layer and stream names) tell apart states of equal dim."""
    return [_digest(repr((m.dim, bool(m.normalize), None if names is None else names[i])))
            for i, m in enumerate(moments)]


def _describe(m: MomentsState, name: Optional[str]) -> str:
    what = f"dim {m.dim}, normalize={bool(m.normalize)}"
    return f"{name!r} ({what})" if name is not None else f"a Moments with {what}"


def _check_agreement(moments: List[MomentsState], names: Optional[List[str]], wire: torch.dtype,
                     chunk: int, total: int, group, dev: torch.device, timeout,
                     refused: bool = False) -> None:
    """One fixed-size collective (MAX of ``[s, −s, k, −k, t, −t]``) so that every rank learns
    whether all ranks passed the same list: ``s`` digests the options (wire dtype, bucket) and
    every position's fingerprint (dim, normalize, name), ``k`` is the count, ``t`` the packed
    size. Its size never depends on the list, so a mismatch is reported on every rank instead
    of hanging or silently mixing matrices. A rank that ``refused`` its own arguments sends
    ``s = +inf``: the others raise at once instead of waiting for collectives it will never
    join.

    On a mismatch (known to every rank from the same reduced vector, so every rank takes the
    same path) a second collective, the MAX of ``[d_i, −d_i]`` for every position ``i`` below
    the largest count (``d_i = 0`` past this rank's list) and of the options' digest, finds
    the first position where the ranks differ, for the message."""
    prints = [] if refused else _fingerprints(moments, names)
    options = _digest(repr((str(wire), chunk)))
    sig = math.inf if refused else float(_digest(repr((options, prints))))
    vals = [sig, float(len(moments)), float(total)]
    v = torch.tensor([x for a in vals for x in (a, -a)], dtype=torch.float64, device=dev)
    _wait([_all_reduce(v, dist.ReduceOp.MAX, group)], timeout, "the agreement check", group)
    v = v.tolist()
    if v[0] == -v[1] and v[2] == -v[3] and v[4] == -v[5]:
        return
    if v[0] == math.inf:
        if refused:
            return  # the caller raises its own argument error
        raise RuntimeError(
            "all_reduce_moments: another rank of the group refused its arguments (its own "
            "error says which); no state was changed")
    if refused:
        return
    kmax = int(v[2])
    d = torch.zeros(2 * (kmax + 1), dtype=torch.float64, device=dev)
    mine = [float(x) for x in prints] + [0.0] * (kmax - len(prints)) + [float(options)]
    d[0::2] = torch.tensor(mine, dtype=torch.float64)
    d[1::2] = -d[0::2]
    _wait([_all_reduce(d, dist.ReduceOp.MAX, group)], timeout, "the agreement detail", group)
    d = d.tolist()
    first = next((i for i in range(kmax) if d[2 * i] != -d[2 * i + 1]), None)
    detail = []
    if v[2] != -v[3]:
        detail.append(f"the number of Moments ranges from {int(-v[3])} to {int(v[2])}")
    if first is not None:
        here = (_describe(moments[first], None if names is None else names[first])
                if first < len(moments) else "nothing (its list is shorter)")
        detail.append(f"the first difference is at position {first}, where this rank has {here}")
    if v[4] != -v[5]:
        detail.append(f"the packed sizes range from {int(-v[5])} to {int(v[4])} elements")
    if d[2 * kmax] != -d[2 * kmax + 1]:
        detail.append("dtype or bucket_bytes differ")
    if not detail:  # a digest collision would be needed to get here
        detail.append("the dims, normalize flags, names, dtype or bucket_bytes differ")
    dims = [m.dim for m in moments]
    shown = dims if len(dims) <= 16 else dims[:16] + ["..."]
    raise RuntimeError(
        "all_reduce_moments: ranks passed different lists of Moments (" + "; ".join(detail)
        + f"). This rank (rank {dist.get_rank(group)} of the group) passed {len(moments)} "
        f"Moments with dims {shown}, dtype={wire}, bucket_bytes giving {chunk} elements per "
        "bucket. Every rank must pass the same Moments in the same order with the same "
        "options; no state was changed.")


def _all_reduce(t: torch.Tensor, op, group):
    """Every collective of a call goes through here: asynchronous, so that :func:`_wait` can
    bound the wait."""
    return dist.all_reduce(t, op=op, group=group, async_op=True)


def _wait(works, timeout, what: str, group) -> None:
    """Wait for ``works``, each at most ``timeout`` (None: the process group's own timeout).
    A collective that fails or times out (a rank that failed mid-call, or never called) becomes
    one RuntimeError that says what to do; nothing has been committed at that point."""
    for w in works:
        try:
            if timeout is None:
                w.wait()
            else:
                w.wait(timeout=timeout)
        except RuntimeError as e:  # DistBackendError, gloo's "Operation timed out!", ...
            within = "" if timeout is None else f" within timeout={timeout.total_seconds():g} s"
            cause = " ".join(str(e).split())[:300]
            raise RuntimeError(
                f"all_reduce_moments: {what} did not complete{within} on rank "
                f"{dist.get_rank(group)} of the group ({cause}): another rank failed during "
                "the call or did not make it. No state was changed; the group may still hold "
                "this collective, so do not reuse it (destroy or abort the process group)"
            ) from e


def _as_timeout(timeout) -> Optional[timedelta]:
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be None, a datetime.timedelta or a number of seconds, "
                        f"got {type(timeout).__name__}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a positive, finite duration, got {timeout!r}")
    return timedelta(seconds=seconds)


def _parse(moments, names, dtype, bucket_bytes):
    """The states (``None`` dropped) and their names, or the argument error (raised later, once
    the other ranks have been told)."""
    if _is_state(moments):
        moments = [moments]
    try:
        given = list(moments)
    except TypeError:
        raise TypeError(f"moments must be an iterable of Moments, got {type(moments).__name__}") from None
    for i, m in enumerate(given):
        if m is not None and not _is_state(m):
            raise TypeError(f"moments[{i}] must be a Moments, got {type(m).__name__}")
    if names is not None:
        if isinstance(names, str):
            names = [names]
        try:
            names = list(names)
        except TypeError:
            raise TypeError(f"names must be a sequence of str, got {type(names).__name__}") from None
        if len(names) != len(given):
            raise ValueError(f"names has {len(names)} entries for {len(given)} moments; give one "
                             "name per entry of moments")
        for i, x in enumerate(names):
            if not isinstance(x, str):
                raise TypeError(f"names[{i}] must be a str, got {type(x).__name__}")
        names = [x for x, m in zip(names, given) if m is not None]
    items = [m for m in given if m is not None]
    if len({id(m) for m in items}) != len(items):
        raise ValueError("moments lists the same Moments object more than once; its rows would "
                         "be counted twice")
    if dtype not in _WIRE_DTYPES:
        raise TypeError(f"dtype (the wire dtype of the scatter) must be torch.float64 or "
                        f"torch.float32, got {dtype}")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    return items, names


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
                       names: Optional[Sequence[str]] = None,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       dtype: torch.dtype = torch.float64,
                       device=None, timeout=None) -> List[MomentsState]:
    """Merge each Moments exactly across the ranks of ``group``, in place: afterwards every
    rank holds, for each Moments, the state over all ranks' rows (bitwise the same on every
    rank).

    Every rank must call this with the same Moments (same ``dim``, ``normalize`` and name,
    same order) and the same options; a mismatch raises ``RuntimeError`` on all ranks and
    changes nothing. A rank that saw no rows (``n = 0``, even with no state allocated yet)
    takes part and contributes nothing; its unallocated Moments are allocated on the
    communication device once the merged state has rows.

    Args:
        moments: an iterable of :class:`Moments` (a single Moments is accepted too); ``None``
            entries are skipped. Dims may differ.
        group: the process group (``None``: the default group).
        names: optional, one ``str`` per entry of ``moments`` (``None`` entries included), e.g.
            ``"blocks.3.fc1.H_a"``. They enter the agreement check, so states of equal dim
            passed in a different order on two ranks raise instead of being merged crosswise
            (without names only each position's dim and ``normalize`` are compared).
            ``Collector.sync`` passes its layer and stream names.
        bucket_bytes: size of one scatter bucket on the wire; the packed upper triangles of
            all Moments are concatenated and cut into buckets of this size, one
            ``all_reduce`` each (a large matrix may span several buckets).
        dtype: wire dtype of the scatter buckets, ``torch.float64`` (default) or
            ``torch.float32`` (half the traffic, ~1e-7 relative rounding). Counts and means
            always travel in float64.
        device: device of the wire buffers; default: the current CUDA device for NCCL (and
            the CUDA half of ``"cpu:gloo,cuda:nccl"``), the CPU for gloo / MPI / UCC.
        timeout: ``None`` (the process group's timeout: 30 min by default for gloo), a
            ``datetime.timedelta`` or a number of seconds: the longest wait for each
            collective of the call (``Work.wait(timeout)``). If a rank fails during the call
            or never makes it, the others raise ``RuntimeError`` after at most this long
            instead of hanging; the group may then still hold that collective, so destroy or
            abort it rather than reusing it.

    Returns:
        the list of Moments that were reduced (``None`` entries dropped).

    Collectives: with one process the call returns at once; otherwise exactly
    ``2 + ceil(Σ D(D+1)/2 · itemsize / bucket_bytes)``, the same on every rank (a mismatch
    costs one more, for the message). Extra memory: the packed triangles of all Moments in
    ``dtype`` (≈ half the states) plus one ``D × D`` float64 temporary at a time.

    All or nothing: states are replaced only after every collective succeeded; a failed,
    timed-out or interrupted call leaves every state of this rank as it was. A rank whose
    arguments are refused (``TypeError``/``ValueError``) still joins the agreement check, so
    the other ranks raise at once too.
    """
    try:
        items, item_names = _parse(moments, names, dtype, bucket_bytes)
        wait_for = _as_timeout(timeout)
        refused = None
    except (TypeError, ValueError) as e:
        items, item_names, wait_for, refused = [], None, None, e
    if not (dist.is_available() and dist.is_initialized()):
        if refused is not None:
            raise refused
        raise RuntimeError("all_reduce_moments needs torch.distributed: call "
                           "torch.distributed.init_process_group(...) on every rank first")
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of group; call all_reduce_moments only "
                         "on the group's ranks")
    if dist.get_world_size(group) == 1:
        if refused is not None:
            raise refused
        return items  # already the merged state; no collective needed

    if refused is None:
        try:
            dev = _comm_device(group, device)
        except (TypeError, ValueError, RuntimeError) as e:
            refused = ValueError(f"device: {e}")
    if refused is not None:  # tell the others, then raise this rank's own error
        dev = _comm_device(group, None)
        _check_agreement([], None, torch.float64, 1, 0, group, dev, wait_for, refused=True)
        raise refused
    itemsize = torch.empty((), dtype=dtype).element_size()
    chunk = max(1, bucket_bytes // itemsize)  # elements per bucket
    sizes = [_tri(m.dim) for m in items]
    total = sum(sizes)
    _check_agreement(items, item_names, dtype, chunk, total, group, dev, wait_for)
    if not items:
        return items

    # Phase 1: one SUM of [n, n_skipped] for every Moments followed by every n·μ, in float64
    # (counts exact to 2^53). A rank with n = 0 writes zeros: its mean may be unallocated.
    k = len(items)
    # each state's counts read once (one host read per state; the same values in both phases)
    local = [(m.n, m.n_skipped) for m in items]
    counts = torch.tensor([float(v) for nk in local for v in nk], dtype=torch.float64)
    parts = [counts.to(dev)]
    for m, (n, _) in zip(items, local):
        parts.append(m.mean.to(device=dev, dtype=torch.float64) * n if n
                     else torch.zeros(m.dim, dtype=torch.float64, device=dev))
    head = torch.cat(parts)  # a fresh buffer: a collective never writes into a state
    _wait([_all_reduce(head, dist.ReduceOp.SUM, group)], wait_for, "the counts and means", group)
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
    for m, size, (_, _, mu), (n, _) in zip(items, sizes, glob, local):
        if n:
            c = m.scatter.to(device=dev, dtype=torch.float64)
            delta = m.mean.to(device=dev, dtype=torch.float64) - mu
            shifted = torch.addr(c, delta, delta, alpha=float(n))
            flat[off: off + size] = shifted[_triu_mask(m.dim, dev, masks)].to(dtype)
            del c, shifted
        off += size
        while sent + chunk <= off:
            works.append(_all_reduce(flat[sent: sent + chunk], dist.ReduceOp.SUM, group))
            sent += chunk
    if sent < total:
        works.append(_all_reduce(flat[sent:], dist.ReduceOp.SUM, group))
    _wait(works, wait_for, "a scatter bucket", group)

    # Phase 3: commit only now that every collective succeeded. The new tensors are built
    # first; should the commit still fail part-way (out of memory, KeyboardInterrupt), the
    # states already replaced get their old attributes back (replacing rebinds a state's
    # tensors, it never writes into the old ones), so the call stays all or nothing.
    news = []
    off = 0
    for m, size, (n_all, skipped, mu) in zip(items, sizes, glob):
        news.append((mu.to(m.device or dev) if n_all else None, flat[off: off + size],
                     n_all, skipped))
        off += size
    saved = []
    try:
        for m, (mu, packed, n_all, skipped) in zip(items, news):
            saved.append((m, dict(vars(m)) if hasattr(m, "__dict__") else None))
            # one store of a new state per Moments (an unallocated state, a rank that saw no
            # rows, is allocated on `dev`; with no row anywhere it stays "no state")
            m.replace_state(n_all, skipped, mu if n_all else None, packed if n_all else None)
    except BaseException:
        for m, old in saved:
            if old is not None:
                vars(m).clear()
                vars(m).update(old)
        raise
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
