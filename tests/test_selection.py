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



def test_a_pattern_or_predicate_that_matches_nothing_is_an_error_naming_modules():
    net = ConvNet()
    with pytest.raises(ValueError, match=r"modules='nomatch' .*matched no module") as info:
        Collector(net, modules="nomatch")
    msg = str(info.value)
    assert "'c1'" in msg and "'fc'" in msg          # a few names the user could have meant
    assert "\n" not in msg
    # a regex that names only unsupported modules says so
    with pytest.raises(ValueError, match=r"only unsupported ones \('g': Conv2d\)"):
        Collector(net, modules=r"^g$")
    with pytest.raises(ValueError, match="predicate .* matched no module"):
        Collector(net, modules=lambda n, m: False)
    # a model without any supported module
    with pytest.raises(ValueError, match="has no supported module"):
        Collector(nn.Sequential(nn.ReLU()), modules="0")
    # a pattern that picks nothing is fine when heads= supplies the layers
    col = Collector(net, modules="nomatch", heads={"c3": 2})
    assert set(col.layers) == {"c3.head0", "c3.head1"}
