"""Which layers a collector measures, and what their states will cost.

Owns module discovery and selection (``modules=``: None, names, a regex or a predicate), the
per-head set-up (``heads=`` entries and every selected ``nn.MultiheadAttention``), the
``(stream -> D)`` dims of each layer, and the memory plan computed from module shapes alone.
Nothing here registers a hook or creates a Moments.
"""
from __future__ import annotations

import inspect
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .adapters import Adapter, adapter_for, head_dim_of
from .layer import HeadGroup, LayerStats

__all__ = ["select_modules", "layer_dims", "Layers", "build_layers", "memory_plan"]


def select_modules(model: nn.Module, modules) -> List[Tuple[str, nn.Module]]:
    """``[(name, module)]`` of the supported modules that ``modules`` picks (see
    :class:`~crh_kernels.collect.Collector`): None picks all; an iterable of names must name
    supported modules only; a regex or a predicate picks among the supported ones (one that
    picks none is refused by :func:`build_layers`, unless ``heads=`` names layers)."""
    named = [(n, m) for n, m in model.named_modules() if n != "" or m is model]
    supported = _supported
    if modules is None:
        return [(n, m) for n, m in named if supported(m)]
    if isinstance(modules, (str, re.Pattern)):
        pat = re.compile(modules) if isinstance(modules, str) else modules
        return [(n, m) for n, m in named if supported(m) and pat.search(n)]
    if callable(modules):
        try:
            nparams = len(inspect.signature(modules).parameters)
        except (TypeError, ValueError):
            nparams = 2
        call = (lambda n, m: modules(n, m)) if nparams >= 2 else (lambda n, m: modules(m))
        return [(n, m) for n, m in named if supported(m) and call(n, m)]
    if isinstance(modules, Iterable):
        table = dict(named)
        out = []
        for n in modules:
            if not isinstance(n, str):
                raise TypeError(f"modules must hold module names (str), got {type(n).__name__}")
            if n not in table:
                raise KeyError(f"no module named {n!r} in the model")
            m = table[n]
            if not supported(m):
                raise TypeError(f"module {n!r}: {adapter_for(m)[1]}")
            out.append((n, m))
        return out
    raise TypeError("modules must be None, a regex (str or re.Pattern), a predicate or an "
                    f"iterable of module names; got {type(modules).__name__}")


