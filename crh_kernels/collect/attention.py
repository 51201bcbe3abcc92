"""Per-head streams: ``heads=`` entries and ``nn.MultiheadAttention`` spying.

Owns the hooks of every :class:`~.layer.HeadGroup`: the split of a module's output (last dim)
into per-head rows for H_b and G_b; for ``nn.MultiheadAttention``, the watch on the ``F.linear``
call that applies ``out_proj`` (through :class:`.adapters.LinearSpy`), which yields the attention
output before ``out_proj`` and also feeds the ``<name>.out_proj`` layer when it is selected;
and :class:`MhaWatch`, which switches the fused MHA fast path off while the collector runs and
closes every open watch on stop. Recomputation under gradient checkpointing is handled as for
weight layers (:func:`.hooks.call_mode`): the row choice of a reentrant segment's first pass
is kept per head group and replayed.

The functions receive the :class:`~crh_kernels.collect.Collector` explicitly and use only this
part of it: the flags ``_collecting`` and ``_running``, the generation ``_epoch`` (tensor hooks
of an earlier one are inert), the row policy ``_mask`` (is one set),
``_row_mask``, ``_subsample`` and ``_grad_scale``, ``_moments``, ``_block_now`` (the sub-state
block of a call, carried to its gradient hook), the stager ``_stager``,
``_layers.weight_layers`` (to find ``out_proj``) and ``_mha`` (its :class:`MhaWatch`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..moments import Moments
from .adapters import LinearSpy
from .hooks import (NORMAL, RECORD, REPLAY, Ticket, call_gate, choose_rows, first_tensor, hook_once,
                    on_layer, put_record, take_record)
from .layer import HeadGroup

__all__ = ["MhaWatch", "register", "on_heads"]


class MhaWatch:
    """The open ``out_proj`` watches of MHA forwards in flight, and the MHA fast-path switch."""

    def __init__(self):
        self.open: Dict[int, tuple] = {}          # id(mha) -> (out_proj.weight, call state)
        self._fastpath_prev: Optional[bool] = None

    def switch_fastpath_off(self, model: nn.Module) -> None:
        """If ``model`` holds an ``nn.MultiheadAttention``, switch the fused inference fast path
        of MHA / ``nn.TransformerEncoderLayer`` off (it bypasses module hooks and ``out_proj``)."""
        if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
            self._fastpath_prev = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)

    def close(self) -> None:
        """End every open watch and put the fast-path setting back."""
        for key in list(self.open):
            LinearSpy.exit(self.open.pop(key)[0])
        if self._fastpath_prev is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath_prev)
            self._fastpath_prev = None


def register(col, grp: HeadGroup) -> list:
    """Register the module hooks of one head group; returns their handles."""
    if grp.mha:
        return [grp.module.register_forward_pre_hook(_mha_pre_hook(col, grp), with_kwargs=True),
                grp.module.register_forward_hook(_mha_post_hook(col, grp), always_call=True)]
    return [grp.module.register_forward_hook(_heads_hook(col, grp))]


def on_heads(col, grp: HeadGroup, rows: torch.Tensor, mask, requires_grad: bool,
             mode: str = NORMAL, ctx=None):
    """rows: (R, D) output rows of the module, split into ``grp.n_heads`` heads. Returns
    ``(Moments of g_b per head, idx, mask, terms, ticket, block)`` when gradients are to be
    hooked, else None (``block``: the sub-state block of the call, ``Collector(blocks=K)``).
    ``mode``/``ctx``: see :func:`.hooks.call_mode`."""
    layers = grp.layers
    h = grp.n_heads
    d_total = rows.shape[-1]
    if d_total % h:
        raise ValueError(f"heads: {grp.name!r} output has {d_total} features, not divisible by "
                         f"{h} heads")
    d = d_total // h
    streams = layers[0].streams
    replay = mode == REPLAY
    if replay:
        rec = take_record(ctx, col, grp)
        if rec is None or "g_b" not in streams:
            return None
        idx, mask, terms, blk = rec
        for st in layers:
            st.forward_only_calls -= 1      # the first pass was not forward-only after all
    else:
        for st in layers:
            st.forward_calls += 1
            if not st.dims:
                st.dims = {"h_b": d, "g_b": d}
        terms = (rows.shape[0], mask)
        blk = col._block_now()
        idx, mask = choose_rows(col, rows.shape[0], rows.device, mask)
        if mode == RECORD:
            put_record(ctx, col, grp, (idx, mask, terms, blk))
    if idx is not None:
        rows = rows[idx]
    if "h_b" in streams and not replay:
        per = rows.reshape(rows.shape[0], h, d).transpose(0, 1)
        for i, st in enumerate(layers):
            col._stager.feed(col._moments(st, "h_b", d, rows.device), per[i], mask, blk)
    if "g_b" not in streams:
        return None
    if not (torch.is_grad_enabled() and requires_grad):
        for st in layers:
            st.forward_only_calls += 1
        return None
    ms = [col._moments(st, "g_b", d, rows.device) for st in layers]
    for st in layers:
        st.grad_calls += 1
    ticket = Ticket(col, layers, rows.shape[0], mask)
    return ms, idx, mask, terms, ticket, blk


def _head_grad_hook(col, ms: List[Moments], n_heads: int, idx, mask, terms, reshape, ticket,
                    blk=None):
    """Tensor hook on the split tensor: its gradient rows, split per head, are each head's g_b."""
    epoch = col._epoch

    def hook(g):
        if not col._running or col._epoch != epoch:
            return None
        with torch.no_grad():
            gr = reshape(g.detach())
            if idx is not None:
                gr = gr[idx]
            scale = col._grad_scale(terms)
            if scale is not None:
                gr = gr * scale
            d = gr.shape[-1] // n_heads
            per = gr.reshape(gr.shape[0], n_heads, d).transpose(0, 1)
            for i, m in enumerate(ms):
                col._stager.feed(m, per[i], mask, blk)
        ticket.fired = True
        return None
    return hook


