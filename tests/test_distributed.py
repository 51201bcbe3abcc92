"""crh_kernels.distributed: exact merge of Moments across torch.distributed ranks (issue 6).

Real multi-process runs: ``torch.multiprocessing`` spawns 2 and 3 gloo ranks on the CPU, each
with its own rows (uneven counts, a rank with none, a mean 10⁴× the spread). Every rank's
state after the sync is compared with a float64 reference computed here, in the parent,
from all ranks' rows concatenated (plain torch, not Moments). The collectives are counted
inside the workers by wrapping ``torch.distributed.all_reduce``: one per bucket, plus one
agreement check and one for the counts and means.

Failures (issue 12): states in a different order on each rank, a rank that refuses its
arguments, a rank that fails half-way through the call (``timeout=``), and a KeyboardInterrupt
injected at every line of the commit phase; every rank must raise and no state may change.

Process start-up dominates the cost, so each world size is spawned once (a module-scoped
fixture) and runs every scenario; the tests then only read what the ranks wrote.
"""
from __future__ import annotations

import math
import traceback
import warnings
from contextlib import nullcontext
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crh_kernels import Moments
from crh_kernels.distributed import DEFAULT_BUCKET_BYTES, all_reduce_moments, full_weight, sync_moments

pytestmark = pytest.mark.slow  # spawns processes (a few seconds each); still runs in CI

# ------------------------------------------------------------------------ shared data
# (name, dim, normalize, kind); all rows are float64 so that the local states are exact to
# rounding and the comparison isolates the merge across ranks.
SPECS = [
    ("gauss", 5, True, "gauss"),
    ("relu", 17, True, "relu"),
    ("hostile", 40, False, "hostile"),  # mean ≈ 10⁴, spread 1: Σx̂x̂ᵀ − nμμᵀ would cancel
    ("zeros", 3, True, "zeros"),        # every 4th row has norm 0: skipped and counted
    ("never", 8, True, "never"),        # no rows on any rank
]
ROWS = {2: [1, 263], 3: [150, 0, 41]}   # rows per rank: uneven, one rank with a single row
SMALL_BUCKET = 1024                     # bytes: 128 float64 per bucket, so matrices span buckets
TOL64 = 1e-11                           # float64 wire: rounding only
TOL32 = 2e-6                            # float32 wire


def _data(world: int, rank: int, i: int) -> torch.Tensor:
    _, dim, _, kind = SPECS[i]
    n = 0 if kind == "never" else ROWS[world][rank]
    g = torch.Generator().manual_seed(1000 * world + 10 * rank + i)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if kind == "gauss":
        x += 0.7 * rank  # ranks disagree on the mean: the shift term matters
    elif kind == "relu":
        x = (x + 0.3 * rank).clamp_min(0)
    elif kind == "hostile":
        x = 1e4 * (1 + torch.arange(dim, dtype=torch.float64) / dim) + x * (1 + rank)
    elif kind == "zeros":
        x[::4] = 0
    return x


def _reference(rows, normalize: bool):
    """(n, n_skipped, μ, C) over all rows in float64, written out independently of Moments."""
    x = torch.cat(rows).double()
    sq = x.square().sum(dim=1)
    ok = torch.isfinite(sq) & (sq > 0 if normalize else torch.ones_like(sq, dtype=torch.bool))
    skipped = int((~ok).sum())
    x = x[ok]
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    if x.shape[0] == 0:
        return 0, skipped, None, None
    mu = x.mean(dim=0)
    y = x - mu
    return x.shape[0], skipped, mu, y.T @ y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _snap(m: Moments) -> dict:
    return {"n": m.n, "n_skipped": m.n_skipped, "dim": m.dim,
            "device": None if m.device is None else str(m.device),
            "mean": m.mean.detach().double().cpu().clone(),
            "scatter": m.scatter.detach().double().cpu().clone()}


def _build(world: int, rank: int):
    """This rank's Moments for SPECS, fed in a few updates (a rank with no rows leaves its
    Moments unallocated: device None)."""
    ms = []
    for i, (_, dim, normalize, _) in enumerate(SPECS):
        m = Moments(dim, normalize=normalize, backend="torch")
        for part in _data(world, rank, i).split(64):
            m.update(part)
        ms.append(m)
    return ms


# ----------------------------------------------------------------------- worker side
_OTHER_COLLECTIVES = ("broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                      "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all",
                      "all_gather_object", "broadcast_object_list", "send", "recv", "barrier")


