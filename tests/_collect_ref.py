"""Independent references for the collector tests (test_collector, test_hooks, test_attention,
test_checkpoint, test_selection).

They share no code with crh_kernels.collect: plain forward hooks that keep the tensors,
``retain_grad`` for gradients, and float64 covariances computed with numpy; plus the small models
those tests measure.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

RTOL = 2e-4   # fp32 activations/gradients against a float64 reference (docs/spec.md §2: ≤ 1e-4 on cov)


# ------------------------------------------------------------------------ float64 reference
def ref_stats(rows, mask=None, normalize=True):
    """(n, mean, cov) of the rows (R, D) in float64: masked rows dropped, rows normalized."""
    x = np.asarray(rows, dtype=np.float64).reshape(-1, np.shape(rows)[-1])
    if mask is not None:
        x = x[np.asarray(mask).reshape(-1)]
    if normalize:
        nrm = np.linalg.norm(x, axis=1)
        x = x[nrm > 0] / nrm[nrm > 0, None]
    mu = x.mean(0)
    y = x - mu
    return x.shape[0], mu, y.T @ y / x.shape[0]


def assert_stream(m, rows, mask=None, normalize=True, what=""):
    n, mu, cov = ref_stats(rows, mask, normalize)
    assert m is not None, f"{what}: stream missing"
    assert m.n == n, f"{what}: n={m.n}, reference {n}"
    got_mu = m.mean.double().cpu().numpy()
    got_cov = m.cov().double().cpu().numpy()
    scale = max(np.abs(mu).max(), 1e-30)
    assert np.abs(got_mu - mu).max() <= 1e-5 * scale + 1e-12, f"{what}: mean differs"
    err = np.linalg.norm(got_cov - cov) / np.linalg.norm(cov)
    assert err <= RTOL, f"{what}: relative cov error {err:.2e}"


def np64(t):
    return t.detach().double().cpu().numpy()


class Naive:
    """Plain forward hooks keeping every call's input and output (with retain_grad)."""

    def __init__(self, model, names):
        self.calls = {n: [] for n in names}
        self.handles = []
        mods = dict(model.named_modules())
        for n in names:
            self.handles.append(mods[n].register_forward_hook(self._hook(n)))

    def _hook(self, name):
        def hook(module, args, out):
            x = args[0]
            y = out[0] if isinstance(out, tuple) else out
            if x.requires_grad and not x.is_leaf:
                x.retain_grad()
            if y.requires_grad:
                y.retain_grad()
            self.calls[name].append((x, y))
        return hook

    def rows(self, name, what):
        """Concatenated rows (R, D) over the calls: what in h_a, h_b, g_a, g_b (input grads)."""
        out = []
        for x, y in self.calls[name]:
            t = {"h_a": x, "h_b": y, "g_a": x.grad, "g_b": y.grad}[what]
            out.append(np64(t).reshape(-1, t.shape[-1]))
        return np.concatenate(out)

    def remove(self):
        for h in self.handles:
            h.remove()


def hook_dicts_empty(model):
    for m in model.modules():
        for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if len(getattr(m, d)):
                return False
    return True



# ------------------------------------------------------------------------------- models
def mlp(inplace=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(inplace=inplace), nn.Linear(24, 16),
                         nn.Tanh(), nn.Linear(16, 5))


def batches(k, b=32, d=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g), torch.randn(b, 5, generator=g)) for _ in range(k)]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, (3, 2), stride=2, padding=(1, 0), bias=False)
        self.c3 = nn.Conv2d(8, 4, 3, padding="same", padding_mode="reflect")
        self.g = nn.Conv2d(4, 4, 1, groups=2)                 # unsupported: groups != 1
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.c3(F.relu(self.c2(F.relu(self.c1(x)))))
        return self.fc(self.g(F.relu(x)).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, d=16, h=4):
        super().__init__()
        torch.manual_seed(0)
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = nn.Identity()                           # per-head streams of the attention
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, keep):
        b, t, d = x.shape
        a = self.ln1(x)
        q, k, v = (f(a).view(b, t, self.h, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        att = self.heads(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.o(att)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
