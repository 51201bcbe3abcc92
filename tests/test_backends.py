"""The backend protocol of crh_kernels.backends.base: capability flags that match the methods,
"unsupported" defaults that say so, one row-status vocabulary in Triton and C++, and
``backends.matmul_rows`` (the row_matmul capability with its fallback)."""
import os

import numpy as np
import pytest
import torch

import crh_kernels
from crh_kernels import backends
from crh_kernels.backends import base
from crh_kernels.backends.base import (CAPABILITIES, ROW_MASKED, ROW_SKIPPED, ROW_VALID,
                                       Backend)

from ._ref import expected_scale


def _registered_class(name):
    try:
        return backends.backend_class(name)
    except ImportError as exc:  # an optional dependency (triton) missing
        pytest.skip(f"backend {name!r} cannot be imported: {exc}")


def _overrides(cls, method):
    return getattr(cls, method) is not getattr(Backend, method)


def test_vocabulary():
    assert (ROW_MASKED, ROW_SKIPPED, ROW_VALID) == (0, 1, 2)
    assert (backends.ROW_MASKED, backends.ROW_SKIPPED, backends.ROW_VALID) == (0, 1, 2)
    assert set(CAPABILITIES) == {"fused_update", "row_staging", "row_matmul"}
    for flag in CAPABILITIES:
        assert getattr(Backend, flag) is False, "capabilities are off unless a backend says so"


@pytest.mark.parametrize("name", backends.names())
def test_capability_flags_match_the_methods(name):
    cls = _registered_class(name)
    assert issubclass(cls, Backend) and cls.name == name
    for method in ("availability", "supports", "batch_stats", "cross_stats"):
        assert _overrides(cls, method), f"{name} lacks the required {method}()"
    for flag, methods in CAPABILITIES.items():
        declared = getattr(cls, flag)
        assert isinstance(declared, bool), f"{name}.{flag} must be a bool"
        for method in methods:
            assert _overrides(cls, method) == declared, (
                f"{name}: {flag}={declared} but {method}() is "
                f"{'overridden' if _overrides(cls, method) else 'the base default'}")


def test_the_known_capabilities():
    # the C++ CPU backend offers all three; the others none (update when that changes)
    want = {"cpp": {"fused_update", "row_staging", "row_matmul"}, "torch": set(),
            "cuda": set(), "triton": {"fused_update"}}
    for name, caps in want.items():
        try:
            cls = backends.backend_class(name)
        except ImportError:
            continue
        assert {f for f in CAPABILITIES if getattr(cls, f)} == caps, name


_CALLS = {
    "update_state": lambda be: be.update_state(torch.zeros(2, 3), None, True, False, 0,
                                               torch.zeros(3), torch.zeros(3, 3)),
    "stage_rows": lambda be: be.stage_rows(torch.zeros(2, 3), None, True, torch.empty(2, 3),
                                           torch.empty(2), torch.empty(2, dtype=torch.uint8),
                                           torch.zeros(3, dtype=torch.float64)),
    "update_staged": lambda be: be.update_staged(torch.zeros(2, 3), torch.zeros(2),
                                                 torch.zeros(2, dtype=torch.uint8),
                                                 torch.zeros(3, dtype=torch.float64), False, 0,
                                                 torch.zeros(3), torch.zeros(3, 3)),
    "matmul_rows": lambda be: be.matmul_rows(torch.zeros(2, 3), torch.zeros(3, 4)),
}


class _Minimal(Backend):
    name = "minimal"


@pytest.mark.parametrize("name", list(backends.names()) + ["minimal"])
def test_unsupported_capability_raises_naming_it(name):
    be = _Minimal() if name == "minimal" else _registered_class(name)()
    for flag, methods in CAPABILITIES.items():
        if getattr(be, flag):
            continue
        for method in methods:
            with pytest.raises(NotImplementedError,
                               match=rf"backend '{be.name}' does not offer {method}\(\).*'{flag}'"):
                _CALLS[method](be)


def test_required_methods_of_the_base_raise():
    be = _Minimal()
    with pytest.raises(NotImplementedError, match="minimal"):
        be.availability()
    with pytest.raises(NotImplementedError, match="minimal"):
        be.batch_stats(torch.zeros(2, 3), None, True)


