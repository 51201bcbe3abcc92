"""Forward and gradient hooks of the layers with a weight matrix (Linear, Conv2d, HF Conv1D),
the shared-input dedup, recomputation under gradient checkpointing, and the calls whose
gradients never came.

Owns, per forward call of such a layer: reading h_a and h_b (before any later in-place op can
change them), attaching the one-shot tensor hooks that give g_b (output gradient) and g_a
(input gradient, or ``g_b @ W``); :class:`SharedInputs`, which lets layers fed the very same
input tensor share one H_a (and input-hook G_a) exactly as long as they have seen the same
rows; :func:`call_mode`, which tells a first pass from a recomputation; and :class:`Ticket`,
which counts the forward rows whose gradient rows never reached the collector. See the module
doc of :mod:`.collector` for the rules.

The functions receive the :class:`~crh_kernels.collect.Collector` explicitly and use only this
part of it: the flags ``_collecting`` (forward hooks) and ``_running`` (tensor hooks), the
generation ``_epoch`` (tensor hooks of an earlier generation, from before a ``reset`` or a
``load_state_dict``, are inert), the row policy ``_row_mask``, ``_subsample`` and
``_grad_scale``, ``_moments`` (the Moments of a stream, made on first use), ``_block_now``
(the sub-state block of a call, ``Collector(blocks=K)``: captured at the forward pass and
carried to the gradient hooks, the shared input's contribution and a reentrant checkpoint's
record, so that H and G of a call land in the same block), the stager
``_stager``, ``_shared`` (a :class:`SharedInputs`), ``_mask`` (its identity only) and
``g_a_source``.

Raw streams (a layer with ``st.raw``, ``Collector(raw_moments=True)``): each call also gives
the rows ``(h_a, 1)`` (the 1 where the module has a bias) to ``H_a_raw`` and, from the same
output-gradient hook, the per-sample ``g_b`` rows (``_grad_scale(terms, raw=True)``, or the
ordinary scale when ``normalize`` is off: the one more attribute these streams read) to
``G_b_raw``, with the rows (mask, ``max_rows``) the call keeps for its other streams. They are
never shared between layers (the dedup above is for ``h_a``/``g_a`` only): each layer's raw
states count exactly its own calls, as every other stream does.
"""
from __future__ import annotations

import collections
import itertools
import sys
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..moments import Moments
from .blocks import copy_moments
from .layer import STATE_ATTR, LayerStats

__all__ = ["first_tensor", "hook_once", "SharedInputs", "Contribution", "Ticket", "call_mode",
           "in_backward", "NORMAL", "SKIP", "RECORD", "REPLAY", "take_record", "put_record",
           "forward_hook", "on_layer"]


