"""Collector checkpoints: a resumed run equals one pass; shared Moments stay shared."""
from __future__ import annotations

import io

import pytest
import torch

from crh_kernels.collect import Collector

from ._collect_ref import mlp, batches, Block

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("stage_rows", [0, 4096])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_state_dict_resume_equals_one_pass(state_dtype, stage_rows):
    data = batches(6)
    heads = {"2": 4}
    kw = dict(max_rows=20, heads=heads, state_dtype=state_dtype, stage_rows=stage_rows)

    def run(col, model, part):
        with col:
            for x, t in part:
                model(x)[:, :3].square().mean().backward()
                col.step()

    m1 = mlp()
    one = Collector(m1, **kw)
    run(one, m1, data)

    m2 = mlp()
    first = Collector(m2, **kw)
    run(first, m2, data[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    m3 = mlp()
    second = Collector(m3, **kw)
    second.load_state_dict(torch.load(buf))
    assert second.steps == 3
    run(second, m3, data[3:])
    for n, st in one.layers.items():
        for s, m in st.moments().items():
            o = second.layers[n].moments()[s]
            if m is None:
                assert o is None
                continue
            assert (m.n, m.n_skipped) == (o.n, o.n_skipped), (n, s)
            assert m.scatter.dtype == o.scatter.dtype == state_dtype
            if stage_rows == 0:  # one update per call: same operations, same order
                assert torch.equal(m.mean, o.mean), (n, s)
                assert torch.equal(m.scatter, o.scatter), (n, s)
            else:  # staged: the checkpoint cut the gathered rows into two updates
                tol = 1e-5  # the batch kernels accumulate in fp32 whatever the state dtype
                assert torch.allclose(m.mean, o.mean, rtol=tol, atol=tol), (n, s)
                assert (m.scatter - o.scatter).norm() <= tol * m.scatter.norm(), (n, s)



def test_state_dict_keeps_shared_moments_shared():
    blk = Block()
    col = Collector(blk)
    x, keep = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    with col:
        blk(x, keep).sum().backward()
    sd = col.state_dict()
    assert sd["layers"]["k"]["h_a"] == {"alias": ["q", "h_a"]}
    col2 = Collector(Block())
    col2.load_state_dict(sd)
    assert col2.layers["k"].H_a is col2.layers["q"].H_a is col2.layers["v"].H_a
    assert torch.equal(col2.layers["q"].H_a.scatter, col.layers["q"].H_a.scatter)
    with pytest.raises(ValueError):
        Collector(Block(), normalize=False).load_state_dict(sd)

