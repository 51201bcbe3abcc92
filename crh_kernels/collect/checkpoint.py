"""Checkpoints of a collector: the ``state_dict`` format and its restore.

Owns the format ``"crh_kernels.Collector/1"``: every Moments once (a Moments shared by several
layers is stored under its first layer and stream, the others hold ``{"alias": [layer,
stream]}``), each layer's shared-input names, dims and counters, the step count, the state of the
``max_rows`` generator and the configuration; with ``raw_moments``, each layer's entry also has
``"raw": {"h_a_raw": state or None, "g_b_raw": state or None, "weight0": W̃ or None}`` (the raw
streams are never shared). With sub-states (``Collector(blocks=K)``, ``config["blocks"] =
{"k": K, "by": "step" | "row"}``; None or absent without) every stored state is
``{"dim": D, "blocks": [K Moments state dicts]}``, block i first to last. A state dict loads
only into a collector with the same ``blocks`` configuration (one from before the option, which
has none, loads into a collector without blocks). The restore comes in two halves:

* :func:`plan_restore` checks everything (types, the configuration that changes the meaning of
  the states, layer names, streams, dims, aliases, counters, the generator state, and every
  Moments state through :meth:`Moments.from_state_dict`, which checks shapes before it
  allocates) and builds every new Moments, changing nothing;
* :func:`apply` then sets the new values on the layers, and :func:`snapshot` /
  :func:`restore` let the :class:`~crh_kernels.collect.Collector` facade put the old ones back
  if anything (a KeyboardInterrupt included) interrupts it: a restore is all or nothing.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import torch

from ..moments import Moments
from .blocks import Block, BlockClock, BlockedMoments
from .layer import RAW_ATTR, RAW_STREAMS, STATE_ATTR, STREAMS, LayerStats, module_device

__all__ = ["FORMAT", "state_dict", "Plan", "plan_restore", "apply", "snapshot", "restore"]

FORMAT = "crh_kernels.Collector/1"

# what a restore replaces on a LayerStats (snapshot/restore/apply work on exactly these)
_ATTRS = ("H_a", "H_b", "G_a", "G_b", "dims", "shared", "forward_calls", "grad_calls",
          "forward_only_calls", "unmasked_calls", "calls_without_grad", "_without_grad",
          "H_a_raw", "G_b_raw", "raw_weight0")
_COUNTERS = ("forward_calls", "grad_calls", "forward_only_calls", "unmasked_calls",
             "calls_without_grad")
_SHAREABLE = ("h_a", "g_a")    # the streams the shared-input dedup shares


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
                entry[s] = _stored(m)
        if st.raw:
            raw = {s: (None if m is None else _stored(m)) for s, m in st.raw_moments().items()}
            raw["weight0"] = None if st.raw_weight0 is None else st.raw_weight0.detach().cpu().clone()
            entry["raw"] = raw
        entry["shared"] = dict(st.shared)
        entry["dims"] = dict(st.dims)
        entry["counters"] = st.counters()
        out[name] = entry
    return {"format": FORMAT, "steps": steps, "rng": rng_state, "config": dict(config),
            "layers": out}


def _stored(m: Moments) -> dict:
    """A state as stored: its state dict, or ``{"dim", "blocks"}`` for a BlockedMoments."""
    if isinstance(m, BlockedMoments):
        return {"dim": m.dim, "blocks": [b.state_dict() for b in m.blocks]}
    return m.state_dict()


def _check_blocks_config(cfg: Mapping, clock: Optional[BlockClock]) -> None:
    """The state dict's ``config["blocks"]`` must be this collector's."""
    theirs = cfg.get("blocks")        # state dicts from before the option: no blocks
    mine = None if clock is None else clock.config()
    if theirs is not None:
        theirs = _mapping(theirs, "config['blocks']")
        if set(theirs) != {"k", "by"}:
            raise ValueError(f"config['blocks'] must be {{'k': K, 'by': 'step'|'row'}}, got "
                             f"{dict(theirs)!r}")
        k, by = theirs["k"], theirs["by"]
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 2:
            raise ValueError(f"config['blocks']['k'] must be an int >= 2, got {k!r}")
        if by not in ("step", "row"):
            raise ValueError(f"config['blocks']['by'] must be 'step' or 'row', got {by!r}")
        theirs = {"k": int(k), "by": by}
    if theirs != mine:
        raise ValueError(f"state dict has blocks={theirs}, this collector {mine} (sub-states "
                         f"cannot be made up or dropped on a restore)")


def _load_state(e: Mapping, what: str, device, backend: Optional[str],
                clock: Optional[BlockClock]) -> Moments:
    """A stored state, checked and built (a BlockedMoments when the collector keeps blocks);
    errors name ``what``."""
    try:
        if clock is None:
            if "blocks" in e:
                raise ValueError("holds sub-states (blocks), this collector keeps none")
            return Moments.from_state_dict(e, device=device, backend=backend)
        bl = e.get("blocks")
        if not isinstance(bl, (list, tuple)):
            raise ValueError(f"must hold 'blocks', a list of {clock.k} states (this collector "
                             f"has blocks={clock.k}), got {type(bl).__name__}")
        if len(bl) != clock.k:
            raise ValueError(f"holds {len(bl)} blocks, this collector {clock.k}")
        blocks = []
        for i, b in enumerate(bl):
            b = _mapping(b, f"['blocks'][{i}]")
            if b.get("dim") != e.get("dim"):
                raise ValueError(f"['blocks'][{i}]: dim {b.get('dim')!r}, the state's "
                                 f"{e.get('dim')!r}")
            try:
                blocks.append(Block.from_state_dict(b, device=device, backend=backend))
            except (TypeError, ValueError, KeyError) as err:
                msg = err.args[0] if err.args else str(err)
                raise type(err)(f"['blocks'][{i}]: {msg}") from None
        if len({(b.normalize, b.dtype) for b in blocks}) != 1:
            raise ValueError("its blocks differ in normalize or dtype")
        return BlockedMoments(blocks, clock, device)
    except (TypeError, ValueError, KeyError) as err:
        msg = err.args[0] if err.args else str(err)
        sep = "" if msg.startswith("[") else ": "
        raise type(err)(f"{what}{sep}{msg}") from None


# ------------------------------------------------------------------------- checks
def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"{what} must be a non-negative int, got {v!r}")
    return int(v)


def _mapping(v, what: str) -> Mapping:
    if not isinstance(v, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(v).__name__}")
    return v


def _check_rng(rng) -> torch.Tensor:
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise TypeError(f"rng must be a torch.Generator state (a 1-D uint8 tensor), got "
                        f"{getattr(rng, 'dtype', type(rng).__name__)}")
    try:
        torch.Generator().set_state(rng.detach().cpu())
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"rng is not a valid torch.Generator state: {e}") from None
    return rng.detach().cpu().clone()


class Plan:
    """A checked restore: the new step count and generator state, and per layer the values of
    every attribute a restore replaces (``{LayerStats: {attr: value}}``)."""

    def __init__(self, steps: int, rng: torch.Tensor, layers: Dict[LayerStats, dict]):
        self.steps = steps
        self.rng = rng
        self.layers = layers


def plan_restore(layers: Dict[str, LayerStats], sd, strict: bool, *, normalize: bool,
                 include_bias: bool, backend: Optional[str], raw_moments: bool = False,
                 clock: Optional[BlockClock] = None) -> Plan:
    """Check ``sd`` against ``layers`` and build every new state (Moments on each module's
    device, with ``backend``; BlockedMoments on ``clock`` when the collector keeps blocks);
    nothing is changed. ``strict``: the layer names must be the
    same on both sides (else layers missing on either side are left out).
    Raises ``TypeError``/``ValueError``/``KeyError`` naming the offending field."""
    sd = _mapping(sd, "state dict")
    if sd.get("format") != FORMAT:
        raise ValueError(f"not a Collector state dict (format {sd.get('format')!r}, "
                         f"expected {FORMAT!r})")
    for k in ("steps", "rng", "config", "layers"):
        if k not in sd:
            raise KeyError(f"state dict lacks {k!r}")
    steps = _int(sd["steps"], "steps")
    rng = _check_rng(sd["rng"])
    cfg = _mapping(sd["config"], "config")
    for k, mine in (("normalize", normalize), ("include_bias", include_bias)):
        if k not in cfg:
            raise KeyError(f"config lacks {k!r}")
        if not isinstance(cfg[k], bool):
            raise TypeError(f"config[{k!r}] must be a bool, got {cfg[k]!r}")
        if cfg[k] != mine:
            raise ValueError(f"state dict has {k}={cfg[k]}, this collector {mine}")
    raw_cfg = cfg.get("raw_moments", False)     # state dicts from before the option: False
    if not isinstance(raw_cfg, bool):
        raise TypeError(f"config['raw_moments'] must be a bool, got {raw_cfg!r}")
    if raw_cfg != raw_moments:
        raise ValueError(f"state dict has raw_moments={raw_cfg}, this collector {raw_moments} "
                         f"(the raw states would not count the same rows as the others)")
    _check_blocks_config(cfg, clock)
    entries = _mapping(sd["layers"], "layers")
    for name in entries:
        if not isinstance(name, str):
            raise TypeError(f"layers: names must be str, got {name!r}")
    names, have = set(entries), set(layers)
    if strict and names != have:
        raise KeyError(f"layers differ: missing here {sorted(names - have)[:5]}, missing in the "
                       f"state dict {sorted(have - names)[:5]}")

    # pass 1: every field of every entry this collector loads
    raw: Dict[Tuple[str, str], Mapping] = {}     # (layer, stream) -> a stored state
    wanted: List[Tuple[LayerStats, str, object]] = []
    new_vals: Dict[LayerStats, dict] = {}
    for name, entry in entries.items():
        what = f"layers[{name!r}]"
        entry = _mapping(entry, what)
        for s in STREAMS:
            e = entry.get(s)
            if e is None:
                continue
            e = _mapping(e, f"{what}[{s!r}]")
            if "alias" not in e:
                raw[(name, s)] = e
        st = layers.get(name)
        if st is None:
            continue
        dims = entry.get("dims")
        dims = {} if dims is None else dict(_mapping(dims, f"{what}['dims']"))
        for s, d in dims.items():
            if s not in STREAMS:
                raise ValueError(f"{what}['dims']: unknown stream {s!r}")
            d = _int(d, f"{what}['dims'][{s!r}]")
            if d == 0 or (st.dims.get(s) is not None and st.dims[s] != d):
                raise ValueError(f"{what}['dims'][{s!r}] is {d}, layer has {st.dims.get(s)}")
        new_dims = dict(st.dims) if st.dims else {s: int(d) for s, d in dims.items()}
        shared = entry.get("shared")
        if shared is not None:
            for k, v in _mapping(shared, f"{what}['shared']").items():
                if k not in STREAMS or not isinstance(v, str):
                    raise ValueError(f"{what}['shared'] must map stream names to layer names, "
                                     f"got {k!r}: {v!r}")
        vals = {}
        c = entry.get("counters")
        if c is not None:
            if not isinstance(c, (list, tuple)) or len(c) not in (4, 6):
                raise ValueError(f"{what}['counters'] must be a list of 4 or 6 counts, got {c!r}")
            c = [_int(v, f"{what}['counters'][{i}]") for i, v in enumerate(c)]
            vals.update(zip(_COUNTERS, c))
            if len(c) == 6:
                vals["_without_grad"] = [c[5]]
            else:
                vals["calls_without_grad"], vals["_without_grad"] = 0, [0]
        for s in STREAMS:
            e = entry.get(s)
            if e is not None and s not in st.streams:
                raise ValueError(f"{what}[{s!r}]: this collector does not collect stream {s!r} "
                                 f"of this layer (its streams: {list(st.streams)})")
            if e is not None and "alias" in e:
                a = e["alias"]
                if (not isinstance(a, (list, tuple)) or len(a) != 2
                        or not all(isinstance(v, str) for v in a)):
                    raise ValueError(f"{what}[{s!r}]['alias'] must be [layer name, stream], "
                                     f"got {a!r}")
                if s not in _SHAREABLE or a[1] != s:
                    raise ValueError(f"{what}[{s!r}]: only h_a and g_a are shared, each with the "
                                     f"same stream of another layer; got an alias to {list(a)}")
                if (a[0], a[1]) not in raw:
                    raise KeyError(f"{what}[{s!r}] aliases {a[0]}.{a[1]}, which the state dict "
                                   f"does not store")
                e = ("alias", (a[0], a[1]))
            wanted.append((st, s, e))
        vals["dims"] = new_dims
        vals.update(_plan_raw(st, entry, what, backend, clock))
        new_vals[st] = vals

    # pass 2: build every Moments (each stored state once; aliases share it)
    built: Dict[Tuple[str, str], Moments] = {}

    def build(key, st, want):
        m = built.get(key)
        if m is None:
            d = raw[key].get("dim")
            if want is not None and (isinstance(d, bool) or not isinstance(d, numbers.Integral)
                                     or d != want):    # before anything is allocated
                raise ValueError(f"layers[{key[0]!r}][{key[1]!r}]: state dim {d!r}, layer "
                                 f"{st.name!r} has {want}")
            m = _load_state(raw[key], f"layers[{key[0]!r}][{key[1]!r}]",
                            module_device(st.module), backend, clock)
            if m.normalize != normalize:
                raise ValueError(f"layers[{key[0]!r}][{key[1]!r}]: normalize={m.normalize}, "
                                 f"this collector {normalize}")
            built[key] = m
        return m

    for st, s, e in wanted:
        vals = new_vals[st]
        key = e[1] if isinstance(e, tuple) else (st.name, s)
        want = vals["dims"].get(s)
        m = None if e is None else build(key, st, want)
        if m is not None and want is not None and m.dim != want:
            raise ValueError(f"layers[{st.name!r}][{s!r}]: state dim {m.dim}, layer has {want}")
        vals[STATE_ATTR[s]] = m
    for st, vals in new_vals.items():
        for s in STREAMS:
            vals.setdefault(STATE_ATTR[s], None)
        vals["shared"] = {}                      # named again from the aliases (SharedInputs)
    return Plan(steps, rng, new_vals)


def _plan_raw(st: LayerStats, entry: Mapping, what: str, backend: Optional[str],
              clock: Optional[BlockClock] = None) -> dict:
    """The raw states of one layer's entry, checked and built (nothing changed): a layer with
    raw streams needs ``entry["raw"]``, one without must not have it."""
    e = entry.get("raw")
    if not st.raw:
        if e is not None:
            raise ValueError(f"{what}['raw']: this layer keeps no raw streams (no weight, or "
                             f"the collector has raw_moments=False)")
        return {}
    if e is None:
        raise KeyError(f"{what} lacks 'raw' (this collector has raw_moments=True)")
    e = _mapping(e, f"{what}['raw']")
    for k in e:
        if k not in RAW_STREAMS and k != "weight0":
            raise ValueError(f"{what}['raw']: unknown key {k!r}")
    vals = {}
    dev = module_device(st.module)
    for s in RAW_STREAMS:
        r = e.get(s)
        m = None
        if r is not None:
            r = _mapping(r, f"{what}['raw'][{s!r}]")
            want, d = st.raw_dims[s], r.get("dim")
            if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d != want:
                raise ValueError(f"{what}['raw'][{s!r}]: state dim {d!r}, layer has {want}")
            m = _load_state(r, f"{what}['raw'][{s!r}]", dev, backend, clock)
            if m.normalize:
                raise ValueError(f"{what}['raw'][{s!r}]: normalize=True, raw states are not "
                                 f"normalized")
        vals[RAW_ATTR[s]] = m
    w0 = e.get("weight0")
    if w0 is not None:
        shape = (st.raw_dims["g_b_raw"], st.raw_dims["h_a_raw"])
        if not isinstance(w0, torch.Tensor) or not w0.is_floating_point():
            raise TypeError(f"{what}['raw']['weight0'] must be a float tensor, got "
                            f"{getattr(w0, 'dtype', type(w0).__name__)}")
        if tuple(w0.shape) != shape:
            raise ValueError(f"{what}['raw']['weight0'] has shape {tuple(w0.shape)}, layer's W̃ "
                             f"is {shape}")
        if not bool(torch.isfinite(w0).all()):
            raise ValueError(f"{what}['raw']['weight0'] has non-finite entries")
        w0 = w0.detach().to(dev if dev is not None else "cpu").clone()
    vals["raw_weight0"] = w0
    return vals


# ------------------------------------------------------------------------- commit
def snapshot(layers) -> List[Tuple[LayerStats, tuple]]:
    """What a restore may change on ``layers``, for :func:`restore`."""
    return [(st, tuple(getattr(st, a) for a in _ATTRS)) for st in layers]


def restore(snap) -> None:
    """Put back the values of :func:`snapshot`."""
    for st, values in snap:
        for a, v in zip(_ATTRS, values):
            setattr(st, a, v)


def apply(plan: Plan) -> None:
    """Set the new values of ``plan`` on its layers (the facade keeps a snapshot)."""
    for st, vals in plan.layers.items():
        for a, v in vals.items():
            setattr(st, a, v)
