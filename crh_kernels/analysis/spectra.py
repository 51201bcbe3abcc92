"""Spectra, power-law exponents and commutation of a layer's matrices (docs/spec.md §4, the PAH).

Owns: the robust symmetric eigendecomposition :func:`eigh` (float64, descending, CPU fallback),
:func:`effective_rank`, the exponent fit :func:`fit_exponents` (``h ~ z^p``, ``g ~ z^q`` in W's
singular basis, plus the forward slope and the sorted-spectrum pairing the paper plots), the
pairing slope :func:`pairing_fit` (log λ_H against log λ_G by rank, the paper's Fig. 3), and
:func:`commutation_error` (how far the exponents can be trusted), and :func:`identity_residual`
(how far a layer's matrices are from ``H_b = W H_a Wᵀ`` and ``G_a = Wᵀ G_b W``, the identities
the (p, q) lines rest on). Every fit of the package
lives here: the report and the figures call these and fit nothing themselves. It only measures;
naming the phase a measured ``(p, q)`` belongs to is :mod:`crh_kernels.analysis.phases`.

All logs are natural logs; all arithmetic is float64, on the inputs' device when it works.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .align import _as_f64, alignment

__all__ = ["eigh", "effective_rank", "fit_exponents", "pairing_fit", "commutation_error", "LineFit",
           "ExponentFit", "identity_residual"]


# ------------------------------------------------------------------------------------ helpers
def _matrix(x, name: str, device=None, square: bool = True) -> torch.Tensor:
    t = _as_f64(x, name, device=device)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(t.shape)}")
    if square and t.shape[0] != t.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} non-finite entr{'y' if bad == 1 else 'ies'} (NaN or "
                         f"inf); a decomposition needs finite values")
    return t


# The first attempt runs torch on the tensor's own device; the fallback is numpy's LAPACK on
# the CPU, a second, independent implementation (so it is a real second chance even when the
# input already was on the CPU). Kept as module functions so that tests can make the first fail.
def _eigh_on_device(m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.linalg.eigh(m)


def _eigh_cpu(m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    w, v = np.linalg.eigh(m.cpu().numpy())
    return torch.from_numpy(w).to(m.device), torch.from_numpy(v).to(m.device)


def _svd_on_device(w: torch.Tensor, full: bool):
    return torch.linalg.svd(w, full_matrices=full)


def _svd_cpu(w: torch.Tensor, full: bool):
    u, s, vh = np.linalg.svd(w.cpu().numpy(), full_matrices=full)
    return tuple(torch.from_numpy(a).to(w.device) for a in (u, s, vh))


def _with_fallback(what: str, on_device, on_cpu, *args):
    try:
        return on_device(*args)
    except RuntimeError as first:  # torch.linalg.LinAlgError and cuSOLVER/MAGMA errors
        warnings.warn(f"{what} failed on {args[0].device} ({first}); retrying with numpy on the CPU",
                      RuntimeWarning, stacklevel=3)
        try:
            return on_cpu(*args)
        except np.linalg.LinAlgError as second:
            raise RuntimeError(f"{what} failed on {args[0].device} ({first}) and on the CPU "
                               f"({second})") from second


def _svd(w: torch.Tensor, full: bool = False):
    return _with_fallback("svd", _svd_on_device, _svd_cpu, w, full)


# ------------------------------------------------------------------------------- eigen stuff
def eigh(M) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition in float64: ``(evals, evecs)``, evals DESCENDING,
    ``evecs[:, i]`` the eigenvector of ``evals[i]``.

    ``M`` is symmetrized as ``(M + Mᵀ)/2`` first (accumulated matrices are symmetric only up to
    rounding). Runs on ``M``'s device; if that fails (e.g. a cuSOLVER convergence error) it warns
    and retries with numpy on the CPU, returning the result on ``M``'s device.

    Raises:
        ValueError: ``M`` is not a non-empty square 2-D matrix, or has NaN/inf entries.
    """
    m = _matrix(M, "M")
    m = (m + m.T) / 2
    w, v = _with_fallback("eigh", _eigh_on_device, _eigh_cpu, m)
    return w.flip(0), v.flip(1)


