"""The fused update against plain PyTorch (docs/spec.md §5), every backend usable on this device.

Baselines, timed in the same run: ``pipeline`` (x̂ = x/||x||, μ = mean, (x̂−μ)ᵀ(x̂−μ)) and
``mm`` (bare xᵀx). Effective GFLOP/s use the full-product count 2·N·D² for every row so that
the figures compare directly; the symmetric update does N·D·(D+1) of real work.
Run: ``python -m pytest bench/bench_moments.py``.
"""
import pytest
import torch

import crh_kernels
from crh_kernels import backends
from crh_kernels.selfcheck import bare_mm, pipeline

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(16384, 1024), (65536, 128), (4096, 4096)]
DTYPES = [torch.float32, torch.bfloat16]


def _usable():
    out = []
    for name, (ok, _) in crh_kernels.available_backends().items():
        if ok and backends.get(name).supports(DEVICE)[0] and not (name == "triton" and DEVICE.type == "cpu"):
            out.append(name)
    return out


IMPLS = ["pipeline", "mm"] + _usable()






def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _fn(impl, d):
    if impl == "pipeline":
        return pipeline
    if impl == "mm":
        return bare_mm
    be = backends.get(impl)
    return lambda x: be.batch_stats(x, None, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("n,d", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", IMPLS)
def test_update(benchmark, record, impl, n, d, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=gen) + 3.0).to(dtype).to(DEVICE)
    fn = _fn(impl, d)

    def run():
        out = fn(x)
        _sync()
        return out

    heavy = 2.0 * n * d * d > 5e10 and DEVICE.type == "cpu"
    benchmark.group = f"{n}x{d} {str(dtype).replace('torch.', '')}"
    benchmark.pedantic(run, rounds=3 if heavy else 7, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, impl, 2.0 * n * d * d)
