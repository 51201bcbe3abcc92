"""The jackknife standard errors (crh_kernels.analysis.errors, issue 16): the formula, its edge
cases, and a calibration check on synthetic data whose population α is known.

Calibration. Rows h ~ (0, A) and g ~ (0, B) with known D×D covariances A and B (so the true
α(A, B) is computed exactly, float64), Gaussian or multivariate t with ν = 5 scaled to the same
covariance (heavy tails: the fourth moments exist, the eighth do not). N rows per stream are
dealt into K blocks, each filled by ``Moments(normalize=False).update``; the leave-one-out
covariances are merged from the blocks' (n, μ, C) in float64 here, independently of the
library's merge. Each of R = 400 repetitions gives α, its jackknife se and bias
(:func:`jackknife`), and the interval (α − bias) ± t_{K−1, 0.975}·se (Tukey's jackknife
interval: the bias-corrected estimate; :func:`multiplier`).

Tolerance: with R = 400 independent repetitions the coverage of a calibrated 95 % interval is a
binomial proportion with sd √(0.95·0.05/400) = 0.011; the accepted band [0.90, 0.985] is
−4.5 sd / +3.2 sd around 0.95 (a deterministic seed, so the test does not flicker; the band
leaves room for the jackknife's own approximation: it is exact only for means). Measured on
this code: 0.932–0.973 over the six settings. The mutation checks show that the band
discriminates: an se that forgets the (K − 1) inflation (the plain spread of the
leave-one-out values, se/√(K−1)), or se/√K, covers 0.33–0.55; 2·se covers ≥ 0.998. Without
the bias correction the (D = 16, N = 2000) settings cover 0.907 and 0.92 (α's bias is O(D/N)
and comparable to se there), which is why the interval is centred on the corrected estimate;
the test checks that the jackknife bias tracks the true bias. With 1.96 instead of t_{K−1}
the settings cover 0.897–0.943: t_{K−1} is the documented multiplier.
"""
import math

import pytest
import torch

from crh_kernels import Moments
from crh_kernels.analysis import errors as E
from crh_kernels.analysis.errors import against, jackknife, jackknife_dict, multiplier, t_quantile

R = 400
BAND = (0.90, 0.985)
#: (D, N, K, distribution)
SETTINGS = [(4, 2000, 10, "gauss"), (4, 2000, 10, "t5"), (16, 2000, 20, "gauss"),
            (16, 2000, 10, "t5"), (16, 20000, 10, "gauss"), (16, 20000, 20, "t5")]


# ----------------------------------------------------------------------------- the formula
def test_jackknife_matches_the_textbook_formula_on_random_values():
    g = torch.Generator().manual_seed(1)
    for k in (2, 3, 10, 37):
        loo = (torch.randn(k, generator=g, dtype=torch.float64) * 3 + 1).tolist()
        full = 0.7
        mean = sum(loo) / k
        se = math.sqrt((k - 1) / k * sum((v - mean) ** 2 for v in loo))
        j = jackknife(full, loo)
        assert j.se == pytest.approx(se, rel=1e-12) and j.k == k and j.reason == ""
        assert j.bias == pytest.approx((k - 1) * (mean - full), rel=1e-12)
        lo, hi = j.interval()
        m = multiplier(k)
        assert (lo, hi) == pytest.approx((full - j.bias - m * se, full - j.bias + m * se))


def test_jackknife_of_the_mean_is_the_standard_error_of_the_mean():
    # For θ = the mean of K equal blocks, the jackknife se is exactly sd(block means)/√K.
    g = torch.Generator().manual_seed(2)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    full = float(b.mean())
    loo = [float((b.sum() - b[i]) / 11) for i in range(12)]
    j = jackknife(full, loo)
    assert j.se == pytest.approx(float(b.std()) / math.sqrt(12), rel=1e-12)
    assert j.bias == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("full,loo,why", [
    (0.5, [0.4], "at least 2 blocks"),
    (None, [0.4, 0.5], "the estimate itself is undefined"),
    (float("nan"), [0.4, 0.5], "the estimate itself is undefined"),
    (0.5, [0.4, None, 0.6], "undefined without block 1 (1 of 3)"),
    (0.5, [float("inf"), 0.4, float("nan")], "undefined without blocks 0, 2 (2 of 3)"),
])
def test_undefined_standard_errors_say_why(full, loo, why):
    j = jackknife(full, loo)
    assert j.se is None and why in j.reason and j.interval() is None