def _eigvals_desc(M, name: str) -> np.ndarray:
    m = _matrix(M, name)
    w, _ = _with_fallback("eigh", _eigh_on_device, _eigh_cpu, (m + m.T) / 2)
    return w.flip(0).cpu().numpy()


def effective_rank(M) -> float:
    """Effective rank (Roy & Vetterli, 2007) of a symmetric PSD matrix:
    ``exp(−Σ p_i log p_i)`` with ``p_i = λ_i / Σ_j λ_j`` the normalized eigenvalues.

    Negative eigenvalues (rounding, or an indefinite input) are clipped to 0 first; ``0·log 0``
    counts as 0. A rank-k projector gives k, the identity gives d, and a matrix with no positive
    eigenvalue (e.g. zero) gives 0.0.
    """
    lam = np.clip(_eigvals_desc(M, "M"), 0.0, None)
    total = lam.sum()
    if total <= 0.0:
        return 0.0
    p = lam[lam > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


# ------------------------------------------------------------------------------ line fitting
def _nan_to_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


@dataclass
class LineFit:
    """Least-squares line ``y ≈ slope·x + intercept`` (natural logs), with R² and the number of
    modes used. ``x_span`` = max(x) − min(x): when it is ≤ the fit's ``flat_span`` the regressor
    is flat (e.g. z of a projection) and slope/intercept/R² are NaN (undefined)."""

    slope: float
    intercept: float
    r2: float
    n_modes: int
    x_span: float = float("nan")

    def to_dict(self) -> dict:
        return {k: _nan_to_none(v) for k, v in asdict(self).items()}


def _fit_line(x: np.ndarray, y: np.ndarray, flat_span: float) -> LineFit:
    n = int(x.size)
    nan = float("nan")
    if n < 2:  # a line needs two points
        return LineFit(nan, nan, nan, n, 0.0 if n else nan)
    x_span = float(x.max() - x.min())
    if x_span <= flat_span:
        return LineFit(nan, nan, nan, n, x_span)
    xm, ym = x.mean(), y.mean()
    dx, dy = x - xm, y - ym
    slope = float((dx * dy).sum() / (dx * dx).sum())
    intercept = float(ym - slope * xm)
    ss_tot = float((dy * dy).sum())
    ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
    # A y that is flat to within flat_span is fitted exactly by slope ≈ 0: call that R² = 1
    # rather than 1 − (rounding noise)/(rounding noise), which is arbitrary.
    if float(y.max() - y.min()) <= flat_span:
        r2 = 1.0
    else:
        r2 = 1.0 - ss_res / ss_tot
    return LineFit(slope, intercept, r2, n, x_span)


@dataclass
class ExponentFit:
    """Result of :func:`fit_exponents`.

    Fields: ``p`` (log h vs log z), ``q`` (log g vs log z), ``forward`` (log u_iᵀH_bu_i vs
    log u_iᵀG_bu_i, or None without H_b and G_b), ``pairing`` (sorted spectra, descending, for the
    λ_H,i vs λ_G,i plot), the per-mode ``z``, ``h``, ``g`` (all min(D_out, D_in) modes, in
    descending z), ``commutation`` = commutation_error(W, H_a); extras: ``support`` (bool mask of
    the modes fitted), ``hb``, ``gb`` (forward diagonals, or None).
    """

    p: LineFit
    q: LineFit
    forward: Optional[LineFit]
    pairing: Dict[str, np.ndarray]
    z: np.ndarray
    h: np.ndarray
    g: np.ndarray
    commutation: float
    support: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    hb: Optional[np.ndarray] = None
    gb: Optional[np.ndarray] = None

    def to_dict(self) -> dict:
        """JSON-ready: arrays become lists and NaN/inf become None (strict JSON has no NaN)."""
        def arr(a):
            if a is None:
                return None
            return [_nan_to_none(float(v)) if a.dtype.kind == "f" else v.item() for v in a]

        return {
            "p": self.p.to_dict(),
            "q": self.q.to_dict(),
            "forward": None if self.forward is None else self.forward.to_dict(),
            "pairing": {k: arr(v) for k, v in self.pairing.items()},
            "z": arr(self.z), "h": arr(self.h), "g": arr(self.g),
            "commutation": _nan_to_none(float(self.commutation)),
            "support": arr(self.support), "hb": arr(self.hb), "gb": arr(self.gb),
        }


def _quad_diag(basis: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """b_iᵀ M b_i for every column b_i of ``basis``."""
    return ((M @ basis) * basis).sum(0)


def _above_floor(x: np.ndarray, floor: float) -> np.ndarray:
    top = x.max() if x.size else 0.0
    return (x > 0) & (x > floor * top)


def _layer_matrices(W, H_a, G_a, H_b, G_b):
    """``(w, {"H_a": .., "G_a": .., "H_b": .., "G_b": ..})``: W and the layer's matrices as
    float64, each checked against W's sides (H_a, G_a D_in×D_in; H_b, G_b D_out×D_out) and
    symmetrized; a matrix given as None stays None."""
    w = _matrix(W, "W", square=False)
    d_out, d_in = w.shape
    mats = {}
    for name, m, d in (("H_a", H_a, d_in), ("G_a", G_a, d_in), ("H_b", H_b, d_out),
                       ("G_b", G_b, d_out)):
        if m is None:
            mats[name] = None
            continue
        t = _matrix(m, name, device=w.device)
        if t.shape[0] != d:
            side = "D_in" if name.endswith("_a") else "D_out"
            raise ValueError(f"{name} must be {side}×{side} = {d}×{d} for W of shape "
                             f"{tuple(w.shape)}, got {tuple(t.shape)}")
        mats[name] = (t + t.T) / 2
    return w, mats


def fit_exponents(W, H_a, G_a, H_b=None, G_b=None, *, floor: float = 1e-6,
                  flat_span: float = 1e-6) -> ExponentFit:
    """Fit ``h ~ z^p`` and ``g ~ z^q`` in W's singular basis (docs/spec.md §4).

    ``W = U S Vᵀ`` (D_out×D_in), ``z_i = s_i²``, ``h_i = v_iᵀ H_a v_i``, ``g_i = v_iᵀ G_a v_i``.
    p and q are least-squares slopes of ``log h`` and ``log g`` against ``log z`` over the
    support: the modes with ``z > floor·max z`` and ``h > floor·max h > 0`` and
    ``g > floor·max g > 0`` (one support for both, so that p and q describe the same subspace).

    With ``H_b`` and ``G_b`` (D_out×D_out) also the forward slope: ``log u_iᵀH_bu_i`` against
    ``log u_iᵀG_bu_i`` over the same support (further restricted to positive values above the
    floor); this is the "forward slope" column of docs/spec.md §4's phase table (NaN where G_b is flat).

    Args:
        floor: relative floor for z, h, g (and the forward diagonals).
        flat_span: a regressor whose log-range (max − min of its natural log over the support)
            is ≤ this is flat: that fit's slope is NaN (z of a projection; G_b of backward CRH).

    Raises:
        ValueError: wrong shapes (H_a, G_a must be D_in×D_in; H_b, G_b D_out×D_out), non-finite
            entries, or bad floor.
    """
    if not (0.0 <= floor < 1.0):
        raise ValueError(f"floor must be in [0, 1), got {floor!r}")
    if not flat_span >= 0.0:
        raise ValueError(f"flat_span must be ≥ 0, got {flat_span!r}")
    w, mats = _layer_matrices(W, H_a, G_a, H_b, G_b)
    if mats["H_a"] is None or mats["G_a"] is None:
        raise ValueError("H_a and G_a are required (got None)")

    u, s, vh = _svd(w)
    v = vh.T
    z = (s * s).cpu().numpy()
    h = _quad_diag(v, mats["H_a"]).cpu().numpy()
    g = _quad_diag(v, mats["G_a"]).cpu().numpy()
    support = _above_floor(z, floor) & _above_floor(h, floor) & _above_floor(g, floor)
    lz = np.log(z[support])
    p = _fit_line(lz, np.log(h[support]), flat_span)
    q = _fit_line(lz, np.log(g[support]), flat_span)

    forward = hb = gb = None
    if mats["H_b"] is not None and mats["G_b"] is not None:
        hb = _quad_diag(u, mats["H_b"]).cpu().numpy()
        gb = _quad_diag(u, mats["G_b"]).cpu().numpy()
        sf = support & _above_floor(hb, floor) & _above_floor(gb, floor)
        forward = _fit_line(np.log(gb[sf]), np.log(hb[sf]), flat_span)

    pairing = {"lambda_H": _eigvals_desc(mats["H_a"], "H_a"),
               "lambda_G": _eigvals_desc(mats["G_a"], "G_a")}
    if mats["H_b"] is not None:
        pairing["lambda_Hb"] = _eigvals_desc(mats["H_b"], "H_b")
    if mats["G_b"] is not None:
        pairing["lambda_Gb"] = _eigvals_desc(mats["G_b"], "G_b")

    return ExponentFit(p=p, q=q, forward=forward, pairing=pairing, z=z, h=h, g=g,
                       commutation=commutation_error(w, mats["H_a"], side="a"),
                       support=support, hb=hb, gb=gb)


# --------------------------------------------------------------------------- spectrum pairing
def pairing_fit(lam_h, lam_g, floor: float = 1e-6):
    """``(slope, intercept)`` of log λ_H,i against log λ_G,i over the sorted spectra (the paper's
    Fig. 3 scatter), over the ranks where both are finite and above ``floor`` times their maximum;
    None with fewer than 3 such ranks or a flat λ_G."""
    h = np.asarray(lam_h, dtype=float)
    g = np.asarray(lam_g, dtype=float)
    k = min(h.size, g.size)
    if k == 0:
        return None
    h, g = h[:k], g[:k]
    ok = np.isfinite(h) & np.isfinite(g) & (h > 0) & (g > 0)
    if ok.sum() < 3:
        return None
    ok &= (h > floor * h[ok].max()) & (g > floor * g[ok].max())
    if ok.sum() < 3:
        return None
    x, y = np.log(g[ok]), np.log(h[ok])
    if float(x.max() - x.min()) <= 1e-9:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


# ---------------------------------------------------------------------------- commutation
def commutation_error(W, H, *, side: Optional[str] = None, rtol: float = 1e-8) -> float:
    """Off-diagonal energy fraction of H in W's singular basis: ``||offdiag(BᵀHB)||_F² /
    ||BᵀHB||_F²``, with B = V (right singular vectors, full D_in×D_in) when H is D_in×D_in and
    B = U (left, full D_out×D_out) when H is D_out×D_out. 0 iff H commutes with WᵀW (resp. WWᵀ).

    "Off-diagonal" means between different eigenspaces of Z: entries ``(i, j)`` with
    ``|z_i − z_j| ≤ rtol·max z`` count as diagonal. This only matters for repeated singular
    values, where the singular basis is arbitrary: the null space of W (z = 0, e.g. beyond
    min(D_out, D_in) or a rank-deficient W) and the flat z of a projection. The denominator is
    ``||H||_F²`` (basis-independent). Returns 0.0 for H = 0.

    Args:
        side: ``"a"`` (use V) or ``"b"`` (use U); by default chosen from H's size, V when W is
            square.
        rtol: relative tolerance for "same eigenvalue of Z".
    """
    w = _matrix(W, "W", square=False)
    hm = _matrix(H, "H", device=w.device)
    d_out, d_in = w.shape
    n = hm.shape[0]
    if side is None:
        side = "a" if n == d_in else ("b" if n == d_out else None)
        if side is None:
            raise ValueError(f"H must be D_in×D_in = {d_in}×{d_in} or D_out×D_out = "
                             f"{d_out}×{d_out} for W of shape {tuple(w.shape)}, got {tuple(hm.shape)}")
    elif side not in ("a", "b"):
        raise ValueError(f"side must be 'a' (H is D_in×D_in), 'b' (D_out×D_out) or None, got {side!r}")
    want = d_in if side == "a" else d_out
    if n != want:
        raise ValueError(f"side={side!r} needs H of shape {want}×{want} for W of shape "
                         f"{tuple(w.shape)}, got {tuple(hm.shape)}")
    if not rtol >= 0.0:
        raise ValueError(f"rtol must be ≥ 0, got {rtol!r}")
    u, s, vh = _svd(w, full=True)
    basis = vh.T if side == "a" else u
    z = torch.zeros(n, dtype=torch.float64, device=w.device)
    # Numerical rank: singular values below the usual LAPACK tolerance are the null space.
    s = torch.where(s > max(d_out, d_in) * torch.finfo(torch.float64).eps * s.max(), s,
                    torch.zeros_like(s))
    z[: s.numel()] = s * s
    m = basis.T @ ((hm + hm.T) / 2) @ basis
    total = float(m.square().sum())
    if total == 0.0:
        return 0.0
    same = (z[:, None] - z[None, :]).abs() <= rtol * float(z.max())
    off = float(m.square().masked_fill(same, 0.0).sum())
    return off / total


# ---------------------------------------------------------------------------- identities
def _one_identity(B: torch.Tensor, M: torch.Tensor) -> dict:
    nb = float(torch.linalg.matrix_norm(B))
    nm = float(torch.linalg.matrix_norm(M))
    nan = float("nan")
    if nb == 0.0:
        return {"residual": nan, "scale": nan, "alpha": nan}
    dot = float((B * M).sum())
    if nm == 0.0 or dot <= 0.0:
        residual, scale = 1.0, 0.0            # the best c ≥ 0 is 0
    else:
        cos = min(1.0, dot / (nb * nm))
        residual = math.sqrt(max(0.0, 1.0 - cos * cos))
        scale = dot / (nm * nm)
    with warnings.catch_warnings():      # a constant B or M (a 1×1 H_b): α is NaN, said once
        warnings.simplefilter("ignore")  # by the six relations, not again here
        alpha = alignment(B, M)
    return {"residual": residual, "scale": scale, "alpha": alpha}


def identity_residual(W, H_a=None, H_b=None, G_a=None, G_b=None) -> Dict[str, Optional[dict]]:
    """How far a layer's matrices are from the identities ``H_b = W H_a Wᵀ`` and
    ``G_a = Wᵀ G_b W`` (docs/spec.md §4, "Which moments the lines are about").

    For each identity ``B ≟ M`` (``B = H_b, M = W H_a Wᵀ``; ``B = G_a, M = Wᵀ G_b W``):

    * ``residual = min over c ≥ 0 of ‖B − c·M‖_F / ‖B‖_F`` = ``sqrt(1 − cos²)``, with
      ``cos = ⟨B, M⟩_F / (‖B‖_F ‖M‖_F)`` (1 when ``cos ≤ 0``). The overall factor is left out
      because the (p, q) lines are about proportionality: a factor moves no exponent (it
      differs anyway between normalized sides). 0 when the identity holds up to a factor;
      residual r means the best multiple of M misses B by r of its Frobenius norm;
    * ``scale``: that best c (1 for raw moments where the identity holds exactly);
    * ``alpha``: α(B, M) (docs/spec.md §3), the same comparison in the paper's measure.

    Float64 throughout. An identity whose matrices are not all given is None; ``B = 0`` gives
    NaN for all three; α of a constant matrix (e.g. a 1×1 H_b) is NaN, without a warning.

    Returns:
        ``{"H_b": {"residual", "scale", "alpha"} or None, "G_a": ... or None}``.

    Raises:
        ValueError: wrong shapes (H_a, G_a must be D_in×D_in, H_b, G_b D_out×D_out for W of
            shape (D_out, D_in)) or non-finite entries.
    """
    w, mats = _layer_matrices(W, H_a, G_a, H_b, G_b)
    out: Dict[str, Optional[dict]] = {"H_b": None, "G_a": None}
    if mats["H_a"] is not None and mats["H_b"] is not None:
        out["H_b"] = _one_identity(mats["H_b"], w @ mats["H_a"] @ w.T)
    if mats["G_b"] is not None and mats["G_a"] is not None:
        out["G_a"] = _one_identity(mats["G_a"], w.T @ mats["G_b"] @ w)
    return out
