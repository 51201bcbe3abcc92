"""Forward and gradient hooks of the layers with a weight matrix (Linear, Conv2d, HF Conv1D),
and the shared-input dedup.

Owns, per forward call of such a layer: reading h_a and h_b (before any later in-place op can
change them), attaching the one-shot tensor hooks that give g_b (output gradient) and g_a
(input gradient, or ``g_b @ W``), and :class:`SharedInputs`, which lets layers fed the very same
input tensor within a step share one H_a (and input-hook G_a). See the module doc of
:mod:`.collector` for the rules.

The functions receive the :class:`~crh_kernels.collect.Collector` explicitly and use only this
part of it: the flags ``_collecting`` (forward hooks) and ``_running`` (tensor hooks), the row
policy ``_row_mask``, ``_subsample`` and ``_grad_scale``, ``_moments`` (the Moments of a stream,
made on first use), the stager ``_stager``, ``_shared`` (a :class:`SharedInputs`) and
``g_a_source``.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch

from ..moments import Moments
from .layer import STATE_ATTR, LayerStats

__all__ = ["first_tensor", "hook_once", "SharedInputs", "forward_hook", "on_layer"]


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


class SharedInputs:
    """Input tensors already taken by a layer in this step (the shared-input dedup).

    Identity is ``data_ptr + shape + stride + dtype + device + version`` of a tensor that is
    still alive (a weak reference), plus the layer's kind, D_in, bias column and geometry. The
    collector clears it on every step, stop, reset and load.
    """

    def __init__(self):
        self._seen: Dict[tuple, tuple] = {}

    def clear(self) -> None:
        self._seen.clear()

    def owner(self, st: LayerStats, x: torch.Tensor, alias_g_a: bool) -> Optional[LayerStats]:
        """If another layer already took this very input tensor in this step, alias its H_a
        (and, when ``alias_g_a``, its input-hook G_a) where this layer has no rows of its own,
        and return that layer; else register ``st`` as the tensor's owner and return None.
        The caller feeds none of the streams that ended up shared (``st.X is owner.X``)."""
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version,
               st.kind, st.dims.get("h_a"), st.bias_col, st.adapter.geometry(st.module))
        entry = self._seen.get(key)
        if entry is not None:
            ref, owner = entry
            if ref() is not None and owner is not st:
                for s in ("h_a", "g_a") if alias_g_a else ("h_a",):
                    mine, theirs = getattr(st, STATE_ATTR[s]), getattr(owner, STATE_ATTR[s])
                    if s not in st.streams or theirs is None or mine is theirs:
                        continue
                    if mine is not None and mine.n > 0:
                        continue  # this layer already has rows of its own: keep it separate
                    setattr(st, STATE_ATTR[s], theirs)
                    st.shared[s] = owner.shared.get(s, owner.name)
                return owner
        if len(self._seen) > 512:
            self._seen = {k: v for k, v in self._seen.items() if v[0]() is not None}
        self._seen[key] = (weakref.ref(x), st)
        return None


def forward_hook(col, st: LayerStats):
    """The module forward hook (``with_kwargs=True``) of weight layer ``st``."""
    def hook(module, args, kwargs, output):
        if not col._collecting:
            return None
        x = args[0] if args else first_tensor(list(kwargs.values()))
        y = first_tensor(output)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            on_layer(col, st, module, x, y)
        return None
    return hook


def on_layer(col, st: LayerStats, module, x: torch.Tensor, y: torch.Tensor,
             rows_mask=None, lead_known: bool = False) -> None:
    """One call of a weight layer: x input, y output. ``rows_mask`` (already flattened) and
    ``lead_known`` are used by the MHA path (:mod:`.attention`), whose rows come pre-flattened."""
    ad = st.adapter
    st.forward_calls += 1
    yr, lead = ad.output_rows(module, y.detach())
    r = yr.shape[0]
    mask = rows_mask if lead_known else col._row_mask(lead, y.device, st)
    full_mask = mask
    idx = col._subsample(r, y.device)
    if idx is not None:
        yr = yr[idx]
        if mask is not None:
            mask = mask[idx]
    streams = st.streams
    want_grad = ("g_a" in streams or "g_b" in streams)
    grad_ok = want_grad and torch.is_grad_enabled() and y.requires_grad
    if want_grad and not grad_ok:
        st.forward_only_calls += 1
    use_input_hook = (grad_ok and "g_a" in streams and col.g_a_source == "auto"
                      and ad.input_grad_is_g_a() and not st.bias_col and x.requires_grad)

    # ---- h_a (with shared-input dedup) -------------------------------------
    owner = None
    if "h_a" in streams or use_input_hook:
        owner = col._shared.owner(st, x, alias_g_a=use_input_hook)
    if "h_a" in streams and not (owner is not None and st.H_a is owner.H_a):
        xr = ad.input_rows(module, x.detach())
        if idx is not None:
            xr = xr[idx]
        if st.bias_col:
            xr = torch.cat([xr, xr.new_ones(xr.shape[0], 1)], dim=1)
        col._stager.feed(col._moments(st, "h_a", st.dims["h_a"], x.device), xr, mask)
    if "h_b" in streams:
        col._stager.feed(col._moments(st, "h_b", st.dims["h_b"], y.device), yr, mask)
    if not grad_ok:
        return
    st.grad_calls += 1
    terms = (r, full_mask)

    # ---- g_a from the input's gradient -------------------------------------
    if use_input_hook and not (owner is not None and st.G_a is owner.G_a):
        ga_m = col._moments(st, "g_a", st.dims["g_a"], x.device)
        hook_once(x, _input_grad_hook(col, ga_m, ad, module, idx, mask, terms))

    # ---- g_b (and g_a = g_b @ W) from the output's gradient ----------------
    gb_m = col._moments(st, "g_b", st.dims["g_b"], y.device) if "g_b" in streams else None
    ga_m = None
    if "g_a" in streams and not use_input_hook:
        ga_m = col._moments(st, "g_a", st.dims["g_a"], y.device)
    if gb_m is not None or ga_m is not None:
        hook_once(y, _output_grad_hook(col, st, module, gb_m, ga_m, idx, mask, terms))


def _input_grad_hook(col, m: Moments, ad, module, idx, mask, terms):
    """Tensor hook on the layer's input: its gradient rows are g_a."""
    def hook(g):
        if not col._running:
            return None
        with torch.no_grad():
            gr = ad.input_rows(module, g.detach())
            if idx is not None:
                gr = gr[idx]
            scale = col._grad_scale(terms)
            if scale is not None:
                gr = gr * scale
            col._stager.feed(m, gr, mask)
        return None
    return hook


def _output_grad_hook(col, st: LayerStats, module, gb_m, ga_m, idx, mask, terms):
    """Tensor hook on the layer's output: its gradient rows are g_b, and ``g_b @ W`` is g_a
    where ``ga_m`` is given."""
    ad = st.adapter

    def hook(g):
        if not col._running:
            return None
        with torch.no_grad():
            gr, _ = ad.output_rows(module, g.detach())
            if idx is not None:
                gr = gr[idx]
            scale = col._grad_scale(terms)
            if scale is not None:
                gr = gr * scale
            if gb_m is not None:
                col._stager.feed(gb_m, gr, mask)
            if ga_m is not None:
                col._stager.feed(ga_m, ad.g_a_from_g_b(module, gr, st.bias_col), mask)
        return None
    return hook
