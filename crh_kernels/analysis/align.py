"""Alignment α between matrices (docs/spec.md §3, paper eq. 11) and the six CRH relations of a layer.

Owns: the Pearson-correlation alignment :func:`alignment`, the per-layer table of the six
relations :func:`six_alignments`, and the significance baseline :func:`random_baseline` (per
relation at a layer's own effective ranks: :func:`relation_baselines`).
Everything is computed in float64 on the device the inputs live on; nothing here accumulates
statistics (that is :class:`crh_kernels.Moments`) or interprets them (that is
:mod:`crh_kernels.analysis.phases`).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Dict, Optional

import torch

__all__ = ["alignment", "six_alignments", "random_baseline", "relation_baselines", "RELATIONS",
           "RELATION_MATRICES", "KINDS", "effective_rank_of_spectrum"]

#: The six relation names, in the order the report prints them (docs/spec.md §3 table).
RELATIONS = ("forward_RGA", "forward_RWA", "forward_GWA",
             "backward_RGA", "backward_RWA", "backward_GWA")

#: Which matrix view of a :class:`~crh_kernels.Moments` the six relations use.
KINDS = ("cov", "second_moment")


def _as_f64(x, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
    """``x`` as a detached float64 tensor (on ``device`` if given, else where it lives).

    MPS has no float64, so such tensors are computed on the CPU instead.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(x)
        except Exception as exc:  # numpy arrays, nested lists... anything else is a usage error
            raise TypeError(f"{name} must be a torch.Tensor (or array-like of numbers), got "
                            f"{type(x).__name__}") from exc
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if device is not None:
        t = t.to(device)
    if t.device.type == "mps":
        t = t.cpu()
    return t.to(torch.float64)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} non-finite entr{'y' if bad == 1 else 'ies'} (NaN or "
                         f"inf) out of {t.numel()}; α needs finite matrices")