def first_tensor(out) -> Optional[torch.Tensor]:
    """``out`` itself if it is a tensor, else the first tensor of a tuple/list (or None)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def hook_once(t: torch.Tensor, fn) -> None:
    """``t.register_hook(fn)`` that removes itself after its first call: one forward call gives
    one set of gradient rows, even for a tensor that outlives the pass (a leaf input that takes
    part in later backward passes) or a graph backpropagated twice (``retain_graph=True``)."""
    box = []

    def once(g):
        if box:
            box.pop().remove()
            return fn(g)
        return None

    box.append(t.register_hook(once))


# ------------------------------------------------------------------ recomputation
# A forward call is one of:
#   NORMAL  an ordinary call;
#   SKIP    a recomputation whose rows the first pass already gave (the non-reentrant
#           torch.utils.checkpoint, or any other forward run inside a backward pass): nothing
#           is counted, nothing is hooked;
#   RECORD  the first pass of a reentrant torch.utils.checkpoint segment (run under no_grad
#           inside CheckpointFunction.forward): counted as a forward-only call, and its row
#           choice (subsample, mask) is kept on the checkpoint's autograd context;
#   REPLAY  the recomputation of such a segment inside CheckpointFunction.backward: the forward
#           rows are not counted again; the gradient hooks are attached with the rows chosen
#           by the first pass, and the call stops being forward-only.
NORMAL, SKIP, RECORD, REPLAY = "normal", "skip", "record", "replay"

_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
_ckpt_codes: Optional[Tuple] = None


def _checkpoint_codes() -> Tuple:
    global _ckpt_codes
    if _ckpt_codes is None:
        try:
            from torch.utils.checkpoint import CheckpointFunction as F
            _ckpt_codes = (F.forward.__code__, F.backward.__code__)
        except (ImportError, AttributeError):  # a torch without the reentrant variant
            _ckpt_codes = (None, None)
    return _ckpt_codes


def _frame_ctx(code, max_depth: int = 256):
    """The ``ctx`` local of the innermost running frame of ``code`` (None if none runs)."""
    if code is None:
        return None
    f = sys._getframe(2)
    while f is not None and max_depth:
        if f.f_code is code:
            return f.f_locals.get("ctx")
        f = f.f_back
        max_depth -= 1
    return None


def in_backward() -> bool:
    """Whether an autograd backward pass is running on this thread."""
    return _graph_task_id is not None and _graph_task_id() != -1


def call_mode() -> Tuple[str, object]:
    """``(mode, checkpoint context)`` of the forward call being hooked (see NORMAL ... REPLAY)."""
    if in_backward():
        ctx = _frame_ctx(_checkpoint_codes()[1])
        return (REPLAY, ctx) if ctx is not None else (SKIP, None)
    if not torch.is_grad_enabled():
        ctx = _frame_ctx(_checkpoint_codes()[0])
        if ctx is not None:
            return RECORD, ctx
    return NORMAL, None


def put_record(ctx, col, who, record) -> None:
    """Keep the row choice of a RECORD call of ``who`` (a LayerStats or a HeadGroup) on ``ctx``."""
    calls = ctx.__dict__.setdefault("_crh_calls", {})
    calls.setdefault((id(col), id(who)), collections.deque()).append(record)


def take_record(ctx, col, who):
    """The row choice of the first pass matching this REPLAY call (None: the first pass was
    not collected, and the replay is skipped). Calls replay in their first pass's order."""
    calls = getattr(ctx, "_crh_calls", None)
    q = None if calls is None else calls.get((id(col), id(who)))
    return q.popleft() if q else None


# ------------------------------------------------------------------ lost gradients
class Ticket:
    """One forward call's promise of gradient rows. If it is freed (its autograd graph freed:
    an aborted step, an output the loss did not use) or its hook fires while the collector is
    stopped, without the gradient rows having been taken, the rows its forward streams
    counted are added to each layer's ``rows_without_grad`` (and the call to
    ``calls_without_grad``)."""

    __slots__ = ("col", "epoch", "layers", "count", "fired")

    def __init__(self, col, layers: Sequence[LayerStats], r: int, mask):
        self.col = weakref.ref(col)
        self.epoch = col._epoch
        self.layers = list(layers)
        self.count = r if mask is None else mask     # rows kept, before the mask
        self.fired = False

    def __del__(self):
        try:
            if self.fired:
                return
            col = self.col()
            if col is None or col._epoch != self.epoch:
                return
            for st in self.layers:
                st.note_without_grad(self.count)
        except Exception:  # never raise from a finalizer (interpreter shutdown, etc.)
            pass


# ------------------------------------------------------------------ shared inputs
_MIXED = -1                    # content of a Moments fed by more than one contribution
_serials = itertools.count(1)


class Contribution:
    """The rows one input tensor gives, in one step, the layers that take it ("claimants").

    ``streams``: the input-side streams it feeds (``h_a``; ``g_a`` when the gradient comes
    from a hook on the input). Its rows go into every distinct Moments that its claimants
    hold, once each, and only into a Moments all of whose holders are claimants.
    """

    __slots__ = ("serial", "key", "ref", "mask_src", "streams", "idx", "mask", "terms",
                 "claimants", "done", "rows", "epoch", "tickets", "adapter", "module", "block")

    def __init__(self, key, x, mask_src, streams, idx, mask, terms, epoch, adapter, module,
                 block=None):
        self.serial = next(_serials)
        self.key = key
        self.ref = weakref.ref(x)
        self.mask_src = mask_src
        self.streams = streams
        self.idx = idx
        self.mask = mask
        self.terms = terms
        self.claimants: List[LayerStats] = []
        self.done: Dict[str, list] = {s: [] for s in streams}   # Moments given these rows
        self.rows: Optional[torch.Tensor] = None     # h_a rows kept while a Moments waits
        self.epoch = epoch
        self.tickets: List[Ticket] = []              # calls whose gradient is this one's
        self.adapter = adapter
        self.module = module
        self.block = block                           # the sub-state block of its step


