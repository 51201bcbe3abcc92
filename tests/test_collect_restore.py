"""Collector.load_state_dict is all or nothing (issue 12, item 7): a bad checkpoint raises a
one-line error naming the field and leaves the collector exactly as it was (states, counters,
steps, generator, shared Moments, rows still staged); and an exception raised at any line of a
restore (fault injection with sys.settrace, one run per line) leaves either the old collector
or the new one. Mutation check: the same harness catches a restore without its rollback."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import crh_kernels
from crh_kernels.collect import Collector, checkpoint

from ._collect_ref import batches, mlp

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

PKG = os.path.dirname(crh_kernels.__file__) + os.sep
COUNTERS = ("forward_calls", "grad_calls", "forward_only_calls", "unmasked_calls",
            "calls_without_grad", "rows_without_grad")


# ------------------------------------------------------------------ fingerprints
def _moments_fp(m):
    if m is None:
        return None
    return (m.dim, m.n, m.n_skipped, m.dtype, m.mean.clone(), m.scatter.clone())


def fingerprint(col):
    """Everything a restore may change, read without flushing anything: states (with which
    layers share each one), dims, shared names, counters, steps, generator, staged rows."""
    layers = col._layers.all
    where = {}
    out = {"steps": col.steps, "rng": col._gen.get_state().clone(), "collecting": col._collecting}
    for name, st in layers.items():
        entry = {"dims": dict(st.dims), "shared": dict(st.shared),
                 "counters": [getattr(st, a, None) for a in COUNTERS]}
        for s, m in st.moments().items():
            if m is not None and id(m) in where:
                entry[s] = ("alias", where[id(m)])
            else:
                if m is not None:
                    where[id(m)] = (name, s)
                entry[s] = _moments_fp(m)
        out[name] = entry
    staged = {}
    for buf in col._stager._bufs.values():
        if buf.filled:
            staged[where.get(id(buf.moments), "?")] = (buf.filled, buf.x[:buf.filled].clone())
    out["staged"] = staged
    return out


def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------ collectors
def _trained_mlp(steps=2, stage_rows=4096, seed=1):
    model = mlp()
    col = Collector(model, max_rows=40, stage_rows=stage_rows)
    data = batches(steps, b=48, seed=seed)
    col.start()                  # left running: stop() would flush the staged rows
    for x, t in data:
        F.mse_loss(model(x), t).backward()
        col.step()
    return col


class QKV(torch.nn.Module):
    """q, k and v of one tensor (one shared H_a and G_a), v split into two heads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(6, 6) for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def _trained_qkv(steps=2, seed=1):
    model = QKV()
    col = Collector(model, heads={"v": 2})
    g = torch.Generator().manual_seed(seed)
    col.start()
    for _ in range(steps):
        model(torch.randn(7, 6, generator=g, requires_grad=True)).square().mean().backward()
        col.step()
    return col


# ------------------------------------------------------------------ bad checkpoints
def _bad(path, value):
    """A corruption: set sd[path...] = value (value None with a path ending in '-' deletes)."""
    def f(sd):
        d = sd
        for k in path[:-1]:
            d = d[k]
        if value == "<del>":
            del d[path[-1]]
        else:
            d[path[-1]] = value(d[path[-1]]) if callable(value) else value
        return sd
    return f