# ---------------------------------------------------------------- one row-status encoding
def _three_rows(dtype=torch.float32, device="cpu"):
    """A normal row, a zero row, a non-finite row, and a normal but masked row."""
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, float("inf"), 0.0],
                      [4.0, 5.0, 6.0]], dtype=dtype, device=device)
    mask = torch.tensor([True, True, True, False], device=device)
    return x, mask, [ROW_VALID, ROW_SKIPPED, ROW_SKIPPED, ROW_MASKED]


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a CUDA device or TRITON_INTERPRET=1")
def test_triton_row_stats_status():
    tb = pytest.importorskip("crh_kernels.backends.triton", reason="triton not installed")
    device = "cuda" if torch.cuda.is_available() and not tb.INTERPRET else "cpu"
    x, mask, want = _three_rows(device=device)
    scale, status, _ = tb.row_stats(x, mask, True)
    assert status.dtype == torch.uint8
    assert status.cpu().tolist() == want
    assert scale.cpu().tolist()[1:] == [0.0, 0.0, 0.0]
    # counts follow the status: one valid row, two skipped, the masked one nowhere
    assert tb._counts(status).cpu().tolist() == [1, 2]


def test_cpp_stage_rows_status():
    ok, why = crh_kernels.available_backends()["cpp"]
    if not ok:
        pytest.skip(f"cpp backend unavailable: {why}")
    be = backends.get("cpp")
    x, mask, want = _three_rows()
    buf, scale = torch.empty_like(x), torch.empty(4)
    status, sum_ = torch.empty(4, dtype=torch.uint8), torch.zeros(3, dtype=torch.float64)
    be.stage_rows(x, mask, True, buf, scale, status, sum_)
    assert status.tolist() == want


def _rows_at_the_ends_of_fp32():
    """Rows whose fp32 squared norm is subnormal, zero or overflows, rows of norm below 2^-100
    (tiny: one whose 1/||x|| fits fp32, two whose 1/||x|| does not, the smallest subnormal
    alone among them), with the status each must get (normalizing, and not): one rule on every
    backend (docs/spec.md §1). Every finite nonzero row is valid."""
    big = torch.finfo(torch.float32).max
    sub = torch.finfo(torch.float32).tiny / 2 ** 23  # the smallest subnormal, 1.4e-45
    x = torch.tensor([[1e-30, -2e-30, 3e-30], [6e-22, 6e-22, 0.0], [1e19, 3e19, -2e19],
                      [big, big, big], [sub, 0.0, 0.0], [0.0, 0.0, 0.0],
                      [1.0, float("nan"), 0.0], [1e-30, 1e-30, 1e-30], [1e-35, -3e-36, 0.0],
                      [1e-40, 2e-40, -1e-41], [3e-39, 0.0, sub]])
    mask = torch.tensor([True] * 7 + [False] + [True] * 3)
    v, s, m = ROW_VALID, ROW_SKIPPED, ROW_MASKED
    return x, mask, {True: [v, v, v, v, v, s, s, m, v, v, v], False: [v, v, v, v, v, v, s, m, v, v, v]}


def _statuses_and_scales(name, x, mask, normalize):
    if name == "torch":
        from crh_kernels.backends.torch import row_scale
        scale, valid, _ = row_scale(x, mask, normalize)
        status = torch.where(valid, ROW_VALID, torch.where(mask, ROW_SKIPPED, ROW_MASKED))
        return status.tolist(), scale
    if name == "triton":
        tb = pytest.importorskip("crh_kernels.backends.triton", reason="triton not installed")
        dev = "cuda" if torch.cuda.is_available() and not tb.INTERPRET else "cpu"
        scale, status, _ = tb.row_stats(x.to(dev), mask.to(dev), normalize)
        return status.cpu().tolist(), scale.cpu()
    # cpp: pass 1 as the row stager runs it (the same row rule as its update and cross moment)
    buf, scale = torch.empty_like(x), torch.empty(x.shape[0])
    status, sum_ = torch.empty(x.shape[0], dtype=torch.uint8), torch.zeros(3, dtype=torch.float64)
    backends.get("cpp").stage_rows(x, mask, normalize, buf, scale, status, sum_)
    return status.tolist(), scale


