"""Test configuration shared by every test file.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before
triton is imported: that is done here, first thing. ``CRH_TEST_DEVICE=cuda`` (set by
bench/gpu_check.sh) runs the backend matrix on the GPU instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from ._ref import device_under_test  # noqa: E402


def pytest_report_header(config):
    import crh_kernels

    lines = [f"crh_kernels test device: {device_under_test()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"]
    for name, (ok, why) in crh_kernels.available_backends().items():
        lines.append(f"  backend {name:7s} {'available' if ok else 'unavailable'}: {why}")
    return lines


@pytest.fixture
def device():
    return torch.device(device_under_test())


@pytest.fixture(scope="module")
def one_thread():
    """Run a module with one torch thread (for test files of tiny tensors)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