class _Counter:
    """Wraps torch.distributed's collectives in this process; distributed.py looks them up on
    the module at call time, so every call it makes is seen here."""

    def __init__(self):
        self.calls, self.other = [], []
        orig = dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            op = kwargs.get("op", args[0] if args else dist.ReduceOp.SUM)
            self.calls.append((tensor.numel(), str(tensor.dtype),
                               "max" if op == dist.ReduceOp.MAX else "sum"))
            return orig(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce
        for name in _OTHER_COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self.other.append(name)
            return fn(*args, **kwargs)
        return wrapped

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _init(rank: int, world: int, init_file: str) -> None:
    warnings.simplefilter("ignore")  # zero-norm rows and FSDP chatter, once per rank
    torch.set_num_threads(1)
    # a timeout, so that a bug shows up as an error and not as a hung test session
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))


def _expect(exc, fn):
    try:
        fn()
    except exc as e:
        return str(e)
    return None


def _scenario_main(rank: int, world: int, count: "_Counter") -> dict:
    res = {}
    ms = _build(world, rank)
    res["before"] = [_snap(m) for m in ms]
    all_reduce_moments(ms, bucket_bytes=SMALL_BUCKET)
    res["buckets"] = {"states": [_snap(m) for m in ms], "calls": count.take()}

    ms = _build(world, rank)
    out = sync_moments(ms)  # default bucket_bytes: everything in one bucket
    res["one_bucket"] = {"states": [_snap(m) for m in ms], "calls": count.take(),
                         "returned_same": all(a is b for a, b in zip(out, ms)) and len(out) == len(ms)}

    ms = _build(world, rank)
    all_reduce_moments(ms, bucket_bytes=4096, dtype=torch.float32)
    res["fp32_wire"] = {"states": [_snap(m) for m in ms], "calls": count.take()}

    m = _build(world, rank)[2]
    m.all_reduce()  # the Moments method delegates here
    res["method"] = {"states": [_snap(m)], "calls": count.take()}

    # Disagreeing ranks: every rank raises, no state changes, and the group still works.
    g = torch.Generator().manual_seed(rank)
    a = Moments(4, backend="torch").update(torch.randn(10, 4, generator=g, dtype=torch.float64))
    before = _snap(a)
    other = Moments(4 if rank == 0 else 5, backend="torch")
    msgs = {
        "dims": _expect(RuntimeError, lambda: all_reduce_moments([a, other])),
        "count": _expect(RuntimeError, lambda: all_reduce_moments([a] if rank == 0 else [a, Moments(4)])),
        "bucket": _expect(RuntimeError, lambda: all_reduce_moments(
            [a], bucket_bytes=1024 if rank == 0 else 2048)),
        "normalize": _expect(RuntimeError, lambda: all_reduce_moments(
            [a, Moments(4, normalize=rank == 0)])),
        "wire_dtype": _expect(RuntimeError, lambda: all_reduce_moments(
            [a], dtype=torch.float32 if rank == 0 else torch.float64)),
    }
    res["mismatch"] = {"msgs": msgs, "unchanged": _snap(a), "before": before}
    all_reduce_moments([a])
    res["mismatch"]["after"] = _snap(a)
    count.take()
    res["other_collectives"] = list(count.other)
    return res


def _scenario_subgroup(rank: int, world: int, count: "_Counter") -> dict:
    """group=: a subgroup of ranks {0, 2} (rank 1 is not a member and is told so), and groups
    of one rank (nothing to do)."""
    res = {}
    count.take()
    sub = dist.new_group([0, 2])
    singles = [dist.new_group([r]) for r in range(world)]
    m = _build(world, rank)[0]
    if rank in (0, 2):
        all_reduce_moments([m], group=sub)
        res["state"] = _snap(m)
    else:
        res["outsider"] = _expect(ValueError, lambda: all_reduce_moments([m], group=sub))
    m = _build(world, rank)[1]
    res["single_before"] = _snap(m)
    all_reduce_moments([m], group=singles[rank])
    res["single_after"] = _snap(m)
    res["calls"] = count.take()
    return res


class _Two(torch.nn.Module):
    """Two Linear(6, 6) layers registered in the given order: the Collector lists its layers
    (and so its states) in registration order, whatever order forward() uses them in."""

    def __init__(self, order):
        super().__init__()
        for name in order:
            setattr(self, name, torch.nn.Linear(6, 6))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _collector_states(col):
    return {f"{name}.{s}": _snap(getattr(st, s)) for name, st in col.layers.items()
            for s in ("H_a", "H_b", "G_a", "G_b") if getattr(st, s, None) is not None}


