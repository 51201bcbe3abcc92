"""Standard errors of any number computed from mergeable states: the delete-one-block jackknife.

Owns: the jackknife (:func:`jackknife`, :func:`jackknife_dict`), its interval multiplier
(:func:`multiplier`, Student's t with K − 1 degrees of freedom, :func:`t_quantile`) and the
reading of an interval against a bar (:func:`against`).

What it estimates. A collector with ``blocks=K`` keeps K disjoint sub-states per stream whose
exact merge is the point estimate θ (any number computed from the states: an α, p, q, an
effective rank). Its leave-one-out merges give θ_(i), the same number computed without
block i. The delete-one-block jackknife standard error is

    se = sqrt((K − 1)/K · Σ_i (θ_(i) − θ̄)²),   θ̄ = mean of the θ_(i)

(Efron & Stein 1981; Shao & Tu 1995 §2.3 for the grouped form). It is the standard error of θ
when the blocks are (roughly) independent samples of the same process: for a smooth function
of the moments (all of ours) the θ_(i) vary like θ computed on (K−1)/K of the rows, and the
(K − 1) factor scales that spread back up to the sampling error of θ itself. What it does not
see: a drift the blocks share (a trend over training is shared by every block of a step round
robin, and is then not an error but the quantity measured), and correlation between blocks (a
block of consecutive steps of a slowly changing model: see docs/usage.md "Standard errors").

Why t_{K−1} and not 1.96. The jackknife variance from K blocks is, for a statistic that is
close to a mean of block values, a sum of K − 1 independent squares: (se/σ)² ~ χ²_{K−1}/(K−1),
so (θ − θ_true)/se is Student's t with K − 1 degrees of freedom. The 95 % interval θ ± 1.96·se
then covers only P(|t_9| < 1.96) ≈ 0.918 of the time for K = 10 (0.935 for K = 20);
θ ± t_{K−1, 0.975}·se covers 0.95 (measured in the calibration test: 1.96 gives 0.90–0.94,
t_{K−1} 0.93–0.97). tests/test_errors.py checks this calibration on synthetic
data with known population covariances (Gaussian and heavy-tailed rows).

Bias, and where the interval is centred. The jackknife also estimates the bias of θ,
``b = (K − 1)(θ̄ − θ)`` (:attr:`Jackknife.bias`). α has a bias of order D/N: the sampling noise
of a covariance attenuates the correlation of its entries. Its standard error is of order
1/√(N·D), so bias/se grows like D^1.5/√N: already ≈ 1 at D = 16, N = 2000, and larger for
wide layers. The interval is therefore Tukey's jackknife interval, centred on the
bias-corrected estimate ``θ − b`` (:attr:`Jackknife.corrected`, :meth:`Jackknife.interval`):
``θ − b ± t_{K−1}·se``. The point estimate θ itself is left as it is (the number the rest of
the report, the paper and the table use); the report stores ``b`` and the interval beside it.
Without the correction the calibration test's D = 16, N = 2000 settings cover 0.91 and 0.92
instead of 0.95 and 0.955 (with the correction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["Jackknife", "jackknife", "jackknife_dict", "multiplier", "t_quantile", "against",
           "LEVEL", "METHOD"]

#: The confidence level of every interval shown with a standard error.
LEVEL = 0.95
#: The method, in words (report meta).
METHOD = "delete-one-block jackknife"


def _finite(v) -> Optional[float]:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class Jackknife:
    """The jackknife of one number. ``value``: the full estimate θ (None: undefined); ``se``:
    its standard error (None: undefined, ``reason`` says why); ``k``: blocks; ``mean``: θ̄ of
    the leave-one-out values; ``bias``: the jackknife bias estimate ``(K − 1)(θ̄ − θ)``."""

    value: Optional[float]
    se: Optional[float]
    k: int
    mean: Optional[float] = None
    bias: Optional[float] = None
    reason: str = ""

    @property
    def corrected(self) -> Optional[float]:
        """The bias-corrected estimate ``θ − bias = Kθ − (K − 1)θ̄`` (None where se is)."""
        if self.value is None or self.bias is None:
            return None
        return self.value - self.bias

    def interval(self, mult: Optional[float] = None) -> Optional[Tuple[float, float]]:
        """Tukey's jackknife interval ``(θ_c − m·se, θ_c + m·se)``, θ_c the bias-corrected
        estimate (:attr:`corrected`), ``m`` = ``mult`` (default :func:`multiplier` of ``k``);
        None when θ or se is undefined."""
        if self.corrected is None or self.se is None:
            return None
        m = multiplier(self.k) if mult is None else float(mult)
        return self.corrected - m * self.se, self.corrected + m * self.se

    def to_dict(self) -> dict:
        return {"value": self.value, "se": self.se, "k": self.k, "mean": self.mean,
                "bias": self.bias, "reason": self.reason}


def empty_blocks(counts: Mapping[str, Sequence[int]]) -> Optional[str]:
    """Why no standard error can be given when some block holds no rows, else None.

    ``counts``: ``{stream: rows per block}`` (``LayerStats.block_counts()``). Deleting an empty
    block leaves the estimate unchanged, so a jackknife over such blocks would understate the
    error (fewer than K collected steps with ``block_by="step"``, or calls shorter than K rows
    with ``block_by="row"``)."""
    for stream, per_block in counts.items():
        per_block = [int(c) for c in per_block]
        full = sum(1 for c in per_block if c > 0)
        if per_block and full < len(per_block):
            return (f"only {full} of {len(per_block)} blocks hold rows of {stream}: deleting an "
                    f"empty block changes nothing, so the jackknife would understate the error "
                    f"(collect at least K steps, or K rows a call with block_by='row')")
    return None


def jackknife(full, loo: Sequence, why_not: Optional[str] = None) -> Jackknife:
    """The delete-one-block jackknife of one number (see the module docstring).

    Args:
        full: θ of all blocks merged (None or NaN: undefined).
        loo: θ_(i), i = 1..K, each computed without block i (None or NaN where undefined).
        why_not: a reason the blocks cannot give a standard error (e.g. :func:`empty_blocks`):
            then ``se`` is None with this reason, whatever ``loo`` holds.

    Returns a :class:`Jackknife`; ``se`` is None, with the reason, when K < 2, when θ is
    undefined, or when some θ_(i) is undefined (e.g. a block held every row of a stream, or
    the fit of the rest fell below its mode count): a standard error from the other blocks
    alone would be too small."""
    vals = list(loo)
    k = len(vals)
    theta = _finite(full)
    if k < 2:
        return Jackknife(theta, None, k, reason=f"the jackknife needs at least 2 blocks, got {k}")
    if theta is None:
        return Jackknife(None, None, k, reason="the estimate itself is undefined")
    if why_not:
        return Jackknife(theta, None, k, reason=why_not)
    fin = [_finite(v) for v in vals]
    bad = [i for i, v in enumerate(fin) if v is None]
    if bad:
        which = ", ".join(str(i) for i in bad[:5]) + (" …" if len(bad) > 5 else "")
        return Jackknife(theta, None, k, reason=(
            f"undefined without block{'s' if len(bad) > 1 else ''} {which} ({len(bad)} of {k}): "
            f"the rest of the rows do not determine it, so no standard error"))
    mean = math.fsum(fin) / k
    ss = math.fsum((v - mean) ** 2 for v in fin)
    se = math.sqrt((k - 1) / k * ss)
    return Jackknife(theta, se, k, mean, (k - 1) * (mean - theta), "")


def jackknife_dict(full: Mapping[str, object], loo: Sequence[Mapping[str, object]]
                   ) -> Dict[str, Jackknife]:
    """:func:`jackknife` of every key of ``full`` (e.g. the six α), the leave-one-out values
    read from the same key of each mapping of ``loo`` (missing: undefined)."""
    return {key: jackknife(v, [(d or {}).get(key) for d in loo]) for key, v in full.items()}


# ------------------------------------------------------------------------- Student's t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _t_sf(t: float, df: float) -> float:
    """P(T > t) for t ≥ 0, Student's t with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    a, b = 0.5 * df, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x)) if 0.0 < x < 1.0 else 0.0
    if x >= 1.0:
        return 0.5
    if x < (a + 1.0) / (a + b + 2.0):
        ib = front * _betacf(a, b, x) / a
    else:
        ib = 1.0 - front * _betacf(b, a, 1.0 - x) / b
    return 0.5 * ib


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` > 0 degrees of freedom (bisection on the
    regularized incomplete beta function, to 1e-12 relative; no scipy)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"df must be positive, got {df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while _t_sf(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if _t_sf(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


_MULT: Dict[Tuple[int, float], float] = {}


def multiplier(k: int, level: float = LEVEL) -> float:
    """The interval half-width in standard errors for K blocks: ``t_{K−1}`` at (1 + level)/2
    (2.262 for K = 10, 2.093 for K = 20; → 1.960 as K grows). See the module docstring."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k (blocks) must be an int ≥ 2, got {k!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    key = (k, float(level))
    if key not in _MULT:
        _MULT[key] = t_quantile(0.5 + level / 2.0, k - 1)
    return _MULT[key]


def against(value, se, bar, mult: float) -> Optional[str]:
    """Where the interval ``value ± mult·se`` lies against ``bar`` (``value``: the interval's
    centre, the bias-corrected estimate for a jackknife): ``"above"`` (its lower end
    ≥ bar), ``"below"`` (its upper end < bar), ``"straddles"``; None when value or se is
    undefined. A zero se reads like the point estimate (``value ≥ bar``)."""
    v, s, b = _finite(value), _finite(se), _finite(bar)
    if v is None or s is None or b is None:
        return None
    if v - mult * s >= b:
        return "above"
    if v + mult * s < b:
        return "below"
    return "straddles"