BAD = {
    "not a dict": (lambda sd: [sd], TypeError, "state dict must be a dict"),
    "format": (_bad(["format"], "other/1"), ValueError, "format"),
    "no rng": (_bad(["rng"], "<del>"), KeyError, "rng"),
    "steps < 0": (_bad(["steps"], -1), ValueError, "steps"),
    "steps float": (_bad(["steps"], 2.5), ValueError, "steps"),
    "rng size": (_bad(["rng"], torch.zeros(7, dtype=torch.uint8)), ValueError, "rng"),
    "rng type": (_bad(["rng"], [1, 2, 3]), TypeError, "rng"),
    "normalize str": (_bad(["config", "normalize"], "False"), TypeError, "normalize"),
    "layers list": (_bad(["layers"], lambda v: list(v.values())), TypeError, "layers"),
    "mean shape": (_bad(["layers", "4", "h_a", "mean"], torch.zeros(3)), ValueError,
                   r"layers\['4'\]\['h_a'\]"),
    "no scatter": (_bad(["layers", "4", "g_b", "scatter_triu"], "<del>"), KeyError,
                   r"layers\['4'\]\['g_b'\]"),
    "state dim": (_bad(["layers", "4", "h_b", "dim"], 6), ValueError, r"layers\['4'\]"),
    "dims": (_bad(["layers", "4", "dims", "h_a"], 17), ValueError, r"layers\['4'\]\['dims'\]"),
    "huge dim": (_bad(["layers", "4", "g_a", "dim"], 10 ** 6), ValueError,
                 r"layers\['4'\]\['g_a'\]: state dim 1000000"),
    # the state checks of Moments.from_state_dict, named by layer and stream
    "n < 0": (_bad(["layers", "4", "h_a", "n"], -100), ValueError, r"layers\['4'\]\['h_a'\]"),
    "n float": (_bad(["layers", "4", "h_a", "n"], 1.7), ValueError, r"layers\['4'\]\['h_a'\]"),
    "nan": (_bad(["layers", "4", "h_b", "mean"], lambda t: t * float("nan")), ValueError,
            r"layers\['4'\]\['h_b'\]"),
    "counters": (_bad(["layers", "4", "counters"], [1, 2]), ValueError, "counters"),
    "counter < 0": (_bad(["layers", "4", "counters"], [1, -2, 0, 0]), ValueError, "counters"),
    "alias h_b": (_bad(["layers", "4", "h_b"], {"alias": ["0", "h_b"]}), ValueError, "h_a and g_a"),
    "alias missing": (_bad(["layers", "4", "h_a"], {"alias": ["nope", "h_a"]}), KeyError, "nope"),
    "entry type": (_bad(["layers", "4", "g_a"], 3.0), TypeError, r"layers\['4'\]\['g_a'\]"),
    "layer names": (_bad(["layers", "9"], {}), KeyError, "layers differ"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_changes_nothing(case):
    """The corruption sits in the last layer (or the generator), so a restore that applied
    layer by layer would have changed layers 0 and 2 (and the step count) before failing."""
    corrupt, err, match = BAD[case]
    sd = corrupt(copy.deepcopy(_trained_mlp(steps=3, seed=7).state_dict()))
    col = _trained_mlp()                       # 2 steps, their rows still staged
    assert col._stager.pending > 0
    before = fingerprint(col)
    with pytest.raises(err, match=match):
        col.load_state_dict(sd)
    assert same(fingerprint(col), before)
    ref = _trained_mlp()                       # nothing was lost: the staged rows go in as usual
    for n, st in col.layers.items():
        for s, m in st.moments().items():
            o = ref.layers[n].moments()[s]
            assert m.n == o.n and torch.equal(m.scatter, o.scatter), (n, s)


def test_restore_refuses_streams_the_collector_does_not_collect():
    sd = _trained_mlp().state_dict()
    col = Collector(mlp(), streams=("h_a", "h_b"))
    with pytest.raises(ValueError, match=r"layers\['0'\]\['g_a'\]: this collector does not collect"):
        col.load_state_dict(sd)


def test_non_strict_restore_keeps_other_layers_and_their_staged_rows():
    sd = _trained_mlp(steps=3, seed=7).state_dict()
    del sd["layers"]["2"]
    col = _trained_mlp()
    keep = fingerprint(col)["2"]
    pending = col._stager.pending
    col.load_state_dict(sd, strict=False)
    assert same(fingerprint(col)["2"], keep) and 0 < col._stager.pending < pending
    ref = _trained_mlp()
    assert torch.equal(col.layers["2"].H_a.scatter, ref.layers["2"].H_a.scatter)
    assert col.layers["0"].H_a.n == 3 * 40


# ------------------------------------------------------------------ fault injection
class Injected(BaseException):
    """Raised by the tracer, like a KeyboardInterrupt: no ``except Exception`` catches it."""


def _load_with_fault(col, sd, k, strict=True):
    """``col.load_state_dict(sd)`` raising Injected at the k-th line executed in crh_kernels
    (k = 0: no fault). Returns the number of lines executed and whether the fault was raised."""
    count = [0]
    fired = [False]

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == k:
                fired[0] = True
                raise Injected(f"line {frame.f_lineno} of {frame.f_code.co_filename}")
        return local

    def glob(frame, event, arg):
        return local if frame.f_code.co_filename.startswith(PKG) else None

    sys.settrace(glob)
    try:
        col.load_state_dict(sd, strict=strict)
    except Injected:
        pass
    finally:
        sys.settrace(None)
    return count[0], fired[0]


def check_atomic(make, sd, strict=True, stride=1):
    """Run the restore once per line it executes, raising there; after each run the collector
    must be the old one or the new one. Returns (lines, runs that were neither)."""
    col = make()
    old = fingerprint(col)
    n_lines, _ = _load_with_fault(col, sd, 0, strict)
    new = fingerprint(col)
    assert not same(old, new)
    bad = []
    for k in range(1, n_lines + 1, stride):
        col = make()
        _, fired = _load_with_fault(col, sd, k, strict)
        fp = fingerprint(col)
        if not (same(fp, old) or same(fp, new)):
            bad.append(k)
        elif fired and same(fp, old):
            col.load_state_dict(sd, strict=strict)      # and a later restore still works
            if not same(fingerprint(col), new):
                bad.append(k)
    return n_lines, bad


@pytest.fixture(scope="module")
def states():
    cache = {}

    def get(which):
        if which not in cache:
            src = _trained_mlp(steps=3, seed=7) if which == "mlp" else _trained_qkv(steps=3, seed=7)
            cache[which] = src.state_dict()
        return cache[which]
    return get


@pytest.mark.parametrize("which", ["mlp", "qkv"])
def test_fault_at_every_line_leaves_old_or_new(which, states):
    sd = states(which)
    make = _trained_mlp if which == "mlp" else _trained_qkv
    if which == "qkv":
        assert sd["layers"]["k"]["h_a"] == {"alias": ["q", "h_a"]} == sd["layers"]["v"]["h_a"]
    n_lines, bad = check_atomic(make, sd)
    assert n_lines > 50
    assert bad == [], f"{len(bad)} of {n_lines} faults left a mixed collector (lines {bad[:10]})"


def test_fault_injection_catches_a_restore_without_rollback(states, monkeypatch):
    """Mutation check: without its rollback the restore is not atomic, and the harness says so."""
    monkeypatch.setattr(checkpoint, "restore", lambda snap: None)
    n_lines, bad = check_atomic(_trained_mlp, states("mlp"))
    assert bad, "the fault injection did not notice a restore that applies layer by layer"


def test_checkpoints_with_four_counters_still_load():
    """Checkpoints written before rows_without_grad existed hold four counters."""
    sd = _trained_mlp(steps=3, seed=7).state_dict()
    for entry in sd["layers"].values():
        entry["counters"] = entry["counters"][:4]
    col = Collector(mlp())
    col.load_state_dict(sd)
    st = col.layers["2"]
    assert st.forward_calls == st.grad_calls == 3
    assert st.calls_without_grad == st.rows_without_grad == 0
