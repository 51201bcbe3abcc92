"""Collector module selection: None, regex, names, predicates, and the errors."""
from __future__ import annotations

import pytest
import torch.nn as nn

from crh_kernels.collect import Collector

from ._collect_ref import mlp, ConvNet

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


def test_module_selection():
    net = ConvNet()
    assert set(Collector(net, r"^c").layers) == {"c1", "c2", "c3"}
    assert set(Collector(net, ["c2", "fc"]).layers) == {"c2", "fc"}
    assert set(Collector(net, lambda n, m: isinstance(m, nn.Linear)).layers) == {"fc"}
    assert set(Collector(net, lambda m: isinstance(m, nn.Conv2d)).layers) == {"c1", "c2", "c3"}
    with pytest.raises(KeyError):
        Collector(net, ["nope"])
    with pytest.raises(TypeError):
        Collector(net, ["g"])                               # groups=2 named explicitly
    with pytest.raises(ValueError):
        Collector(net, streams=("h_a", "x"))
    with pytest.raises(ValueError):
        Collector(mlp(), heads={"2": 5})                     # 16 features, 5 heads