def alignment(A, B) -> float:
    """α(A, B): Pearson correlation of the entries of ``A`` and ``B`` (docs/spec.md §3, eq. 11).

    ``α = (mean(A∘B) − mean(A)·mean(B)) / (std(A)·std(B))`` with population std, in float64.
    α is symmetric, invariant to positive scaling of either argument (a negative scale flips
    its sign) and, being a Pearson correlation, also to adding a constant to every entry: so
    α = ±1 iff ``A = c·B + d`` (the spec's "iff A = c·B" holds up to that common shift).

    Args:
        A, B: tensors (or array-likes) of the same shape, usually d×d. ``B`` is moved to
            ``A``'s device when they differ.

    Returns:
        α as a Python float in [−1, 1]; ``nan`` when either matrix is constant (all entries
        equal: its std is 0 so the correlation is 0/0), with a RuntimeWarning naming it.

    Raises:
        ValueError: shapes differ, an argument is empty, or an entry is NaN/inf.
    """
    a = _as_f64(A, "A")
    b = _as_f64(B, "B", device=a.device)
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"A and B must have the same shape, got A {tuple(a.shape)} and "
                         f"B {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError(f"A and B must be non-empty, got shape {tuple(a.shape)}")
    _check_finite(a, "A")
    _check_finite(b, "B")
    # Exact constancy (max == min) rather than "std below a tolerance": a matrix that varies at
    # all has a well-defined α; only an exactly constant one makes the formula 0/0.
    constant = [name for name, t in (("A", a), ("B", b)) if bool(t.max() == t.min())]
    if constant:
        which = " and ".join(constant)
        warnings.warn(f"alignment: {which} {'is' if len(constant) == 1 else 'are'} constant (every "
                      f"entry equal), so its standard deviation is 0 and the Pearson correlation α "
                      f"is undefined (0/0); returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    # Two-pass: centre first, then correlate (no E[ab] − E[a]E[b] cancellation).
    ac = a - a.mean()
    bc = b - b.mean()
    num = float((ac * bc).sum())
    den = math.sqrt(float(ac.square().sum()) * float(bc.square().sum()))
    if den == 0.0:  # only reachable by underflow of tiny spreads: still 0/0
        warnings.warn("alignment: the spread of A or B underflows float64; α is undefined, "
                      "returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    return max(-1.0, min(1.0, num / den))


def _view(m, kind: str, what: str) -> Optional[torch.Tensor]:
    """The matrix of one stream: None if missing (None, or a Moments that saw no rows)."""
    if m is None:
        return None
    if isinstance(m, torch.Tensor):  # convenience: an already-computed matrix
        return m
    n = getattr(m, "n", None)
    if n is not None and int(n) == 0:
        return None
    fn = getattr(m, kind, None)
    if not callable(fn):
        raise TypeError(f"layer.{what} must be a crh_kernels.Moments (with a {kind}() method), a "
                        f"tensor or None; got {type(m).__name__}")
    return fn()


def _weight_gram(layer, what: str) -> Optional[torch.Tensor]:
    fn = getattr(layer, what, None)
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"layer.{what} must be a method returning a tensor or None, got "
                        f"{type(fn).__name__}")
    return fn()


def six_alignments(layer, kind: str = "cov") -> Dict[str, float]:
    """The six CRH alignments of one layer (docs/spec.md §3 table).

    Args:
        layer: duck-typed; attributes ``H_a, H_b, G_a, G_b`` (each a :class:`crh_kernels.Moments`,
            a ready matrix tensor, or None) and methods ``Z_a()`` (WᵀW, D_in×D_in) and ``Z_b()``
            (WWᵀ, D_out×D_out) returning tensors or None (no weight).
        kind: ``"cov"`` (the paper's headline: ``cov(x̂)``) or ``"second_moment"`` (appendix C.2:
            ``E[x̂x̂ᵀ]``).

    Returns:
        ``{"forward_RGA": α(H_b, G_b), "forward_RWA": α(H_b, Z_b), "forward_GWA": α(G_b, Z_b),
        "backward_RGA": α(H_a, G_a), "backward_RWA": α(H_a, Z_a), "backward_GWA": α(G_a, Z_a)}``.
        A relation whose matrices are missing (None, or a Moments with n == 0) is NaN; a constant
        matrix also gives NaN (with :func:`alignment`'s warning). Mismatched shapes still raise.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    H_a = _view(getattr(layer, "H_a", None), kind, "H_a")
    H_b = _view(getattr(layer, "H_b", None), kind, "H_b")
    G_a = _view(getattr(layer, "G_a", None), kind, "G_a")
    G_b = _view(getattr(layer, "G_b", None), kind, "G_b")
    Z_a = _weight_gram(layer, "Z_a")
    Z_b = _weight_gram(layer, "Z_b")
    pairs = {
        "forward_RGA": (H_b, G_b, "H_b", "G_b"),
        "forward_RWA": (H_b, Z_b, "H_b", "Z_b"),
        "forward_GWA": (G_b, Z_b, "G_b", "Z_b"),
        "backward_RGA": (H_a, G_a, "H_a", "G_a"),
        "backward_RWA": (H_a, Z_a, "H_a", "Z_a"),
        "backward_GWA": (G_a, Z_a, "G_a", "Z_a"),
    }
    out: Dict[str, float] = {}
    for rel in RELATIONS:
        x, y, nx, ny = pairs[rel]
        if x is None or y is None:
            out[rel] = float("nan")
            continue
        try:
            out[rel] = alignment(x, y)
        except ValueError as exc:  # say which of the layer's matrices "A" and "B" were
            raise ValueError(f"{rel} = α(A={nx}, B={ny}): {exc}") from exc
    return out


def _alpha_of_factors(A1, C1, A2, C2) -> float:
    """α(M1, M2) for ``M = A C Aᵀ`` (A: d×k, C: k×k symmetric), without forming the d×d
    matrices: Σ M = sᵀ C s with s = Aᵀ1, Σ M∘M = tr(C G C G) with G = AᵀA and
    Σ M1∘M2 = tr(C1 X C2 Xᵀ) with X = A1ᵀ A2 — O(d·k²) instead of O(d²·k) (float64)."""
    d = A1.shape[0]
    nn = float(d * d)

    def sums(A, C):
        s = A.sum(0)
        G = A.T @ A
        CG = C @ G
        return float(s @ C @ s), float((CG * CG.T).sum())

    t1, q1 = sums(A1, C1)
    t2, q2 = sums(A2, C2)
    X = A1.T @ A2
    cross = float(((C1 @ X) * (X @ C2)).sum())
    m1, m2 = t1 / nn, t2 / nn
    v1, v2 = q1 / nn - m1 * m1, q2 / nn - m2 * m2
    if v1 <= 0.0 or v2 <= 0.0:
        return float("nan")
    return max(-1.0, min(1.0, (cross / nn - m1 * m2) / math.sqrt(v1 * v2)))


def random_baseline(dim: int, rank: int, *, rank_b: Optional[int] = None, trials: int = 20,
                    seed: int = 0) -> float:
    """Mean α between the covariances of two independent rank-``rank`` random projections of an
    isotropic Gaussian in ``dim`` dimensions (the paper's significance baseline, section 6).

    How (exact covariances, no sampling): per trial draw ``A, B`` of shape (dim, rank) with i.i.d.
    N(0, 1) entries and take the random rank-``rank`` linear map ``P = A Bᵀ`` (dim×dim). For
    ``x ~ N(0, I_dim)`` the covariance of ``P x`` is exactly ``P Pᵀ = A (BᵀB) Aᵀ``. α is taken
    between two independent such covariances and averaged over ``trials`` pairs (float64, CPU,
    seeded). ``rank_b`` (default ``rank``) is the rank of the second projection: a relation
    between two matrices of different effective ranks is compared with random covariances of
    those two ranks (:func:`relation_baselines`). α is computed from the k×k factors
    (:func:`_alpha_of_factors`), identical to α of the d×d matrices up to rounding.

    This reproduces the paper's "≈ 0.14" for (200, 40): 0.1415 ± 0.006 per trial (so ± 0.0014
    for the 20-trial mean). The other readings give different numbers and were rejected:
    ``A Aᵀ`` (Gaussian factor only) ≈ 0.166, an orthogonal projector ``Q Qᵀ`` ≈ 0.200, and
    sampled covariances depend on the sample count. The baseline grows with the rank (dim 100:
    ≈ 0.02 at rank 2, 0.14 at 20, 0.25 at 50), which is why a layer's relations are judged
    against the baseline at the layer's own effective ranks.
    """
    rank_b = rank if rank_b is None else rank_b
    for name, v in (("dim", dim), ("rank", rank), ("rank_b", rank_b), ("trials", trials)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if dim < 2:
        raise ValueError(f"dim must be at least 2 (α of 1×1 matrices is undefined), got {dim}")
    if max(rank, rank_b) > dim:
        raise ValueError(f"rank must be at most dim={dim}, got {max(rank, rank_b)}")
    gen = torch.Generator().manual_seed(int(seed))

    def factors(k):
        a = torch.randn(dim, k, generator=gen, dtype=torch.float64)
        b = torch.randn(dim, k, generator=gen, dtype=torch.float64)
        return a, b.T @ b

    vals = []
    for _ in range(trials):
        a1, c1 = factors(rank)
        a2, c2 = factors(rank_b)
        vals.append(_alpha_of_factors(a1, c1, a2, c2))
    return float(sum(vals) / trials)


def _rank_of(erank: float, dim: int) -> Optional[int]:
    """An effective rank as the integer rank of a random projection: rounded, at least 1, at
    most ``dim``; from 100 on to two significant digits (366 → 370: the baseline moves by
    < 0.002 there, and layers of one model then share cache entries)."""
    if erank is None or not math.isfinite(float(erank)) or float(erank) <= 0.0:
        return None
    k = float(erank)
    if k >= 100:
        step = 10 ** (int(math.floor(math.log10(k))) - 1)
        k = round(k / step) * step
    return int(min(dim, max(1, round(k))))


def effective_rank_of_spectrum(lam) -> float:
    """:func:`crh_kernels.analysis.effective_rank` from eigenvalues already computed:
    ``exp(−Σ p_i log p_i)``, ``p_i = λ_i / Σ λ`` over the eigenvalues clipped at 0; 0.0 when
    none is positive, NaN when one is NaN."""
    t = torch.as_tensor(lam, dtype=torch.float64).flatten().cpu()
    if bool(torch.isnan(t).any()):
        return float("nan")
    t = t.clamp(min=0.0)
    total = float(t.sum())
    if total <= 0.0:
        return 0.0
    p = t[t > 0] / total
    return float(math.exp(-float((p * p.log()).sum())))


@functools.lru_cache(maxsize=4096)
def _cached_baseline(dim: int, ka: int, kb: int, trials: int) -> float:
    ka, kb = min(ka, kb), max(ka, kb)  # symmetric in the two ranks: one cache entry per pair
    return random_baseline(dim, ka, rank_b=kb, trials=trials, seed=0)


#: The two matrices of each relation (docs/spec.md §3 table), and the side whose dimension it has.
RELATION_MATRICES = {
    "forward_RGA": ("H_b", "G_b"), "forward_RWA": ("H_b", "Z_b"), "forward_GWA": ("G_b", "Z_b"),
    "backward_RGA": ("H_a", "G_a"), "backward_RWA": ("H_a", "Z_a"), "backward_GWA": ("G_a", "Z_a"),
}


def baseline_trials(dim: int) -> int:
    """Trials of :func:`relation_baselines`: 20 up to dim 512 (the paper's (200, 40) to ±0.0014),
    3 above: a trial costs O(dim·rank²) and its spread shrinks with dim (≈ 0.001 per trial at
    dim 1536, rank 570)."""
    return 20 if dim <= 512 else 3


def relation_baselines(dims: Dict[str, int], eranks: Dict[str, float]) -> Dict[str, dict]:
    """The random baseline of each of the six relations at the layer's own effective ranks.

    Args:
        dims: ``{"a": D_in, "b": D_out}`` (the matrix sizes of the backward and forward sides).
        eranks: effective rank (:func:`crh_kernels.analysis.effective_rank`) of each matrix
            ``H_a, G_a, Z_a, H_b, G_b, Z_b`` that exists (missing or NaN: that relation has no
            baseline).

    Returns:
        ``{relation: {"baseline", "dim", "ranks": [k_1, k_2], "trials"}}``: α between two
        independent random covariances (:func:`random_baseline`) of dimension ``dim`` and ranks
        the two matrices' effective ranks rounded to integers (at least 1; two significant
        digits from 100 on). ``baseline`` is
        None where it is undefined (a missing matrix, or a side of dimension < 2). Cached per
        (dim, ranks), so equal layers cost one computation.
    """
    out: Dict[str, dict] = {}
    for rel, (x, y) in RELATION_MATRICES.items():
        side = "b" if rel.startswith("forward") else "a"
        d = dims.get(side)
        d = None if d is None else int(d)
        ranks = [None if d is None else _rank_of(eranks.get(m), d) for m in (x, y)]
        entry = {"baseline": None, "dim": d, "ranks": ranks, "trials": None}
        if d is not None and d >= 2 and None not in ranks:
            entry["trials"] = baseline_trials(d)
            entry["baseline"] = _cached_baseline(d, ranks[0], ranks[1], entry["trials"])
        out[rel] = entry
    return out