def _trained_collector(order, rank):
    from crh_kernels import Collector
    torch.manual_seed(0)
    net = _Two(order)
    col = Collector(net, state_dtype=torch.float64)
    g = torch.Generator().manual_seed(300 + rank)
    with col:
        for _ in range(2):
            net(torch.randn(7 + rank, 6, generator=g)).square().mean().backward()
            col.step()
    return col


def _scenario_order(rank: int, world: int, count: "_Counter") -> dict:
    """States of equal dim in a different order on each rank (issue 12, item 11): named, they
    must raise on every rank and change nothing; a rank that refuses its own arguments must
    make the others raise at once (not after the group's timeout)."""
    res = {}
    g = torch.Generator().manual_seed(rank)
    a = Moments(4, backend="torch").update(torch.randn(10, 4, generator=g, dtype=torch.float64))
    b = Moments(4, backend="torch").update(3 + torch.randn(20, 4, generator=g, dtype=torch.float64))
    before = [_snap(a), _snap(b)]
    pairs = [(a, "x"), (b, "y")] if rank == 0 else [(b, "y"), (a, "x")]
    res["names"] = _expect(RuntimeError, lambda: all_reduce_moments(
        [m for m, _ in pairs], names=[nm for _, nm in pairs], timeout=30))
    res["names_unchanged"] = all(
        x["n"] == y["n"] and torch.equal(x["mean"], y["mean"]) and torch.equal(x["scatter"], y["scatter"])
        for x, y in zip([_snap(a), _snap(b)], before))

    # the same through Collector.sync: layers registered as (a, b) on rank 0, (b, a) elsewhere
    col = _trained_collector(("a", "b") if rank == 0 else ("b", "a"), rank)
    res["col_order"] = list(col.layers)
    st_before = _collector_states(col)
    res["col_msg"] = _expect(RuntimeError, lambda: col.sync(timeout=timedelta(seconds=30)))
    st_after = _collector_states(col)
    res["col_unchanged"] = st_before.keys() == st_after.keys() and all(
        st_before[k]["n"] == st_after[k]["n"] and torch.equal(st_before[k]["scatter"], st_after[k]["scatter"])
        and torch.equal(st_before[k]["mean"], st_after[k]["mean"]) for k in st_before)

    # one rank refuses its arguments (the same Moments twice): it raises its own error, the
    # others learn it from the agreement check, at once, with no timeout given
    res["refused"] = _expect((RuntimeError, ValueError),
                             lambda: all_reduce_moments([a, a] if rank == 1 else [a]))

    # the group still works, and the same order (and names) on every rank merges
    col = _trained_collector(("a", "b"), rank)
    n_before = {k: v["n"] for k, v in _collector_states(col).items()}
    col.sync(timeout=30)
    res["col_ok"] = {"before": n_before, "after": {k: v["n"] for k, v in _collector_states(col).items()}}
    res["calls"] = count.take()
    return res


def _scenario_commit(rank: int, world: int, count: "_Counter") -> dict:
    """All or nothing after the collectives: a KeyboardInterrupt raised (by ``sys.settrace``)
    at every line that runs once the last collective is done, the same line count on every
    rank, leaves either every state as it was (the call raised) or every state merged."""
    import inspect
    import sys

    import crh_kernels.distributed as D

    src, first = inspect.getsourcelines(D.all_reduce_moments)
    start = [first + i for i, line in enumerate(src) if "# Phase 3" in line]
    assert len(start) == 1, "the commit phase marker moved: update this test"
    start = start[0]
    code = D.all_reduce_moments.__code__
    pick = (0, 3, 4)  # gauss, zeros (skipped rows), never (no rows anywhere)

    def fresh():
        ms = _build(world, rank)
        return [ms[i] for i in pick]

    old = [_snap(m) for m in fresh()]
    ms = fresh()
    all_reduce_moments(ms)
    new = [_snap(m) for m in ms]

    def same(a, b):
        return all(x["n"] == y["n"] and x["n_skipped"] == y["n_skipped"] and x["device"] == y["device"]
                   and torch.equal(x["mean"], y["mean"]) and torch.equal(x["scatter"], y["scatter"])
                   for x, y in zip(a, b))

    outcomes = []  # per attempt: "old" (raised, nothing changed), "new", or "mixed"
    k = 0
    while True:
        k += 1
        state = {"armed": False, "events": 0}

        def tracer(frame, event, arg):
            if not frame.f_code.co_filename.endswith(("distributed.py", "moments.py")):
                return None
            return local

        def local(frame, event, arg):
            if event != "line":
                return local
            if frame.f_code is code and frame.f_lineno >= start:
                state["armed"] = True
            if state["armed"]:
                state["events"] += 1
                if state["events"] == k:
                    raise KeyboardInterrupt(f"injected at line {frame.f_lineno} of {frame.f_code.co_name}")
            return local

        ms = fresh()
        raised = False
        sys.settrace(tracer)
        try:
            all_reduce_moments(ms)
        except KeyboardInterrupt:
            raised = True
        finally:
            sys.settrace(None)
        snap = [_snap(m) for m in ms]
        outcomes.append("old" if same(snap, old) and raised else
                        "new" if same(snap, new) else "mixed" + (" (raised)" if raised else ""))
        # every rank keeps calling until every rank has run out of lines to interrupt
        more = torch.tensor([1.0 if raised else 0.0])
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item() or k > 2000:
            break
    count.take()
    return {"outcomes": outcomes}


