"""The experiments' models, written here (torchvision and timm are not dependencies).

* :class:`FCNet` — fully connected nets of fc1/fc2 (layers named ``layers.0`` …).
* :class:`ResNet18` — ResNet-18 with a width multiplier and the CIFAR stem (3×3 conv,
  stride 1, no max-pool), four stages of two basic blocks, then two fully connected
  layers ``fc1`` (penultimate, with ReLU) and ``fc2`` (output), as in the paper's res1.
* :class:`GPT` — a GPT-2-style decoder: pre-LayerNorm blocks of causal multi-head
  attention (``blocks.i.attn.qkv``, ``blocks.i.attn.proj``) and a GELU MLP
  (``blocks.i.mlp.fc``, ``blocks.i.mlp.proj``), learned positions, tied output head.
  The per-head attention outputs pass through ``blocks.i.attn.heads`` (an identity) on their
  way into ``blocks.i.attn.proj``, so that the collector can split them per head.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_ACTS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu}


class FCNet(nn.Module):
    """``depth`` Linear layers: d_in → width → … → width → d_out, activation between them."""

    def __init__(self, d_in: int, width: int, depth: int, d_out: int, activation: str = "relu"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {sorted(_ACTS)}, got {activation!r}")
        dims = [d_in] + [width] * (depth - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTS[self.activation]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = act(x)
        return x

    def layer_names(self, hidden_only: bool = False) -> list:
        n = len(self.layers)
        return [f"layers.{i}" for i in range(n - 1 if hidden_only else n)]


# ----------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR stem, channels ``round(64·width)·(1, 2, 4, 8)``, head
    ``avgpool → fc1 (C→C) → ReLU → fc2 (C→num_classes)`` (res1's two FC layers)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        base = max(int(round(64 * width)), 1)
        chans = [base, 2 * base, 4 * base, 8 * base]
        self.conv1 = nn.Conv2d(in_channels, base, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        stages = []
        c_in = base
        for i, (c, n) in enumerate(zip(chans, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(c_in, c, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc1 = nn.Linear(c_in, c_in)
        self.fc2 = nn.Linear(c_in, num_classes)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.features(x))))


# ----------------------------------------------------------------------------- GPT
class HeadOutput(nn.Identity):
    """Identity marking the concatenated per-head attention outputs ``(B, T, n_heads·head_dim)``
    (head h in features ``[h·hd, (h+1)·hd)``), so that a collector can split its output into
    heads (``heads={"blocks.i.attn.heads": n_heads}``). ``dim`` tells its width before any run."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.heads = HeadOutput(d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        shape = (B, T, self.n_heads, C // self.n_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        # (B, T, n_heads·head_dim): head h occupies features [h·hd, (h+1)·hd)
        y = self.heads(y.transpose(1, 2).contiguous().view(B, T, C))
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2-style decoder-only transformer (pre-LN, learned positions, tied head)."""

    def __init__(self, vocab_size: int, context: int, d_model: int = 768, n_layers: int = 12,
                 n_heads: int = 12, dropout: float = 0.0):
        super().__init__()
        self.context = context
        self.n_heads = n_heads
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        B, T = idx.shape
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def attention_outputs(self) -> dict:
        """``{module name: n_heads}`` of the modules whose output is the concatenated per-head
        attention output (for the collector's ``heads=``)."""
        return {f"blocks.{i}.attn.heads": self.n_heads for i in range(len(self.blocks))}


def count_parameters(model: nn.Module) -> int:
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
