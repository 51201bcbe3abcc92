"""How each supported module kind yields its rows: ``(h_a, h_b, W)`` and the gradient rows.

A *row* is one sample after flattening every leading dimension (docs/spec.md §1). Each adapter maps a
module's forward input/output (and the gradient of that output) to 2-D row matrices and gives the
layer's weight as the ``(D_out, D_in)`` matrix ``W`` of ``h_b = W h_a (+ b)``:

============  ===============================  ===============================  =====================
kind          h_a rows (R, D_in)               h_b / g_b rows (R, D_out)        W (D_out, D_in)
============  ===============================  ===============================  =====================
``linear``    input ``(..., D_in)``            output ``(..., D_out)``          ``weight``
``conv1d``    input ``(..., D_in)``            output ``(..., D_out)``          ``weight.T`` (HF GPT-2
                                                                                 ``Conv1D`` stores
                                                                                 ``(D_in, D_out)``)
``conv2d``    input patches (``F.unfold``),    output ``(B, C_out, H', W')`` as ``weight`` flattened to
              ``(B·H'·W', C_in·kh·kw)``        ``(B·H'·W', C_out)``             ``(C_out, C_in·kh·kw)``
============  ===============================  ===============================  =====================

Row order is always the flattening of the leading dims ``lead`` an adapter returns (conv2d:
``(B, H', W')``), so one row mask of shape ``lead`` applies to every stream of the call.

Also here: :class:`LinearSpy`, which lets the collector see the ``F.linear`` call through which
``nn.MultiheadAttention`` applies its ``out_proj`` (that call bypasses the ``out_proj`` module,
so no module hook ever fires for it).
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import matmul_rows

__all__ = ["Adapter", "LinearAdapter", "Conv1DAdapter", "Conv2dAdapter", "adapter_for",
           "is_hf_conv1d", "head_dim_of", "LinearSpy"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """The GPT-2-style ``Conv1D`` of HF transformers, recognised by class name (no import)."""
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


class Adapter:
    """Base class: one instance per module kind (stateless)."""

    kind: str = "?"

    def dims(self, module: nn.Module) -> Tuple[int, int]:
        """(D_in, D_out) without any bias column."""
        raise NotImplementedError

    def base_weight(self, module: nn.Module) -> torch.Tensor:
        """W as (D_out, D_in), detached, no bias column."""
        raise NotImplementedError

    def weight(self, module: nn.Module, include_bias: bool) -> torch.Tensor:
        """W, with the bias as an extra last column when ``include_bias`` and the module has one."""
        w = self.base_weight(module)
        if include_bias and _has_bias(module):
            w = torch.cat([w, module.bias.detach().to(w.dtype)[:, None]], dim=1)
        return w

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """h_a rows (R, D_in), no bias column."""
        raise NotImplementedError

    def output_rows(self, module: nn.Module, y: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...]]:
        """h_b rows (R, D_out) and the leading dims ``lead`` (prod(lead) == R); also used for g_b."""
        raise NotImplementedError

    def input_grad_is_g_a(self) -> bool:
        """Whether the gradient of the module's input tensor has the shape of the h_a rows (so a
        tensor hook on the input can give g_a)."""
        return True

    def g_a_from_g_b(self, module: nn.Module, gb: torch.Tensor, include_bias: bool) -> torch.Tensor:
        """g_a rows = g_b rows @ W (bias column included when ``include_bias``)."""
        w = self.weight(module, include_bias)
        return gb @ w.to(gb.dtype)

    def geometry(self, module: nn.Module):
        """Anything besides D_in that decides how the input becomes rows (for input dedup)."""
        return None


class LinearAdapter(Adapter):
    kind = "linear"

    def dims(self, module):
        return int(module.in_features), int(module.out_features)

    def base_weight(self, module):
        return module.weight.detach()

    def input_rows(self, module, x):
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, module, y):
        return y.reshape(-1, y.shape[-1]), tuple(y.shape[:-1])

    def g_a_from_g_b(self, module, gb, include_bias):
        out = matmul_rows(gb, self.base_weight(module).to(gb.dtype))
        if include_bias and _has_bias(module):
            out = torch.cat([out, gb @ module.bias.detach().to(gb.dtype)[:, None]], dim=1)
        return out


class Conv1DAdapter(LinearAdapter):
    """HF transformers' ``Conv1D``: ``y = x @ weight + bias`` with ``weight`` of shape (D_in, D_out)."""

    kind = "conv1d"

    def dims(self, module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)

    def base_weight(self, module):
        return module.weight.detach().t()


