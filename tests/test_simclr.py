"""The self-supervised experiment (paper res2, Fig. 6): its loss and augmentations against
independent float64 computations, and the tiny profile end to end (files, α series, figures,
claims, `crh report`)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from crh_kernels.experiments import Context, MissingData, get, rebuild, run_experiment
from crh_kernels.experiments.simclr import augment, knn_accuracy, nt_xent

PAPER_FIG6_LAYERS = 5  # "Layers 1-3 are convolutional layers, and layers 4-5 are fully connected ones."


def _nt_xent_ref(z1, z2, tau):
    """NT-Xent written out anchor by anchor in float64 (Chen et al. 2020, eq. 1)."""
    z = torch.cat([z1, z2]).double()
    z = [v / v.norm() for v in z]
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        num = math.exp(float(z[i] @ z[pos]) / tau)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


@pytest.mark.parametrize("n, d, tau, scale", [(4, 3, 0.5, 1.0), (7, 16, 0.1, 50.0), (2, 128, 1.0, 1e-3)])
def test_nt_xent_matches_the_anchor_by_anchor_definition(n, d, tau, scale):
    g = torch.Generator().manual_seed(n * d)
    z1 = torch.randn(n, d, generator=g) * scale
    z2 = z1 + 0.3 * scale * torch.randn(n, d, generator=g)
    got = float(nt_xent(z1, z2, tau))
    assert got == pytest.approx(_nt_xent_ref(z1, z2, tau), rel=1e-5, abs=1e-6)
    # the gradient flows to both views
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    nt_xent(a, b, tau).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_augment_without_crop_jitter_noise_is_the_image_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 12, 12, generator=g)
    out = augment(x, torch.Generator().manual_seed(1), crop_scale=1.0, jitter=0.0, noise=0.0)
    same = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all())
    assert 0 < int(mirrored.sum()) < 32  # both happen


def test_augment_is_a_crop_of_the_image_and_depends_on_the_generator_only():
    # an image that is a linear ramp in x: a crop of scale s without flip is the ramp scaled by s
    # (bilinear resampling of a linear function is exact away from the border)
    h = w = 16
    ramp = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(64, 1, h, w).contiguous()
    out = augment(ramp, torch.Generator().manual_seed(3), crop_scale=0.25, jitter=0.0, noise=0.0)
    slopes = (out[:, 0, :, -2] - out[:, 0, :, 1]).mean(1) / (ramp[0, 0, 0, -2] - ramp[0, 0, 0, 1])
    assert bool((slopes.abs() >= 0.5 - 1e-4).all() and (slopes.abs() <= 1 + 1e-4).all())  # side ∈ [√0.25, 1]
    assert float(slopes.abs().min()) < 0.9  # some crops are zoomed in
    a = augment(ramp, torch.Generator().manual_seed(5))
    b = augment(ramp, torch.Generator().manual_seed(5))
    c = augment(ramp, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(Exception, match="crop_scale"):
        augment(ramp, torch.Generator(), crop_scale=0.0)


def test_knn_accuracy_against_a_brute_force_vote():
    class Feats(torch.nn.Module):
        def features(self, x):
            return x.flatten(1)

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 3
    yb = torch.arange(60) % 3
    xb = centers[yb] + torch.randn(60, 5, generator=g)
    yt = torch.arange(30) % 3
    xt = centers[yt] + 2.0 * torch.randn(30, 5, generator=g)
    k = 7
    got = knn_accuracy(Feats(), xb, yb, xt, yt, k, torch.device("cpu"))
    # brute force in float64: cosine similarity, majority of the k nearest, ties to the nearest's class
    fb = [v.double() / v.double().norm() for v in xb]
    right = 0
    for x, y in zip(xt, yt):
        x = x.double() / x.double().norm()
        order = sorted(range(60), key=lambda i: -float(x @ fb[i]))[:k]
        votes = [int(yb[i]) for i in order]
        best = max(set(votes), key=lambda c: (votes.count(c), c == votes[0], -c))
        right += best == int(y)
    assert got == pytest.approx(right / 30)


def _run_tiny(out, **overrides):
    try:
        return run_experiment("simclr", out, Context(seed=0), profile="tiny", overrides=overrides, plots=True)
    except MissingData as exc:
        pytest.skip(f"simclr: Fashion-MNIST not installed: {exc}")


def test_simclr_tiny_end_to_end(tmp_path):
    out = tmp_path / "simclr"
    result, claims, figures, saved = _run_tiny(out)
    rep, ex, cfg = result.report, result.extras, result.config
    layers = list(cfg["conv_modules"]) + list(cfg["fc_modules"])
    assert len(layers) == PAPER_FIG6_LAYERS and set(rep.layers) == set(layers)
    assert rep.layers["fc2"]["dims"]["h_b"] == cfg["proj_dim"]  # the projection output
    # the α series: a point every alpha_every steps, for every layer, six α each, in [−1, 1]
    s = rep.alpha_series
    assert s["steps"] == list(range(cfg["alpha_every"], cfg["steps"] + 1, cfg["alpha_every"]))
    assert set(s["layers"]) == set(layers)
    vals = [v for rels in s["layers"].values() for vs in rels.values() for v in vs if v is not None]
    assert vals and all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in vals)
    # phases and exponents on raw moments; every test image measured once, in two views
    for name, e in rep.layers.items():
        assert e.get("exponent_moments") == "raw", name
    assert rep.layers["fc1"]["n"] == 2 * cfg["n_measure"]
    # the sweep: the base run and one run per extra γ and B of the tiny profile
    assert [r["sweep"] for r in ex["sweep"]] == ["base", "weight_decay", "batch_size"]
    assert 0.0 <= ex["knn_accuracy"]["init"] <= 1.0 and 0.0 <= ex["knn_accuracy"]["final"] <= 1.0
    for f in ("report.json", "extras.json", "config.json", "table.txt", "claims.md", "claims.json",
              "reports/wd_0.001.json", "reports/b_4.json"):
        assert (out / f).is_file(), f
    names = {p.rsplit("/", 1)[-1] for p in figures}
    assert {"alpha_over_training_fig6.png", "alpha_series.png"} <= names
    md = (out / "claims.md").read_text()
    assert "SMOKE TEST" in md and "#### The paper's words" in md
    assert "We see that the RGA holds well for the fully connected layers" in md
    assert len(claims) == 6 and all(c.verdict in ("holds", "FAILS", "undetermined", "n/a") for c in claims)
    # `crh report` rebuilds the same claims and the figure from the files
    _, _, again, figs = rebuild(out, plots=True)
    assert [c.measured for c in again] == [c.measured for c in claims]
    assert any(f.endswith("alpha_over_training_fig6.png") for f in figs)


def test_simclr_without_sweep_says_the_trend_was_not_run(tmp_path):
    result, claims, _, _ = _run_tiny(tmp_path / "s", weight_decays=[], batch_sizes=[], steps=4)
    trend = [c for c in claims if "increases" in c.claim]
    assert len(trend) == 2 and all(c.verdict == "n/a" and "not run" in c.measured for c in trend)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["config"]["weight_decays"] == []


def test_simclr_profiles_state_the_papers_setting():
    mod = get("simclr")
    paper = mod.PROFILES["paper"]
    # res2: "batch size of 512 and γ = 5 × 10^-5 for 1000 epochs"; the projection is 128-dimensional
    assert paper["batch_size"] == 512 and paper["weight_decay"] == 5e-5 and paper["proj_dim"] == 128
    assert paper["steps"] * paper["batch_size"] / 60_000 == pytest.approx(1000, rel=1e-4)
    assert mod.PROFILES["cpu"]["weight_decay"] == 5e-5
    assert len(mod.PROFILES["cpu"]["conv_modules"]) == 3 and len(mod.PROFILES["cpu"]["fc_modules"]) == 2