def _scenario_timeout(rank: int, world: int, count: "_Counter") -> dict:
    """Rank 1 fails in the middle of the call (reading a scatter raises, after the counts and
    means went out) and stays alive, as a training loop that catches the error would: rank 0
    raises after ``timeout`` instead of waiting for the group's own (60 s here), and neither
    rank changed a state. The group is left with a pending collective: no scenario may follow
    this one."""
    import os
    import time

    done = os.path.join(_OUT_DIR[0], "timeout_rank0_done")

    class Faulty(Moments):
        @property
        def scatter(self):
            raise RuntimeError("injected failure while reading the scatter")

    g = torch.Generator().manual_seed(rank)
    cls = Faulty if rank == 1 else Moments
    ms = [Moments(5, backend="torch"), cls(6, backend="torch")]
    for m in ms:
        m.update(torch.randn(12, m.dim, generator=g, dtype=torch.float64))
    before = [(m.n, m.mean.clone(), Moments.scatter.fget(m).clone()) for m in ms]
    t0 = time.monotonic()
    try:
        all_reduce_moments(ms, timeout=timedelta(seconds=2))
        msg = None
    except RuntimeError as e:
        msg = str(e)
    elapsed = time.monotonic() - t0
    if rank == 0:
        open(done, "w").close()
    else:  # alive, its connections open, until rank 0 is done (45 s at most)
        while not os.path.exists(done) and time.monotonic() - t0 < 45:
            time.sleep(0.05)
    unchanged = all(m.n == n and torch.equal(m.mean, mu) and torch.equal(Moments.scatter.fget(m), c)
                    for m, (n, mu, c) in zip(ms, before))
    return {"msg": msg, "elapsed": elapsed, "unchanged": unchanged}


_OUT_DIR = [None]  # the spawn's output folder, for scenarios that need a file between ranks