class Conv2dAdapter(Adapter):
    """``nn.Conv2d`` (groups == 1): positions are samples; h_a rows are input patches."""

    kind = "conv2d"

    def dims(self, module):
        kh, kw = module.kernel_size
        return int(module.in_channels * kh * kw), int(module.out_channels)

    def base_weight(self, module):
        return module.weight.detach().reshape(module.out_channels, -1)

    def input_rows(self, module, x):
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride)                      # (B, C·kh·kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])     # (B·L, C·kh·kw)

    def output_rows(self, module, y):
        if y.dim() == 3:
            y = y.unsqueeze(0)
        b, c, h, w = y.shape
        return y.permute(0, 2, 3, 1).reshape(-1, c), (b, h, w)

    def input_grad_is_g_a(self):
        return False  # dl/dx is (B, C, H, W), not in patch space: g_a = g_b @ W instead

    def geometry(self, module):
        return (tuple(module.kernel_size), tuple(module.stride), str(module.padding),
                tuple(module.dilation), module.padding_mode)


_LINEAR = LinearAdapter()
_CONV1D = Conv1DAdapter()
_CONV2D = Conv2dAdapter()


def adapter_for(module: nn.Module) -> Tuple[Optional[Adapter], str]:
    """The adapter of a module, or (None, reason) when the module is not a supported layer."""
    if isinstance(module, nn.Linear):
        return _LINEAR, ""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None, f"Conv2d with groups={module.groups} (only groups=1 is supported)"
        return _CONV2D, ""
    if is_hf_conv1d(module):
        return _CONV1D, ""
    return None, f"{type(module).__name__} is not a supported layer (nn.Linear, nn.Conv2d, " \
                 f"HF Conv1D, nn.MultiheadAttention)"


def head_dim_of(module: nn.Module) -> Optional[int]:
    """Best guess of the feature dim D of a module's output before it has run (for memory plans)."""
    if isinstance(module, nn.MultiheadAttention):
        return int(module.embed_dim)
    ad, _ = adapter_for(module)
    if ad is not None:
        return ad.dims(module)[1]
    for attr in ("all_head_size", "embed_dim", "hidden_size", "out_features", "d_model", "dim"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


class LinearSpy:
    """See ``F.linear(input, weight, bias)`` calls made with a given weight tensor.

    ``nn.MultiheadAttention`` applies ``out_proj`` as ``F.linear(attn, out_proj.weight, ...)``
    inside ``F.multi_head_attention_forward`` (a global-name lookup in ``torch.nn.functional``),
    never through the ``out_proj`` module. While at least one watch is active, that global is
    replaced by a thin wrapper that calls the original and then ``callback(input, output)`` when
    ``weight`` is a watched tensor; the original is put back when the last watch ends. The
    collector opens a watch in an MHA forward pre-hook and closes it in an ``always_call`` forward
    hook, so the wrapper is only installed for the duration of an MHA forward.
    """

    _lock = threading.RLock()
    _watch: Dict[int, Callable] = {}
    _depth = 0
    _orig = None

    @classmethod
    def _spy(cls, input, weight, bias=None):
        out = cls._orig(input, weight, bias)
        cb = cls._watch.get(id(weight))
        if cb is not None:
            cb(input, out)
        return out

    @classmethod
    def enter(cls, weight: torch.Tensor, callback: Callable) -> None:
        with cls._lock:
            if cls._depth == 0:
                cls._orig = F.linear
                F.linear = cls._spy
            cls._depth += 1
            cls._watch[id(weight)] = callback

    @classmethod
    def exit(cls, weight: torch.Tensor) -> None:
        with cls._lock:
            if cls._watch.pop(id(weight), None) is None:
                return
            cls._depth -= 1
            if cls._depth == 0:
                F.linear = cls._orig
                cls._orig = None