@pytest.mark.parametrize("name", ["torch", "triton", "cpp"])
def test_row_rule_at_the_ends_of_the_fp32_range(name):
    if name == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs a CUDA device or TRITON_INTERPRET=1")
    if name == "cpp" and not crh_kernels.available_backends()["cpp"][0]:
        pytest.skip(f"cpp backend unavailable: {crh_kernels.available_backends()['cpp'][1]}")
    x, mask, want = _rows_at_the_ends_of_fp32()
    norms = np.array([np.linalg.norm(r / np.abs(r).max()) * np.abs(r).max() if np.abs(r).max() > 0 else 0.0
                      for r in np.nan_to_num(x.double().numpy())])
    for normalize in (True, False):
        status, scale = _statuses_and_scales(name, x, mask, normalize)
        assert status == want[normalize], (name, normalize)
        valid = np.array(want[normalize]) == ROW_VALID
        expect = expected_scale(norms, valid, normalize)
        np.testing.assert_allclose(scale.double().numpy(), expect, rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------- matmul_rows
def test_matmul_rows_values():
    if crh_kernels.available_backends()["cpp"][0]:
        backends.get("cpp")  # loaded: the capability is used
    gen = torch.Generator().manual_seed(3)
    for n, k, m in [(1, 1, 1), (37, 300, 45), (128, 64, 130)]:
        x, w = torch.randn(n, k, generator=gen), torch.randn(k, m, generator=gen)
        out = backends.matmul_rows(x, w)
        ref = x.double().numpy() @ w.double().numpy()
        assert out.dtype == torch.float32 and out.shape == (n, m)
        err = np.linalg.norm(out.double().numpy() - ref) / max(np.linalg.norm(ref), 1e-30)
        assert err <= 1e-6, (n, k, m, err)


class _Recorder(Backend):
    name = "recorder"
    row_matmul = True

    def __init__(self, answer=True):
        self.calls = 0
        self.answer = answer

    def matmul_rows(self, x, w):
        self.calls += 1
        return torch.full((x.shape[0], w.shape[1]), 7.0) if self.answer else None


def test_matmul_rows_dispatch_and_fallbacks(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(backends, "_INSTANCES", {"recorder": rec})
    x, w = torch.randn(4, 3), torch.randn(3, 5)
    assert (backends.matmul_rows(x, w) == 7.0).all() and rec.calls == 1
    # autograd, other dtypes, other ranks: torch's matmul, the backend is not asked
    xg = x.clone().requires_grad_()
    y = backends.matmul_rows(xg, w)
    assert y.requires_grad and y.grad_fn is not None and torch.equal(y.detach(), x @ w)
    with torch.no_grad():
        assert (backends.matmul_rows(xg, w) == 7.0).all()  # outside autograd: it qualifies
    assert backends.matmul_rows(x.double(), w.double()).dtype == torch.float64
    assert backends.matmul_rows(x.half(), w.half()).dtype == torch.float16
    assert torch.equal(backends.matmul_rows(x[0], w), x[0] @ w)
    assert rec.calls == 2
    # a backend that is not loaded answers None: torch's matmul
    monkeypatch.setattr(backends, "_INSTANCES", {"recorder": _Recorder(answer=False)})
    assert torch.equal(backends.matmul_rows(x, w), x @ w)
    # a backend without the capability is never asked
    monkeypatch.setattr(backends, "_INSTANCES", {"minimal": _Minimal()})
    assert torch.equal(backends.matmul_rows(x, w), x @ w)


def test_cpp_matmul_rows_never_loads(monkeypatch):
    from crh_kernels.backends import cpp as cpp_mod

    monkeypatch.setattr(cpp_mod, "_LOADED", {})  # as in a process that never loaded it
    monkeypatch.setattr(cpp_mod, "load_extension",
                        lambda kind: pytest.fail("matmul_rows must not load the extension"))
    assert cpp_mod.CppBackend().matmul_rows(torch.randn(2, 3), torch.randn(3, 2)) is None
    assert not base.Backend.row_matmul