# ------------------------------------------------------------------ heads= entries
def _heads_hook(col, grp: HeadGroup):
    def hook(module, args, output):
        how = call_gate(col)
        if how is None:
            return None
        y = first_tensor(output)
        if y is None:
            return None
        rows = y.reshape(-1, y.shape[-1])
        mask = None
        if how[0] != REPLAY:
            mask = col._row_mask(tuple(y.shape[:-1]), y.device, grp.layers[0])
            if mask is None and col._mask is not None:
                for st in grp.layers[1:]:
                    st.unmasked_calls += 1
        res = on_heads(col, grp, rows.detach(), mask, rows.requires_grad, *how)
        if res is not None:
            hook_once(y, _head_grad_hook(col, ms=res[0], n_heads=grp.n_heads, idx=res[1],
                                         mask=res[2], terms=res[3], ticket=res[4],
                                         reshape=lambda g: g.reshape(-1, g.shape[-1]),
                                         blk=res[5]))
        return None
    return hook


# ------------------------------------------------------------- nn.MultiheadAttention
def _mha_pre_hook(col, grp: HeadGroup):
    mha = grp.module

    def pre_hook(module, args, kwargs):
        how = call_gate(col)
        if how is None:
            return None
        query = args[0] if args else kwargs.get("query")
        if not isinstance(query, torch.Tensor):
            return None
        # Internally rows are ordered (T, B): map the user's mask (on query's leading dims).
        lead = tuple(query.shape[:-1])
        batch_first = mha.batch_first and query.dim() == 3
        out_st = col._layers.weight_layers.get(grp.name + ".out_proj")
        if out_st is not None and out_st.module is not mha.out_proj:
            out_st = None
        state = {"lead": lead, "batch_first": batch_first, "out": out_st, "how": how}

        def on_linear(inp, out):
            _on_mha_out_proj(col, grp, state, inp, out)

        LinearSpy.enter(mha.out_proj.weight, on_linear)
        col._mha.open[id(mha)] = (mha.out_proj.weight, state)
        return None
    return pre_hook


def _mha_post_hook(col, grp: HeadGroup):
    mha = grp.module

    def post_hook(module, args, output):
        entry = col._mha.open.pop(id(mha), None)
        if entry is not None:
            LinearSpy.exit(entry[0])
        return None
    return post_hook


def _on_mha_out_proj(col, grp: HeadGroup, state: dict, inp: torch.Tensor,
                     out: torch.Tensor) -> None:
    """``inp``: (T·B, E) attention output before out_proj, rows in (T, B) order."""
    mask = None
    mode, ctx = state["how"]
    if col._mask is not None and mode != REPLAY:
        lead = state["lead"]
        m = col._row_mask(lead, inp.device, None)
        if m is not None:
            m = m.reshape(lead)
            if state["batch_first"]:
                m = m.transpose(0, 1)
            mask = m.reshape(-1)
        else:
            for st in grp.layers:
                st.unmasked_calls += 1
    res = on_heads(col, grp, inp.detach(), mask, inp.requires_grad, mode, ctx)
    if res is not None:
        hook_once(inp, _head_grad_hook(col, ms=res[0], n_heads=grp.n_heads, idx=res[1],
                                       mask=res[2], terms=res[3], ticket=res[4],
                                       reshape=lambda g: g, blk=res[5]))
    out_st = state["out"]
    if out_st is not None:
        on_layer(col, out_st, out_st.module, inp, out, rows_mask=mask, lead_known=True,
                 mode=mode, ctx=ctx)
