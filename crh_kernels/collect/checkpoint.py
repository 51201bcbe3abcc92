"""Checkpoints of a collector: the ``state_dict`` format and its restore.

Owns the format ``"crh_kernels.Collector/1"``: every Moments once (a Moments shared by several
layers is stored under its first layer and stream, the others hold ``{"alias": [layer,
stream]}``), each layer's shared-input names, dims and counters, the step count, the state of the
``max_rows`` generator and the configuration; and the checks made on restore (format, the
configuration that changes the meaning of the states, layer names, dims). The
:class:`~crh_kernels.collect.Collector` facade flushes or drops staged rows around these calls.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..moments import Moments
from .layer import STATE_ATTR, STREAMS, LayerStats, module_device

__all__ = ["FORMAT", "state_dict", "load_state_dict"]

FORMAT = "crh_kernels.Collector/1"


def state_dict(layers: Dict[str, LayerStats], steps: int, rng_state: torch.Tensor,
               config: dict) -> dict:
    """The checkpoint of ``layers`` (every gathered row already in its state)."""
    out = {}
    owner_of: Dict[int, Tuple[str, str]] = {}
    for name, st in layers.items():
        entry = {}
        for s in STREAMS:
            m = getattr(st, STATE_ATTR[s])
            if m is None:
                entry[s] = None
            elif id(m) in owner_of:
                entry[s] = {"alias": list(owner_of[id(m)])}
            else:
                owner_of[id(m)] = (name, s)
                entry[s] = m.state_dict()
        entry["shared"] = dict(st.shared)
        entry["dims"] = dict(st.dims)
        entry["counters"] = [st.forward_calls, st.grad_calls, st.forward_only_calls,
                             st.unmasked_calls]
        out[name] = entry
    return {"format": FORMAT, "steps": steps, "rng": rng_state, "config": dict(config),
            "layers": out}


def load_state_dict(layers: Dict[str, LayerStats], sd: dict, strict: bool, *, normalize: bool,
                    include_bias: bool, backend: Optional[str]) -> Tuple[int, torch.Tensor]:
    """Restore the states, aliases, dims and counters of ``sd`` into ``layers`` (Moments on each
    module's device, with ``backend``); returns ``(steps, rng state)`` for the facade to set.
    ``strict``: the layer names must be the same on both sides."""
    if sd.get("format") != FORMAT:
        raise ValueError(f"not a Collector state dict (format {sd.get('format')!r})")
    cfg = sd["config"]
    for k, mine in (("normalize", normalize), ("include_bias", include_bias)):
        if cfg[k] != mine:
            raise ValueError(f"state dict has {k}={cfg[k]}, this collector {mine}")
    names, have = set(sd["layers"]), set(layers)
    if strict and names != have:
        raise KeyError(f"layers differ: missing here {sorted(names - have)[:5]}, missing in the "
                       f"state dict {sorted(have - names)[:5]}")
    loaded: Dict[Tuple[str, str], Moments] = {}
    pending = []
    for name, entry in sd["layers"].items():
        st = layers.get(name)
        if st is None:
            continue
        dev = module_device(st.module)
        for s in STREAMS:
            e = entry.get(s)
            if e is None:
                setattr(st, STATE_ATTR[s], None)
            elif "alias" in e:
                pending.append((st, s, tuple(e["alias"])))
            else:
                want = st.dims.get(s)
                if want is not None and int(e["dim"]) != want:
                    raise ValueError(f"{name}.{s}: state dict dim {e['dim']}, layer has {want}")
                m = Moments.from_state_dict(e, device=dev, backend=backend)
                setattr(st, STATE_ATTR[s], m)
                loaded[(name, s)] = m
        st.shared = dict(entry.get("shared", {}))
        if not st.dims and entry.get("dims"):
            st.dims = dict(entry["dims"])
        c = entry.get("counters")
        if c:
            st.forward_calls, st.grad_calls, st.forward_only_calls, st.unmasked_calls = c
    for st, s, (oname, ostream) in pending:
        m = loaded.get((oname, ostream))
        if m is None:
            raise KeyError(f"{st.name}.{s} aliases {oname}.{ostream}, which the state dict lacks")
        setattr(st, STATE_ATTR[s], m)
    return int(sd["steps"]), sd["rng"]