class _IdMap:
    """A map keyed by object identity that does not keep its keys alive (so a Moments need
    not be hashable)."""

    def __init__(self):
        self._d: Dict[int, tuple] = {}

    def get(self, obj, default=None):
        e = self._d.get(id(obj))
        return default if e is None or e[0]() is not obj else e[1]

    def __contains__(self, obj) -> bool:
        e = self._d.get(id(obj))
        return e is not None and e[0]() is obj

    def __setitem__(self, obj, value) -> None:
        if len(self._d) > 4096:
            self._d = {k: e for k, e in self._d.items() if e[0]() is not None}
        self._d[id(obj)] = (weakref.ref(obj), value)

    def pop(self, obj, default=None):
        if obj in self:
            return self._d.pop(id(obj))[1]
        return default


class SharedInputs:
    """Layers that take the very same input tensor share one H_a (and input-hook G_a) Moments,
    exactly as long as they have been fed the same rows.

    A tensor's identity is ``data_ptr + shape + stride + dtype + device + version`` of a tensor
    that is still alive (a weak reference), plus the layer's kind, D_in, bias column and
    geometry, the streams the call feeds and the collector's mask; it is remembered for one
    step. Every call of a layer on such a tensor is a claim on that tensor's
    :class:`Contribution`:

    * a Moments receives a contribution's rows once all of its holders (the layers whose
      stream it is) have claimed it, and never otherwise: until then the h_a rows wait, copied;
    * a layer whose stream holds nothing yet, claiming a contribution that is all another
      Moments holds, joins that Moments (this is how q, k and v come to share one);
    * when a contribution can wait no longer (the next step, any read of the states, the
      gradient of that input arriving), a Moments whose holders did not all claim it is split:
      the claimants continue on a copy. Layers that stop getting the same inputs therefore stop
      sharing, and every layer counts exactly its own rows, staged or not.
    """

    def __init__(self, stager):
        self.stager = stager
        self._seen: Dict[tuple, Contribution] = {}
        self._pending: List[Contribution] = []
        self._holders = _IdMap()     # Moments -> its holders, where more than one layer holds it
        self._content = _IdMap()     # Moments -> serial of the one contribution it holds, or _MIXED

    # ----------------------------------------------------------- bookkeeping
    def new_step(self) -> None:
        """Settle every waiting contribution and forget this step's inputs."""
        self.resolve_all()
        self._seen.clear()

    def adopt(self, layers: Sequence[LayerStats]) -> None:
        """Rebuild the holders of the Moments that ``layers`` hold (after a restore)."""
        by_id: Dict[int, list] = {}
        for st in layers:
            for s in ("h_a", "g_a"):
                m = getattr(st, STATE_ATTR[s])
                if m is not None:
                    by_id.setdefault(id(m), [m, []])[1].append(st)
        for m, holders in by_id.values():
            if len(holders) > 1:
                self._holders[m] = holders
            if m.n or m.n_skipped:
                self._content[m] = _MIXED
        for st in layers:
            self._name(st)

    def holders(self, m: Moments, st: LayerStats) -> List[LayerStats]:
        return self._holders.get(m) or [st]

    def _name(self, st: LayerStats) -> None:
        """``st.shared``: for each shared stream, the first other layer holding it."""
        st.shared = {}
        for s in ("h_a", "g_a"):
            m = getattr(st, STATE_ATTR[s])
            hs = self._holders.get(m) if m is not None else None
            if hs and len(hs) > 1 and hs[0] is not st:
                st.shared[s] = hs[0].name

    def _empty(self, m: Optional[Moments]) -> bool:
        """A stream with no rows counted, staged or to come."""
        return m is None or (m not in self._content and m.n == 0 and m.n_skipped == 0
                             and not self.stager.holds(m))

    # ----------------------------------------------------------- claims
    def lookup(self, col, st: LayerStats, x: torch.Tensor, streams: Tuple[str, ...]):
        """``(key, contribution)``: this step's contribution of ``x`` for a call of ``st``
        feeding ``streams``, or None when there is none or ``st`` has claimed it already (a
        second call on the same tensor counts again)."""
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version,
               st.kind, st.dims.get("h_a"), st.bias_col, st.adapter.geometry(st.module),
               streams, id(col._mask))
        c = self._seen.get(key)
        if (c is None or c.ref() is None or c.mask_src is not col._mask
                or any(o is st for o in c.claimants)):
            return key, None
        return key, c

    def open(self, col, key, x, streams, idx, mask, terms, st, block=None) -> Contribution:
        c = Contribution(key, x, col._mask, streams, idx, mask, terms, col._epoch, st.adapter,
                         st.module, block)
        if len(self._seen) > 512:
            self._seen = {k: v for k, v in self._seen.items() if v.ref() is not None}
        self._seen[key] = c
        return c

    def claim(self, col, c: Contribution, st: LayerStats, rows_fn, device) -> None:
        """``st``'s call takes ``c``'s rows. ``rows_fn()`` gives this call's h_a rows."""
        c.claimants.append(st)
        joined = False
        for s in c.streams:
            attr = STATE_ATTR[s]
            mine = getattr(st, attr)
            target = None
            if self._empty(mine):
                for m in c.done[s]:
                    if self._content.get(m) == c.serial:
                        target = m
                        break
            if target is not None:
                hs = self._holders.get(target)
                if hs is None:
                    hs = self._holders[target] = [o for o in c.claimants
                                                  if getattr(o, attr) is target]
                hs.append(st)
                setattr(st, attr, target)
                joined = True
            elif mine is None:
                col._moments(st, s, st.dims[s], device)
        if joined:
            self._name(st)
        self._settle(c, rows_fn)

    def _settle(self, c: Contribution, rows_fn=None) -> None:
        """Give ``c``'s rows to each Moments whose holders have all claimed it; keep a copy of
        the h_a rows while some Moments still waits."""
        box = []

        def rows():
            if c.rows is not None:
                return c.rows
            if not box:
                box.append(rows_fn())
            return box[0]

        waiting = set()
        for s in c.streams:
            attr = STATE_ATTR[s]
            for st in c.claimants:
                m = getattr(st, attr)
                if any(m is d for d in c.done[s]):
                    continue
                if all(any(h is o for o in c.claimants) for h in self.holders(m, st)):
                    self._commit(c, s, m, rows)
                else:
                    waiting.add(s)
        if waiting:
            if c.rows is None and "h_a" in waiting:
                c.rows = rows().clone(memory_format=torch.contiguous_format)
            if not any(p is c for p in self._pending):
                self._pending.append(c)
        else:
            c.rows = None
            self._pending = [p for p in self._pending if p is not c]

    def _commit(self, c: Contribution, s: str, m: Moments, rows) -> None:
        content = c.serial if self._empty(m) else _MIXED
        if s == "h_a":
            self.stager.feed(m, rows(), c.mask, c.block)
        self._content[m] = content
        c.done[s].append(m)

    def force(self, c: Contribution) -> None:
        """Settle ``c`` now: a Moments whose holders did not all claim it is split first."""
        if not any(p is c for p in self._pending):
            return
        for s in c.streams:
            attr = STATE_ATTR[s]
            for st in list(c.claimants):
                m = getattr(st, attr)
                if any(m is d for d in c.done[s]):
                    continue
                hs = self.holders(m, st)
                mine = [h for h in hs if any(h is o for o in c.claimants)]
                if len(mine) < len(hs):
                    self._split(m, mine, [h for h in hs if not any(h is o for o in mine)], attr)
        self._settle(c)
        self._pending = [p for p in self._pending if p is not c]
        for p in list(self._pending):     # holders changed: others may be ready now
            self._settle(p)

    def _split(self, m: Moments, leave: List[LayerStats], stay: List[LayerStats], attr: str):
        """Holders ``leave`` continue on a copy of ``m``; ``stay`` keep ``m``."""
        self.stager.flush_one(m)
        m2 = copy_moments(m)
        if m in self._content:
            self._content[m2] = self._content.get(m)
        s = next(k for k, a in STATE_ATTR.items() if a == attr)
        for c in itertools.chain(self._pending, self._seen.values()):
            done = c.done.get(s, ())
            if any(d is m for d in done) and not any(d is m2 for d in done):
                c.done[s].append(m2)        # the copy holds (or will get) those rows too
        for h in leave:
            setattr(h, attr, m2)
        for m_, hs in ((m2, leave), (m, stay)):
            if len(hs) > 1:
                self._holders[m_] = list(hs)
            else:
                self._holders.pop(m_, None)
        for h in itertools.chain(leave, stay):
            self._name(h)

    def resolve_all(self) -> None:
        """Settle every waiting contribution (before any read of the states)."""
        while self._pending:
            self.force(self._pending[0])

    def targets(self, c: Contribution, s: str) -> List[Moments]:
        """The distinct Moments of stream ``s`` that ``c``'s claimants hold (``c`` settled)."""
        self.force(c)
        out = []
        for st in c.claimants:
            m = getattr(st, STATE_ATTR[s])
            if m is not None and not any(m is o for o in out):
                out.append(m)
        return out