def _supported(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or adapter_for(m)[0] is not None


def _no_match(model: nn.Module, modules) -> ValueError:
    """The error for a regex or predicate that picks no supported module: what it was, what it
    matched instead (a regex naming only unsupported modules) and a few names it could pick."""
    named = [(n, m) for n, m in model.named_modules() if n != "" or m is model]
    names = [n or "(the model itself)" for n, m in named if _supported(m)]
    if isinstance(modules, (str, re.Pattern)):
        pat = re.compile(modules) if isinstance(modules, str) else modules
        what = f"modules={pat.pattern!r} (re.search on module names)"
        others = [(n, type(m).__name__) for n, m in named if not _supported(m) and pat.search(n)]
    else:
        what = f"the modules predicate {getattr(modules, '__name__', type(modules).__name__)}"
        others = []
    msg = f"{what} matched no module the collector can measure"
    if others:
        msg += ("; it matches only unsupported ones (" + ", ".join(f"{n!r}: {t}" for n, t in others[:3])
                + (", …" if len(others) > 3 else "") + ")")
    if names:
        shown = ", ".join(repr(n) for n in names[:6])
        msg += (f"; the model's supported modules are {shown}"
                + (f" … ({len(names)} in all)" if len(names) > 6 else ""))
    else:
        msg += ("; the model has no supported module (nn.Linear, nn.Conv2d, HF Conv1D, "
                "nn.MultiheadAttention)")
    return ValueError(msg)


def layer_dims(adapter: Adapter, module: nn.Module, include_bias: bool) -> Tuple[Dict[str, int], bool]:
    """``({stream: D}, bias column?)`` of a layer with a weight matrix."""
    d_in, d_out = adapter.dims(module)
    bias_col = include_bias and isinstance(getattr(module, "bias", None), torch.Tensor)
    d_a = d_in + (1 if bias_col else 0)
    return {"h_a": d_a, "g_a": d_a, "h_b": d_out, "g_b": d_out}, bias_col


class Layers:
    """The measured layers of one collector.

    Attributes:
        all: name -> LayerStats, every layer (weight layers and heads) in selection order.
        weight_layers: module name -> LayerStats of the layers with a weight matrix W
            (Linear, Conv2d, HF Conv1D): those measured by :mod:`.hooks`.
        groups: module name -> :class:`HeadGroup`: the per-head layers of :mod:`.attention`.
    """

    def __init__(self):
        self.all: Dict[str, LayerStats] = {}
        self.weight_layers: Dict[str, LayerStats] = {}
        self.groups: Dict[str, HeadGroup] = {}

    def add_heads(self, name: str, module: nn.Module, n_heads: int, mha: bool,
                  streams: Sequence[str]) -> None:
        """Per-head layers ``"<name>.head<i>"`` (h_b, g_b only) of ``module``'s output."""
        grp = HeadGroup(name, module, n_heads, mha)
        d = head_dim_of(module)
        if d is not None and d % n_heads:
            raise ValueError(f"heads: {name!r} has {d} output features, not divisible by "
                             f"{n_heads} heads")
        hd = None if d is None else d // n_heads
        head_streams = [s for s in streams if s in ("h_b", "g_b")]
        for i in range(n_heads):
            st = LayerStats(f"{name}.head{i}", module, "head", None, head_streams,
                            {} if hd is None else {"h_b": hd, "g_b": hd}, False,
                            parent=name, head=i)
            grp.layers.append(st)
            self.all[st.name] = st
        self.groups[name] = grp


def build_layers(model: nn.Module, modules, streams: Sequence[str], heads: Dict[str, int],
                 include_bias: bool) -> Layers:
    """The layers of a collector with these arguments (``heads`` validated here). A regex or
    predicate ``modules`` that picks no supported module raises ``ValueError`` naming a few
    modules it could pick (unless ``heads`` supplies the layers): a collector measuring nothing
    is never what was meant."""
    table = dict(model.named_modules())
    for name, n_heads in heads.items():
        if name not in table:
            raise KeyError(f"heads: no module named {name!r} in the model")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"heads[{name!r}] must be a positive int, got {n_heads!r}")
    out = Layers()
    chosen = select_modules(model, modules)
    if not chosen and not heads and modules is not None and (
            isinstance(modules, (str, re.Pattern)) or callable(modules)):
        raise _no_match(model, modules)
    for name, module in chosen:
        if isinstance(module, nn.MultiheadAttention):
            out.add_heads(name, module, int(module.num_heads), True, streams)
            continue
        adapter, _ = adapter_for(module)
        dims, bias_col = layer_dims(adapter, module, include_bias)
        st = LayerStats(name, module, adapter.kind, adapter, streams, dims, bias_col)
        out.all[name] = st
        out.weight_layers[name] = st
    for name, n_heads in heads.items():
        module = table[name]
        if isinstance(module, nn.MultiheadAttention):
            if name not in out.groups:
                out.add_heads(name, module, int(module.num_heads), True, streams)
            continue
        out.add_heads(name, module, n_heads, False, streams)
    return out


def memory_plan(layers: Dict[str, LayerStats], state_dtype: torch.dtype, blocks: int = 1
                ) -> List[Tuple[str, str, Optional[tuple], int]]:
    """``[(layer name, stream, state shape, bytes)]`` of a ``(D,)`` mean plus a ``(D, D)``
    scatter per stream (the raw streams too, after a layer's own), times ``blocks`` (the
    sub-states of ``Collector(blocks=K)``); a stream whose D is not known yet has shape None
    and 0 bytes."""
    item = torch.empty((), dtype=state_dtype).element_size()
    plan = []
    for name, st in layers.items():
        for s, d in [(s, st.dims.get(s)) for s in st.streams] + list(st.raw_dims.items()):
            if d is None:
                plan.append((name, s, None, 0))
            else:
                plan.append((name, s, (d, d), blocks * item * (d + d * d)))
    return plan