def test_jackknife_dict_reads_each_key_and_a_missing_key_is_undefined():
    out = jackknife_dict({"a": 1.0, "b": 2.0}, [{"a": 1.1, "b": 2.0}, {"a": 0.9}, {"a": 1.0, "b": 2.2}])
    assert out["a"].se == pytest.approx(jackknife(1.0, [1.1, 0.9, 1.0]).se)
    assert out["b"].se is None and "block 1" in out["b"].reason


def test_t_quantile_and_multiplier_against_tables():
    # two-sided 95 % points of Student's t (any statistics table)
    for df, t in ((1, 12.7062), (2, 4.3027), (9, 2.2622), (19, 2.0930), (60, 2.0003)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert t_quantile(0.025, 9) == pytest.approx(-2.2622, abs=1e-4)
    assert multiplier(10) == pytest.approx(2.2622, abs=1e-4)
    assert multiplier(10_000) == pytest.approx(1.95996, abs=1e-3)
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError):
            multiplier(bad)


def test_against_reads_the_interval_against_a_bar():
    assert against(0.8, 0.01, 0.7, 2.0) == "above"
    assert against(0.6, 0.01, 0.7, 2.0) == "below"
    assert against(0.71, 0.01, 0.7, 2.0) == "straddles"
    assert against(0.69, 0.01, 0.7, 2.0) == "straddles"
    assert against(0.7, 0.0, 0.7, 2.0) == "above"        # se 0: the point rule α ≥ bar
    assert against(None, 0.01, 0.7, 2.0) is None and against(0.8, None, 0.7, 2.0) is None