def choose_rows(col, r: int, device, mask):
    """``(idx, mask)``: the ``max_rows`` subsample of a call's ``r`` rows (None: all of them)
    and the call's row mask cut down to it."""
    idx = col._subsample(r, device)
    return idx, (mask[idx] if idx is not None and mask is not None else mask)


def call_gate(col):
    """``(mode, ctx)`` of a hooked forward call, or None when the call is not to be collected
    (collector stopped, a recomputation to skip, or not a collecting step and no replay)."""
    if not col._running:
        return None
    mode, ctx = NORMAL, None
    if not torch.is_grad_enabled() or in_backward():
        mode, ctx = call_mode()
        if mode == SKIP:
            return None
    if not col._collecting and mode != REPLAY:
        return None
    return mode, ctx


# ------------------------------------------------------------------ forward hooks
def forward_hook(col, st: LayerStats):
    """The module forward hook (``with_kwargs=True``) of weight layer ``st``."""
    def hook(module, args, kwargs, output):
        gate = call_gate(col)
        if gate is None:
            return None
        mode, ctx = gate
        x = args[0] if args else first_tensor(list(kwargs.values()))
        y = first_tensor(output)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            on_layer(col, st, module, x, y, mode=mode, ctx=ctx)
        return None
    return hook


def on_layer(col, st: LayerStats, module, x: torch.Tensor, y: torch.Tensor,
             rows_mask=None, lead_known: bool = False, mode: str = NORMAL, ctx=None) -> None:
    """One call of a weight layer: x input, y output. ``rows_mask`` (already flattened) and
    ``lead_known`` are used by the MHA path (:mod:`.attention`), whose rows come pre-flattened.
    ``mode``/``ctx``: see :func:`call_mode`."""
    ad = st.adapter
    streams = st.streams
    replay = mode == REPLAY
    raw = st.raw
    want_grad = ("g_a" in streams or "g_b" in streams or raw)
    if replay:
        rec = take_record(ctx, col, st)
        if rec is None or not want_grad:
            return
        st.forward_only_calls -= 1          # the first pass was not forward-only after all
    else:
        st.forward_calls += 1
    yr, lead = ad.output_rows(module, y.detach())
    r = yr.shape[0]
    grad_ok = want_grad and torch.is_grad_enabled() and y.requires_grad
    if want_grad and not grad_ok:
        st.forward_only_calls += 1
    use_input_hook = (grad_ok and "g_a" in streams and col.g_a_source == "auto"
                      and ad.input_grad_is_g_a() and not st.bias_col and x.requires_grad)

    # ---- which rows: the first pass's (replay), a shared input's, or this call's ----------
    cs = tuple(s for s, on in (("h_a", "h_a" in streams and not replay),
                               ("g_a", use_input_hook)) if on)
    key = c = None
    if cs:
        key, c = col._shared.lookup(col, st, x, cs)
    if replay:
        idx, mask, full_mask, blk = rec
    else:
        blk = col._block_now()      # the sub-state block of this call (blocks="step")
        full_mask = rows_mask if lead_known else col._row_mask(lead, y.device, st)
        if c is not None:
            idx, mask = c.idx, c.mask              # the rows its first claimant kept
        else:
            idx, mask = choose_rows(col, r, y.device, full_mask)
        if mode == RECORD:
            put_record(ctx, col, st, (idx, mask, full_mask, blk))
    if idx is not None:
        yr = yr[idx]
    terms = (r, full_mask)

    # ---- h_a and input-hook g_a: a claim on the input's contribution ------------------
    made = []                 # this call's h_a rows, if made (the raw stream reuses them)
    if cs:
        new = c is None
        if new:
            c = col._shared.open(col, key, x, cs, idx, mask, terms, st, blk)

        def rows_fn():
            xr = ad.input_rows(module, x.detach())
            if idx is not None:
                xr = xr[idx]
            if st.bias_col:
                xr = torch.cat([xr, xr.new_ones(xr.shape[0], 1)], dim=1)
            made.append(xr)
            return xr

        col._shared.claim(col, c, st, rows_fn, x.device)
        if new and "g_a" in cs:
            hook_once(x, _input_grad_hook(col, c))
    if "h_b" in streams and not replay:
        col._stager.feed(col._moments(st, "h_b", st.dims["h_b"], y.device), yr, mask, blk)
    if raw and not replay:
        _feed_raw_h_a(col, st, module, x, idx, mask, made[0] if made else None, blk)
    if not grad_ok:
        return
    st.grad_calls += 1

    # ---- g_b (and g_a = g_b @ W) from the output's gradient ----------------
    gb_m = col._moments(st, "g_b", st.dims["g_b"], y.device) if "g_b" in streams else None
    ga_m = None
    if "g_a" in streams and not use_input_hook:
        ga_m = col._moments(st, "g_a", st.dims["g_a"], y.device)
    raw_m = col._moments(st, "g_b_raw", st.raw_dims["g_b_raw"], y.device) if raw else None
    ticket = Ticket(col, [st], r if idx is None else idx.shape[0], mask)
    if gb_m is not None or ga_m is not None or raw_m is not None:
        hook_once(y, _output_grad_hook(col, st, module, gb_m, ga_m, idx, mask, terms, ticket,
                                       raw_m, blk))
    elif c is not None and "g_a" in c.streams:
        c.tickets.append(ticket)       # its gradient is the input hook's
    else:
        ticket.fired = True


