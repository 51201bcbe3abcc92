"""Aborted steps (issue 12, item 10): forward rows whose gradients never come (an exception
between forward and backward, an output the loss does not use, a backward after stop()) are
counted per layer (``rows_without_grad``) and reported in ``meta``, so that the difference
between the h and the g streams is always accounted for."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crh_kernels.collect import Collector

from ._collect_ref import Block, batches, mlp

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _step(model, x, t, abort):
    loss = F.mse_loss(model(x), t)
    if abort:
        raise RuntimeError("loss is not finite: skipping the batch")
    loss.backward()


@pytest.mark.parametrize("stage_rows", [0, 4096])
def test_aborted_step_is_counted_and_reported(stage_rows):
    model = mlp()
    col = Collector(model, stage_rows=stage_rows)
    with col:
        for i, (x, t) in enumerate(batches(4)):
            try:
                _step(model, x, t, abort=(i == 2))
            except RuntimeError:
                pass
            col.step()
    for n, st in col.layers.items():
        assert st.H_a.n == st.H_b.n == 4 * 32 and st.G_b.n == st.G_a.n == 3 * 32, n
        assert st.rows_without_grad == st.H_b.n - st.G_b.n == 32 and st.calls_without_grad == 1
    meta = col.meta
    assert meta["rows_without_grad"] == {"0": 32, "2": 32, "4": 32}
    assert any("gradients never came" in s and "96 rows" in s for s in meta["notes"])
    # the counts travel with the checkpoint
    sd = col.state_dict()
    other = Collector(mlp(), stage_rows=stage_rows)
    other.load_state_dict(sd)
    assert other.layers["2"].rows_without_grad == 32 and other.layers["2"].calls_without_grad == 1


def test_rows_without_grad_count_masked_and_subsampled_rows_as_collected():
    model = mlp()
    keep = torch.zeros(32, dtype=torch.bool)
    keep[:20] = True
    col = Collector(model, mask=keep)
    x, t = batches(1)[0]
    with col:
        try:
            _step(model, x, t, abort=True)
        except RuntimeError:
            pass
    assert {st.rows_without_grad for st in col.layers.values()} == {20}
    col2 = Collector(model, max_rows=7)
    with col2:
        try:
            _step(model, x, t, abort=True)
        except RuntimeError:
            pass
    assert {st.rows_without_grad for st in col2.layers.values()} == {7}


def test_unused_output_and_backward_after_stop():
    blk = Block()
    col = Collector(blk, ["q", "k", "v", "fc2"])
    x, keep = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    with col:
        a = blk.ln1(x)
        q, k = blk.q(a), blk.k(a)
        blk.v(a)                                  # the loss does not use v
        (q * k).sum().backward()
    assert col.layers["v"].rows_without_grad == 10 and col.layers["v"].G_b.n == 0
    assert col.layers["q"].rows_without_grad == col.layers["k"].rows_without_grad == 0
    assert col.layers["q"].H_a is col.layers["v"].H_a         # h_a: the very same rows
    loss = blk(x, keep).sum()
    col.start()
    loss2 = blk(x, keep).sum()
    col.stop()
    loss2.backward()                              # hooks inert: those rows have no gradients
    del loss, loss2
    assert col.layers["fc2"].rows_without_grad == 10
    assert col.layers["fc2"].H_b.n == 10 and col.layers["fc2"].G_b.n == 0


def test_complete_steps_report_nothing_and_reset_forgets():
    model = mlp()
    col = Collector(model)
    with col:
        for x, t in batches(2):
            _step(model, x, t, abort=False)
            col.step()
        assert col.meta["rows_without_grad"] == {}
        assert not any("never came" in s for s in col.meta["notes"])
        out = model(batches(1)[0][0])
        col.reset()                               # the pending pass belongs to the old states
        del out
    assert all(st.rows_without_grad == 0 and st.calls_without_grad == 0
               for st in col.layers.values())