def _worker(rank: int, world: int, init_file: str, out_dir: str, scenarios) -> None:
    _init(rank, world, init_file)
    _OUT_DIR[0] = out_dir
    count = _Counter()
    res = {}
    for name in scenarios:
        try:
            res[name] = _SCENARIOS[name](rank, world, count)
        except Exception:  # reported by the test that reads this scenario; later ones may
            res[name] = {"error": traceback.format_exc()}  # be out of step, so stop here
            break
    torch.save(res, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _spawn(world: int, tmp, scenarios):
    out = tmp / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(world, str(tmp / "init"), str(out), list(scenarios)),
                       nprocs=world, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------ parent side
def _run(world, tmp_path_factory):
    """One spawn per world size runs every scenario; returns (world, {scenario: [per rank]})."""
    # "timeout" leaves a collective pending on purpose (the group is not reused): last.
    scenarios = (["main", "order", "commit"]
                 + (["subgroup"] if world == 3 else ["fsdp", "ddp", "timeout"]))
    per_rank = _spawn(world, tmp_path_factory.mktemp(f"dist{world}"), scenarios)
    return world, {name: [r.get(name, {"error": "not run: an earlier scenario failed"}) for r in per_rank]
                   for name in scenarios}


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    return _run(2, tmp_path_factory)


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    return _run(3, tmp_path_factory)


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def run(request):
    return request.getfixturevalue(f"run{request.param}")


def _results(run, scenario):
    world, res = run
    out = res[scenario]
    for rank, r in enumerate(out):
        assert "error" not in r, f"scenario {scenario!r} failed on rank {rank}:\n{r['error']}"
    return world, out


def _refs(world):
    return [_reference([_data(world, r, i) for r in range(world)], SPECS[i][2]) for i in range(len(SPECS))]


def _check_states(states_per_rank, refs, tol):
    for i, ref in enumerate(refs):
        name = SPECS[i][0]
        n, skipped, mu, c = ref
        r0 = states_per_rank[0][i]
        for rank, states in enumerate(states_per_rank):
            st = states[i]
            assert (st["n"], st["n_skipped"]) == (n, skipped), (name, rank)
            # every rank ends with bitwise the same state
            assert torch.equal(st["mean"], r0["mean"]) and torch.equal(st["scatter"], r0["scatter"]), (name, rank)
            if n == 0:
                assert st["device"] is None and not st["scatter"].any(), (name, rank)
                continue
            assert st["device"] == "cpu", (name, rank)
            assert _rel(st["mean"], mu) <= tol, (name, rank, _rel(st["mean"], mu))
            assert _rel(st["scatter"], c) <= tol, (name, rank, _rel(st["scatter"], c))
            assert torch.equal(st["scatter"], st["scatter"].T), (name, rank)


@pytest.mark.parametrize("scenario,tol", [("buckets", TOL64), ("one_bucket", TOL64), ("fp32_wire", TOL32)])
def test_every_rank_gets_the_single_process_state(run, scenario, tol):
    world, res = _results(run, "main")
    _check_states([r[scenario]["states"] for r in res], _refs(world), tol)


def test_moments_all_reduce_method(run):
    world, res = _results(run, "main")
    _check_states([r["method"]["states"] for r in res], [_refs(world)[2]], TOL64)
    assert all(len(r["method"]["calls"]) == 3 for r in res)


def test_one_collective_per_bucket_not_per_matrix(run):
    world, res = _results(run, "main")
    sizes = [d * (d + 1) // 2 for _, d, _, _ in SPECS]
    total = sum(sizes)
    head = sum(2 + d for _, d, _, _ in SPECS)
    per_bucket = SMALL_BUCKET // 8
    n_buckets = math.ceil(total / per_bucket)
    assert n_buckets > len(SPECS)  # buckets cut through matrices: the case to get right
    expected = ([(6, "torch.float64", "max"), (head, "torch.float64", "sum")]
                + [(per_bucket, "torch.float64", "sum")] * (total // per_bucket)
                + [(total % per_bucket, "torch.float64", "sum")])
    for r in res:
        assert r["buckets"]["calls"] == expected
        # default bucket: five matrices, one collective for all their scatters
        assert r["one_bucket"]["calls"] == [(6, "torch.float64", "max"),
                                            (head, "torch.float64", "sum"),
                                            (total, "torch.float64", "sum")]
        assert total * 8 <= DEFAULT_BUCKET_BYTES and r["one_bucket"]["returned_same"]
        calls = r["fp32_wire"]["calls"]
        assert calls[1][1] == "torch.float64"  # counts and means stay float64
        assert [c[1] for c in calls[2:]] == ["torch.float32"] * math.ceil(total / 1024)
        assert r["other_collectives"] == []


def test_rank_without_rows_and_uneven_counts(run):
    world, res = _results(run, "main")
    if world == 3:  # rank 1 saw no rows: its Moments were never allocated
        assert all(s["device"] is None and s["n"] == 0 for s in res[1]["before"])
    else:  # rank 0 saw a single row
        assert [s["n"] for s in res[0]["before"]][:3] == [1, 1, 1]
    # ... and after the sync it holds the full state, on the CPU (the gloo device)
    _check_states([r["buckets"]["states"] for r in res], _refs(world), TOL64)
    never = [r["buckets"]["states"][4] for r in res]
    assert all(s["n"] == 0 and s["device"] is None for s in never)


def test_mismatched_ranks_raise_everywhere_and_change_nothing(run):
    world, res = _results(run, "main")
    for rank, r in enumerate(res):
        mm = r["mismatch"]
        for what, msg in mm["msgs"].items():
            assert msg is not None, f"rank {rank}: no error for mismatched {what}"
            assert "ranks passed different lists of Moments" in msg and "no state was changed" in msg
        assert "number of Moments ranges from 1 to 2" in mm["msgs"]["count"]
        assert torch.equal(mm["unchanged"]["scatter"], mm["before"]["scatter"])
        assert mm["unchanged"]["n"] == 10
        assert mm["after"]["n"] == 10 * world  # the group still works after the errors


def test_states_in_a_different_order_raise_on_every_rank(run):
    """Issue 12, item 11: two states of the same dim in a different order on each rank were
    merged crosswise silently. Named (``names=``, and ``Collector.sync`` names every state),
    the order is part of the agreement check: every rank raises, naming the first position
    that differs, and no state changes; the group still works afterwards."""
    world, res = _results(run, "order")
    for rank, r in enumerate(res):
        msg = r["names"]
        assert msg is not None, f"rank {rank}: states in a different order were merged"
        assert "ranks passed different lists of Moments" in msg and "no state was changed" in msg
        here = "'x'" if rank == 0 else "'y'"
        assert f"the first difference is at position 0, where this rank has {here} (dim 4" in msg, msg
        assert r["names_unchanged"]
        # Collector.sync: layers registered in a different order
        assert r["col_order"] == (["a", "b"] if rank == 0 else ["b", "a"])
        msg = r["col_msg"]
        assert msg is not None, f"rank {rank}: Collector.sync merged layer a's states into b's"
        first = "'a.H_a'" if rank == 0 else "'b.H_a'"
        assert f"position 0, where this rank has {first} (dim 6" in msg, msg
        assert r["col_unchanged"]
        # the group still works: the same order merges every state over all ranks
        before, after = r["col_ok"]["before"], r["col_ok"]["after"]
        assert before and before.keys() == after.keys()
        for key, n in before.items():
            assert after[key] == sum(res[q]["col_ok"]["before"][key] for q in range(world)) > n


def test_a_rank_that_refuses_its_arguments_makes_every_rank_raise(run):
    """A rank whose own arguments are refused (the same Moments twice) raises its own error,
    after joining the agreement check: the other ranks raise at once instead of waiting in
    the collectives (for the group's timeout) and the call sequence stays in step."""
    world, res = _results(run, "order")
    for rank, r in enumerate(res):
        if rank == 1:
            assert "more than once" in r["refused"]
        else:
            assert "another rank of the group refused its arguments" in r["refused"]
            assert "no state was changed" in r["refused"]


def test_failure_after_the_collectives_changes_no_state(run):
    """Fault injection: a KeyboardInterrupt at every line that runs after the last collective
    (the commit phase, Moments.load_packed / reset included) leaves every state either as it
    was (the call raised) or merged; never some states merged and others not."""
    world, res = _results(run, "commit")
    for rank, r in enumerate(res):
        out = r["outcomes"]
        assert len(out) > 10, out  # the injection did reach the commit phase's lines
        assert all(o in ("old", "new") for o in out), (rank, out)
        assert out[-1] == "new" and "old" in out


def test_a_rank_failing_mid_call_makes_the_others_raise_within_timeout(run2):
    """Issue 12, item 11: a rank that fails during the call left the others waiting for the
    group's timeout (30 min for gloo by default; 60 s in these tests). With ``timeout=2 s``
    rank 0 raises well before the group's timeout, saying so, and neither rank changed a
    state."""
    _, res = _results(run2, "timeout")
    r0, r1 = res
    assert r1["msg"] == "injected failure while reading the scatter"
    msg = r0["msg"]
    assert msg is not None and "did not complete within timeout=2 s" in msg, msg
    assert "No state was changed" in msg and "\n" not in msg
    assert r0["elapsed"] < 20  # the group's own timeout is 60 s: the argument was applied
    assert r0["unchanged"] and r1["unchanged"]


def test_subgroup_and_group_of_one(run3):
    _, res = _results(run3, "subgroup")
    ref = _reference([_data(3, r, 0) for r in (0, 2)], SPECS[0][2])
    for rank in (0, 2):
        st = res[rank]["state"]
        assert st["n"] == ref[0] and _rel(st["scatter"], ref[3]) <= TOL64
    assert "not a member of group" in res[1]["outsider"]
    for r in res:
        assert torch.equal(r["single_before"]["scatter"], r["single_after"]["scatter"])
        assert r["single_before"]["n"] == r["single_after"]["n"]
    # group of one: no collective; subgroup: 3 on its members, none on the outsider
    assert [len(r["calls"]) for r in res] == [3, 0, 3]


# --------------------------------------------------------------- single-process errors
def test_argument_errors_name_the_argument():
    m = Moments(3)
    with pytest.raises(TypeError, match=r"moments\[1\]"):
        all_reduce_moments([m, "x"])
    with pytest.raises(TypeError, match="iterable of Moments"):
        all_reduce_moments(3)
    with pytest.raises(ValueError, match="more than once"):
        all_reduce_moments([m, m])
    with pytest.raises(TypeError, match="dtype"):
        all_reduce_moments([m], dtype=torch.float16)
    with pytest.raises(ValueError, match="bucket_bytes"):
        all_reduce_moments([m], bucket_bytes=0)
    for bad, exc in [(0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                     (timedelta(0), ValueError), (True, TypeError), ("5", TypeError)]:
        with pytest.raises(exc, match="timeout"):
            all_reduce_moments([m], timeout=bad)
    with pytest.raises(ValueError, match="names has 1 entries for 2 moments"):
        all_reduce_moments([m, Moments(3)], names=["a"])
    with pytest.raises(TypeError, match=r"names\[1\]"):
        all_reduce_moments([m, Moments(3)], names=["a", 2])
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            m.all_reduce()
    with pytest.raises(TypeError, match="weight"):
        full_weight([1.0])
    with pytest.raises(ValueError, match="summon_full_params"):
        full_weight(torch.zeros(6))
    w = torch.nn.Linear(3, 2).weight
    assert full_weight(w).shape == (2, 3) and not full_weight(w).requires_grad


# -------------------------------------------------------------- DDP with the collector
def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _record(net, names, rec):
    """Independent record of what a collector must see: h_a, h_b, g_b = −dl/dh_b (sign
    irrelevant for C) and the forward-time W, so that g_a = g_b W."""
    for name in names:
        mod = net.get_submodule(name)
        rec[name] = {"h_a": [], "h_b": [], "g_b": [], "W": []}

        def hook(mod, inp, out, r=rec[name]):
            r["h_a"].append(inp[0].detach().double().clone())
            r["h_b"].append(out.detach().double().clone())
            r["W"].append(mod.weight.detach().double().clone())
            if out.requires_grad:
                out.register_hook(lambda g: r["g_b"].append(g.detach().double().clone()))
        mod.register_forward_hook(hook)


BATCH = [5, 9]  # uneven per-rank micro-batches


def _scenario_ddp(rank: int, world: int, count: "_Counter") -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from crh_kernels import Collector

    torch.manual_seed(0)
    net = _mlp()
    col = Collector(net)
    names = list(col.layers)
    rec = {}
    _record(net, names, rec)
    model = DDP(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    with col:
        for _ in range(3):
            for micro in range(2):  # gradient accumulation: only the last micro-batch syncs grads
                x = torch.randn(BATCH[rank], 6, generator=g)
                y = torch.randn(BATCH[rank], 4, generator=g)
                with model.no_sync() if micro == 0 else nullcontext():
                    (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
            opt.step()
            opt.zero_grad()
    count.take()
    col.sync()
    calls = count.take()
    states = {name: {s: (None if getattr(col.layers[name], s, None) is None
                         else _snap(getattr(col.layers[name], s)))
                     for s in ("H_a", "H_b", "G_a", "G_b")} for name in names}
    return {"states": states, "rec": rec, "calls": calls,
            "weights": [p.detach().clone() for p in net.parameters()]}


def test_ddp_training_loop_with_collector(run2):
    _, res = _results(run2, "ddp")
    for r in res:  # Collector.sync: all layers' Moments in one bucket
        assert len(r["calls"]) == 3, r["calls"]
    for a, b in zip(res[0]["weights"], res[1]["weights"]):
        assert torch.equal(a, b)  # DDP kept the replicas equal
    names = list(res[0]["states"])
    assert names, "the collector selected no layer"
    for name in names:
        rows = {s: [] for s in ("H_a", "H_b", "G_a", "G_b")}
        for r in res:
            rec = r["rec"][name]
            # backward hooks fire in reverse order within a step; pair each g_b with its forward
            assert len(rec["g_b"]) == len(rec["h_b"]) == len(rec["W"])
            rows["H_a"] += rec["h_a"]
            rows["H_b"] += rec["h_b"]
            rows["G_b"] += rec["g_b"]
            rows["G_a"] += [gb @ w for gb, w in zip(rec["g_b"], rec["W"])]
        for stream, xs in rows.items():
            st0 = res[0]["states"][name][stream]
            if st0 is None:
                continue
            n, _, mu, c = _reference(xs, normalize=True)
            for r in res:
                st = r["states"][name][stream]
                assert st["n"] == n == 3 * 2 * sum(BATCH), (name, stream)
                assert torch.equal(st["scatter"], st0["scatter"]), (name, stream)
                assert _rel(st["scatter"], c) <= 1e-4, (name, stream, _rel(st["scatter"], c))
                # the sign convention of g (−dl/dh) flips the mean, never C
                assert min(_rel(st["mean"], mu), _rel(st["mean"], -mu)) <= 1e-4, (name, stream)


# ------------------------------------------------------------------------------ FSDP
def _scenario_fsdp(rank: int, world: int, count: "_Counter") -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard

    res = {}
    # FSDP2: parameters are DTensor shards, activations are whole rows on every rank.
    torch.manual_seed(0)
    net = _mlp()
    mesh = init_device_mesh("cpu", (world,))
    for i in (0, 2):
        fully_shard(net[i], mesh=mesh)
    fully_shard(net, mesh=mesh)
    res["sharded"] = type(net[0].weight).__name__
    stats = {i: (Moments(net[i].in_features, backend="torch"), Moments(net[i].out_features, backend="torch"))
             for i in (0, 2)}
    rows = {i: ([], []) for i in (0, 2)}
    for i in (0, 2):
        def hook(mod, inp, out, i=i):
            stats[i][0].update(inp[0].detach())
            stats[i][1].update(out.detach())
            rows[i][0].append(inp[0].detach().double().clone())
            rows[i][1].append(out.detach().double().clone())
        net[i].register_forward_hook(hook)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(200 + rank)
    data = []
    for _ in range(2):
        x, y = torch.randn(BATCH[rank], 6, generator=g), torch.randn(BATCH[rank], 4, generator=g)
        data.append((x, y))
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    all_reduce_moments([m for pair in stats.values() for m in pair])
    res["states"] = {i: [_snap(m) for m in stats[i]] for i in (0, 2)}
    res["rows"] = rows
    res["data"] = data
    res["W"] = {i: full_weight(net[i].weight).clone() for i in (0, 2)}  # collective, all ranks

    # FSDP1 (use_orig_params): a flat shard outside summon_full_params is refused.
    torch.manual_seed(1)
    net1 = _mlp()
    w0 = net1[0].weight.detach().clone()
    model1 = FSDP(net1, device_id=torch.device("cpu"), use_orig_params=True)
    res["fsdp1_outside"] = _expect(ValueError, lambda: full_weight(net1[0].weight))
    with FSDP.summon_full_params(model1, writeback=False):
        res["fsdp1_inside"] = torch.equal(full_weight(net1[0].weight), w0)
    return res


_SCENARIOS = {"main": _scenario_main, "subgroup": _scenario_subgroup, "ddp": _scenario_ddp,
              "fsdp": _scenario_fsdp, "order": _scenario_order, "commit": _scenario_commit,
              "timeout": _scenario_timeout}


def test_fsdp_sync_and_full_weight(run2):
    _, res = _results(run2, "fsdp")
    assert res[0]["sharded"] == "DTensor"
    # the same training on one process: FSDP averages the ranks' gradients
    torch.manual_seed(0)
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(2):
        grads = []
        for r in res:
            x, y = r["data"][step]
            net.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        for p, *gs in zip(net.parameters(), *grads):
            p.grad = sum(gs) / len(gs)
        opt.step()
    for i in (0, 2):
        for r in res:
            assert r["W"][i].shape == net[i].weight.shape
            torch.testing.assert_close(r["W"][i], net[i].weight.detach(), rtol=1e-5, atol=1e-6)
            for k in range(2):  # H_a, H_b: whole rows, merged over both ranks
                n, _, mu, c = _reference([x for rr in res for x in rr["rows"][i][k]], True)
                st = r["states"][i][k]
                assert st["n"] == n == 2 * sum(BATCH)
                assert torch.equal(st["scatter"], res[0]["states"][i][k]["scatter"])
                assert _rel(st["scatter"], c) <= 1e-5 and _rel(st["mean"], mu) <= 1e-5
    for r in res:
        assert "summon_full_params" in r["fsdp1_outside"]
        assert r["fsdp1_inside"]