def _feed_raw_h_a(col, st: LayerStats, module, x: torch.Tensor, idx, mask, rows=None,
                  blk=None) -> None:
    """The call's raw rows ``(h_a, 1)`` into ``H_a_raw`` (the 1 where the module has a bias);
    the first such rows of the states also keep ``W̃`` (``st.raw_weight0``). ``rows``: this
    call's h_a rows if the h_a stream made them (no second ``unfold`` of a conv's input)."""
    d = st.raw_dims["h_a_raw"]
    if rows is not None and rows.shape[-1] in (d, d - 1):
        xr = rows            # with the bias column exactly when the raw rows need it, or without
    else:
        xr = st.adapter.input_rows(module, x.detach())
        if idx is not None:
            xr = xr[idx]
    if xr.shape[-1] != d:            # the bias column
        xr = torch.cat([xr, xr.new_ones(xr.shape[0], 1)], dim=1)
    col._stager.feed(col._moments(st, "h_a_raw", d, x.device), xr, mask, blk)
    if st.raw_weight0 is None:
        st.raw_weight0 = st.raw_weight().clone()


def _input_grad_hook(col, c: Contribution):
    """Tensor hook on the input of a contribution: its gradient rows are the g_a of every
    claimant (each distinct Moments once)."""
    epoch = c.epoch

    def hook(g):
        if not col._running or col._epoch != epoch:
            return None
        with torch.no_grad():
            gr = c.adapter.input_rows(c.module, g.detach())
            if c.idx is not None:
                gr = gr[c.idx]
            scale = col._grad_scale(c.terms)
            if scale is not None:
                gr = gr * scale
            for m in col._shared.targets(c, "g_a"):
                col._stager.feed(m, gr, c.mask, c.block)
            for t in c.tickets:
                t.fired = True
        return None
    return hook


