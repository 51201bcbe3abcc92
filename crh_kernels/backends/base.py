"""The contract every backend implements: batch statistics of one call (SPEC §2).

A backend never sees the running state. It receives a 2-D view ``x`` of shape (N, D)
(any strides), an optional boolean row mask of shape (N,), and returns the batch's
``(n_b, n_skipped, μ_b, C_b)``; :class:`crh_kernels.Moments` merges that into the state.

Row rule, identical on every backend:
  * a row is *masked* when ``mask[i]`` is False: it counts nowhere, not even as skipped;
  * otherwise it is *skipped* (left out and counted in ``n_skipped``) when its squared
    norm, summed in fp32 (fp64 for fp64 input), is not finite, or, with
    ``normalize=True``, is zero;
  * every other row is *valid*: ``x̂ = x/||x||`` (or ``x`` when ``normalize=False``).

Returned: ``mean`` float64 (D,), ``scatter`` (D, D) exactly symmetric,
``Σ_valid (x̂ − μ_b)(x̂ − μ_b)ᵀ`` in fp32 or better. With no valid row, ``mean`` and
``scatter`` are zeros.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


class BatchStats(NamedTuple):
    n: int
    n_skipped: int
    mean: torch.Tensor
    scatter: torch.Tensor


class CrossStats(NamedTuple):
    n: int
    n_skipped: int
    mean_g: torch.Tensor
    mean_h: torch.Tensor
    scatter: torch.Tensor  # (Dg, Dh), Σ (ĝ − μ_g)(ĥ − μ_h)ᵀ, not symmetric


class Backend:
    """Base class; subclasses set ``name`` and implement the three methods. A backend may
    also offer ``update_state(x, mask, normalize, strict, n1, mean, scatter)``, merging the
    batch into a running state in place (see :class:`crh_kernels.backends.cpp.CppBackend`);
    :class:`crh_kernels.Moments` uses it when present and falls back to ``batch_stats``. With
    ``stage_rows`` and ``update_staged`` as well, the collector's row stager does pass 1 while
    it copies rows (:mod:`crh_kernels.collect.staging`)."""

    name: str = "?"
    #: dtypes of ``x`` the backend accepts
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

    def availability(self) -> Tuple[bool, str]:
        raise NotImplementedError

    def supports(self, device: torch.device) -> Tuple[bool, str]:
        """Whether tensors on ``device`` can be handled; the reason when not."""
        raise NotImplementedError

    def batch_stats(self, x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                    fp32_precision: str = "ieee") -> BatchStats:
        raise NotImplementedError

    def cross_stats(self, g: torch.Tensor, h: torch.Tensor, mask: Optional[torch.Tensor],
                    normalize: bool, fp32_precision: str = "ieee") -> CrossStats:
        raise NotImplementedError


def mirror_upper(c: torch.Tensor) -> torch.Tensor:
    """Exactly symmetric matrix from the upper triangle of ``c`` (the lower part is ignored,
    even if it holds garbage): never average two halves (SPEC §2)."""
    upper = torch.triu(c)
    return upper + torch.triu(upper, diagonal=1).transpose(0, 1)