# ----------------------------------------------------------------------------- calibration
def _alpha(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """α (Pearson correlation of the entries) over the last two dims, float64 (independent of
    crh_kernels.analysis.alignment)."""
    x, y = X.flatten(-2), Y.flatten(-2)
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    return (x * y).sum(-1) / ((x * x).sum(-1) * (y * y).sum(-1)).sqrt()


def _populations(d: int, g: torch.Generator):
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = m @ m.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    n = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a, a + 2.0 * n @ n.T / d


def _rows(n: int, chol: torch.Tensor, dist: str, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, chol.shape[0], generator=g, dtype=torch.float64) @ chol.T
    if dist == "t5":    # multivariate t, ν = 5, scaled to covariance chol·cholᵀ: x·√((ν−2)/w)
        w = torch.randn(n, 5, generator=g, dtype=torch.float64).square().sum(1, keepdim=True)
        x = x * torch.sqrt(3.0 / w)
    return x


def _block_loo(blocks):
    """(full covariance, K leave-one-out covariances) from per-block Moments, merged here in
    float64 from their (n, μ, C) (raw sums: T_i = C_i + n_i μ_i μ_iᵀ)."""
    n = torch.tensor([float(m.n) for m in blocks], dtype=torch.float64)
    mu = torch.stack([m.mean.double() for m in blocks])
    t = torch.stack([m.scatter.double() for m in blocks]) + n[:, None, None] * mu[:, :, None] * mu[:, None, :]
    nt, tt = n.sum(), t.sum(0)
    mt = (n[:, None] * mu).sum(0) / nt
    full = tt / nt - torch.outer(mt, mt)
    nl = nt - n
    ml = (nt * mt - n[:, None] * mu) / nl[:, None]
    loo = (tt - t) / nl[:, None, None] - ml[:, :, None] * ml[:, None, :]
    return full, loo


_CACHE = {}


def _simulate(d: int, n: int, k: int, dist: str):
    key = (d, n, k, dist)
    if key in _CACHE:
        return _CACHE[key]
    g = torch.Generator().manual_seed(1000 * d + n // 1000 + 7 * k + (dist == "t5"))
    a, b = _populations(d, g)
    truth = float(_alpha(a, b))
    chols = (torch.linalg.cholesky(a), torch.linalg.cholesky(b))
    est, se, bias = [], [], []
    for _ in range(R):
        covs = []
        for chol in chols:
            x = _rows(n, chol, dist, g)
            blocks = []
            for rows in x.view(k, n // k, d):      # row dealing: block i gets the i-th slice
                m = Moments(d, normalize=False, backend="torch")
                m.update(rows)
                blocks.append(m)
            covs.append(_block_loo(blocks))
        full = float(_alpha(covs[0][0], covs[1][0]))
        loo = _alpha(covs[0][1], covs[1][1]).tolist()
        j = jackknife(full, loo)
        est.append(full)
        se.append(j.se)
        bias.append(j.bias)
    out = {"truth": truth, "est": torch.tensor(est), "se": torch.tensor(se),
           "bias": torch.tensor(bias), "k": k}
    _CACHE[key] = out
    return out


def _coverage(sim, *, scale: float = 1.0, corrected: bool = True) -> float:
    m = multiplier(sim["k"])
    centre = sim["est"] - sim["bias"] if corrected else sim["est"]
    return float(((centre - sim["truth"]).abs() <= m * scale * sim["se"]).double().mean())


@pytest.fixture(scope="module")
def sims(one_thread):
    return {s: _simulate(*s) for s in SETTINGS}


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"D{s[0]}-N{s[1]}-K{s[2]}-{s[3]}")
def test_nominal_95_intervals_cover_the_true_alpha(sims, setting):
    sim = sims[setting]
    cov = _coverage(sim)
    assert BAND[0] <= cov <= BAND[1], (setting, cov)
    # the se is the actual spread of the estimate across repetitions (within 20 %)
    assert float(sim["se"].mean()) == pytest.approx(float(sim["est"].std()), rel=0.2)


def test_a_wrong_standard_error_fails_the_coverage_check(sims):
    """Mutation check: the band rejects an se off by the factors a slip would make."""
    for setting, sim in sims.items():
        k = sim["k"]
        for wrong in (1 / math.sqrt(k - 1),   # no (K − 1) inflation: plain spread of the θ_(i)
                      1 / math.sqrt(k),       # se/√K
                      2.0):                   # twice too wide
            cov = _coverage(sim, scale=wrong)
            assert not BAND[0] <= cov <= BAND[1], (setting, wrong, cov)


def test_the_jackknife_bias_tracks_the_true_bias(sims):
    # At D = 16, N = 2000 α's bias (O(D/N), attenuation by sampling noise) is comparable to se:
    # the jackknife's bias estimate matches the bias over the repetitions.
    for setting in ((16, 2000, 20, "gauss"), (16, 2000, 10, "t5")):
        sim = sims[setting]
        true_bias = float(sim["est"].mean()) - sim["truth"]
        assert true_bias < -0.5 * float(sim["se"].mean())      # a bias that matters here
        assert float(sim["bias"].mean()) == pytest.approx(true_bias, rel=0.25)


def test_standard_error_shrinks_like_one_over_sqrt_n(sims):
    small, large = sims[(16, 2000, 20, "gauss")], sims[(16, 20000, 10, "gauss")]
    ratio = float(small["se"].mean()) / float(large["se"].mean())
    assert ratio == pytest.approx(math.sqrt(10), rel=0.12)
    small, large = sims[(16, 2000, 10, "t5")], sims[(16, 20000, 20, "t5")]
    ratio = float(small["se"].mean()) / float(large["se"].mean())
    assert ratio == pytest.approx(math.sqrt(10), rel=0.2)


def test_module_constants():
    assert E.LEVEL == 0.95 and E.METHOD == "delete-one-block jackknife"