def _output_grad_hook(col, st: LayerStats, module, gb_m, ga_m, idx, mask, terms, ticket,
                      raw_m=None, blk=None):
    """Tensor hook on the layer's output: its gradient rows are g_b, and ``g_b @ W`` is g_a
    where ``ga_m`` is given; ``raw_m``: also the per-sample g_b rows into ``G_b_raw``.
    ``blk``: the sub-state block of the forward call (its gradient rows go there too)."""
    ad = st.adapter
    epoch = col._epoch

    def hook(g):
        if not col._running or col._epoch != epoch:
            return None
        with torch.no_grad():
            gr, _ = ad.output_rows(module, g.detach())
            if idx is not None:
                gr = gr[idx]
            scale = col._grad_scale(terms)
            if raw_m is not None:
                raw_scale = scale if not col.normalize else col._grad_scale(terms, raw=True)
                col._stager.feed(raw_m, gr if raw_scale is None else gr * raw_scale, mask, blk)
            if scale is not None:
                gr = gr * scale
            if gb_m is not None:
                col._stager.feed(gb_m, gr, mask, blk)
            if ga_m is not None:
                col._stager.feed(ga_m, ad.g_a_from_g_b(module, gr, st.bias_col), mask, blk)
        ticket.fired = True
        return None
    return hook
