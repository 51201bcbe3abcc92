"""Each experiment's tiny configuration runs end to end and yields a valid report and claims;
the data loaders, models and claim statistics they rest on behave."""
from __future__ import annotations

import gzip
import json
import math
import re
import struct

import pytest
import torch

from crh_kernels.experiments import (EXPERIMENTS, Context, ExperimentError, MemoryPlanError, MissingData,
                                     get, profile_config, rebuild, run_experiment)
from crh_kernels.experiments import claims as C
from crh_kernels.experiments import data as D
from crh_kernels.experiments.runs import merge_config, parse_bytes, parse_value
from crh_kernels.experiments.models import GPT, FCNet, ResNet18


def _run_tiny(name, out, plots=False, **overrides):
    try:
        return run_experiment(name, out, Context(seed=0), profile="tiny", overrides=overrides, plots=plots)
    except MissingData as exc:  # only when the optional data package is genuinely absent
        pytest.skip(f"{name}: optional data not installed: {exc}")


def _check_run(result, claims, out):
    rep = result.report
    assert rep.layers, "no layer measured"
    for name, e in rep.layers.items():
        assert e["n"] > 0, name
        for kind in ("alpha_cov", "alpha_second"):
            for rel, v in e[kind].items():
                if v is not None:
                    assert math.isfinite(v) and -1.0 - 1e-9 <= v <= 1.0 + 1e-9, (name, rel, v)
    assert claims, "no claim rows"
    for c in claims:
        assert c.claim and c.rule and c.measured
        assert c.holds in (True, False, None)
    for f in ("report.json", "extras.json", "config.json", "table.txt", "claims.md", "claims.json"):
        assert (out / f).is_file(), f
    md = (out / "claims.md").read_text()
    assert "| claim (paper) |" in md and md.count("\n| ") >= len(claims) + 1
    saved = json.loads((out / "config.json").read_text())
    assert saved["profile"] == "tiny" and saved["seed"] == 0


def _finite_alphas(rep):
    return [v for e in rep.layers.values() for v in e["alpha_cov"].values() if v is not None]


def test_fc1_tiny_with_figures_and_rebuild(tmp_path):
    out = tmp_path / "fc1"
    result, claims, _, _ = _run_tiny("fc1", out)
    figures = get("fc1").figures(result.report, result.extras, result.config, out / "figures")
    _check_run(result, claims, out)
    assert set(result.report.layers) == {f"layers.{i}" for i in range(4)}
    assert len(_finite_alphas(result.report)) >= 15
    names = {p.split("/")[-1] for p in figures}
    assert {"alpha_vs_weight_decay.png", "alpha_vs_batch_size.png", "alpha_over_training.png"} <= names
    for p in figures:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ex = result.extras
    assert len(ex["weight_decay"]) == 2 and len(ex["batch_size"]) == 2
    assert [h["step"] for h in ex["base"]["history"]][0] == 0
    (out / "claims.md").unlink()
    saved, rep, claims2, figs2 = rebuild(out)  # what `crh report` does: from the files alone
    assert saved["experiment"] == "fc1" and (out / "claims.md").is_file()
    assert [c.verdict for c in claims2] == [c.verdict for c in claims]
    assert {"alpha.png", "spectra.png", "alpha_vs_weight_decay.png"} <= {p.split("/")[-1] for p in figs2}


def test_fc1_is_reproducible(tmp_path):
    a = _run_tiny("fc1", tmp_path / "a", steps=20, weight_decays=[1e-3], batch_sizes=[100], checkpoints=1)
    b = _run_tiny("fc1", tmp_path / "b", steps=20, weight_decays=[1e-3], batch_sizes=[100], checkpoints=1)
    assert _finite_alphas(a[0].report) == pytest.approx(_finite_alphas(b[0].report), abs=1e-9)


def test_fc2_tiny(tmp_path):
    out = tmp_path / "fc2"
    result, claims, _, _ = _run_tiny("fc2", out)
    _check_run(result, claims, out)
    assert len(result.report.layers) == 4
    assert any("Fig. 4" in c.source for c in claims) and any("Fig. 8" in c.source for c in claims)
    figs = get("fc2").figures(result.report, result.extras, result.config, tmp_path / "figs")
    assert {p.split("/")[-1] for p in figs} == {"alpha_vs_weight_decay.png", "rank_vs_alpha.png",
                                               "alpha_over_training.png"}


def test_resnet_tiny(tmp_path):
    out = tmp_path / "resnet"
    result, claims, _, _ = _run_tiny("resnet", out)
    _check_run(result, claims, out)
    assert set(result.report.layers) == {"fc1", "fc2"}
    assert all(result.report.layers[n]["n"] == 64 for n in ("fc1", "fc2"))  # every test point once
    assert get("resnet").figures(result.report, result.extras, result.config, tmp_path / "figs")


def test_transformer_tiny(tmp_path):
    out = tmp_path / "tr"
    result, claims, _, _ = _run_tiny("transformer", out)
    _check_run(result, claims, out)
    layers = result.report.layers
    heads = [n for n, e in layers.items() if e["kind"] == "head"]
    assert len(heads) == 2 * 4  # 2 layers x 4 heads
    assert {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")} <= set(layers)
    hist = result.extras["history"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 6
    assert get("transformer").figures(result.report, result.extras, result.config, tmp_path / "figs")


def test_minilm_tiny(tmp_path):
    out = tmp_path / "minilm"
    result, claims, _, _ = _run_tiny("minilm", out)
    _check_run(result, claims, out)
    assert set(result.report.layers) == {"encoder.layer.0.attention.output.dense", "pooler.dense"}
    assert len(result.extras["linear_layers"]) == 37  # the real pretrained model's Linear layers
    e = result.report.layers["encoder.layer.0.attention.output.dense"]
    assert e["n"] == result.extras["tokens"]  # padding masked out of every stream
    assert get("minilm").figures(result.report, result.extras, result.config, tmp_path / "figs")


def test_memory_plan_refuses_with_names_and_options(tmp_path):
    ctx = Context(max_memory=10_000)
    with pytest.raises(MemoryPlanError) as info:
        run_experiment("fc1", tmp_path, ctx, profile="tiny", plots=False)
    msg = str(info.value)
    assert "--max-memory" in msg and "layers.0" in msg and "fewer streams" in msg and "state_dtype" in msg


def test_profiles_and_settings():
    # the registry is the one list (CLI choices, `crh list`, test_cli derive from it): pin it here
    assert EXPERIMENTS == ("fc1", "fc2", "resnet", "transformer", "minilm", "simclr")
    for name in EXPERIMENTS:
        mod = get(name)
        assert {"tiny", "cpu", "cuda"} <= set(mod.PROFILES)
        assert mod.PROFILES["cpu"]["steps"] > 0
    cfg = profile_config("fc1", "cpu", {"steps": 5, "lr": 1})
    assert cfg["steps"] == 5 and cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    with pytest.raises(ExperimentError, match="unknown setting"):
        profile_config("fc1", "cpu", {"nope": 1})
    with pytest.raises(ExperimentError, match="integer"):
        merge_config({"steps": 1}, {"steps": "x"})
    with pytest.raises(ExperimentError, match="unknown experiment"):
        get("fc9")
    assert parse_value("1e-4,1e-3") == [1e-4, 1e-3] and parse_value("[1, 2]") == [1, 2]
    assert parse_value("attn") == "attn" and parse_value("null") is None
    assert parse_bytes("1.5G") == int(1.5 * 2 ** 30) and parse_bytes("512MiB") == 512 * 2 ** 20


# ----------------------------------------------------------------------------- data and models
def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(">" + "I" * array.dim(), *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(array.flatten().tolist()))


def test_fashion_mnist_reader_and_missing_message(tmp_path):
    imgs = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labs = torch.tensor([1, 2, 3], dtype=torch.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labs)
    x, y = D.fashion_mnist("test", str(tmp_path))
    assert x.shape == (3, 1, 32, 32) and y.tolist() == [1, 2, 3]
    assert torch.equal(D.read_idx(tmp_path / "t10k-images-idx3-ubyte"), imgs)
    assert torch.equal(D.read_idx(tmp_path / "t10k-images-idx3-ubyte", limit=2), imgs[:2])
    with pytest.raises(MissingData, match="apt-get install dataset-fashion-mnist"):
        D.fashion_mnist("train", str(tmp_path / "nowhere"))


def test_teachers():
    g = torch.Generator().manual_seed(0)
    t1 = D.make_teacher(d_out=1, seed=0)
    x, y = t1.sample(500, g)
    assert x.shape == (500, 100) and y.shape == (500, 1) and 0.05 < float(y.var()) < 5
    t2 = D.make_teacher(d_out=100, phi_x=0.2, seed=0)
    x2, y2 = t2.sample(2000, g)
    corr = torch.corrcoef(x2.T)
    off = corr[~torch.eye(100, dtype=torch.bool)]
    assert float(off.mean()) > 0.3  # small ϕ_x: strongly correlated features
    assert y2.shape == (2000, 100)


def test_gpt_is_causal_and_heads_marker():
    torch.manual_seed(0)
    m = GPT(50, 8, d_model=16, n_layers=2, n_heads=4).eval()
    x = torch.randint(0, 50, (2, 8))
    x2 = x.clone()
    x2[:, 5:] = (x2[:, 5:] + 1) % 50
    with torch.no_grad():
        a, b = m(x), m(x2)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and not torch.allclose(a[:, 5:], b[:, 5:])
    assert m.attention_outputs() == {"blocks.0.attn.heads": 4, "blocks.1.attn.heads": 4}
    assert m.head.weight is m.tok.weight


def test_resnet_and_fcnet_shapes():
    r = ResNet18(num_classes=10, in_channels=1, width=0.0625)
    assert r(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert r.fc1.in_features == 32 and r.fc2.out_features == 10
    f = FCNet(10, 7, 3, 2)
    assert f(torch.randn(4, 10)).shape == (4, 2) and f.layer_names() == ["layers.0", "layers.1", "layers.2"]


def test_gpt2_bpe_from_package_files():
    try:
        enc = D.gpt2_encoding()
    except MissingData as exc:
        pytest.skip(str(exc))
    assert enc.encode("Hello world") == [15496, 995]  # the GPT-2 ids
    assert enc.n_vocab == 50257


def test_claim_statistics():
    assert C.spearman([1, 2, 3, 4], [1, 3, 2, 5]) == pytest.approx(0.8)
    assert C.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(C.spearman([1, 2, 3], [1, 1, 1]))
    assert C.pearson([1, 2, 3], [2, 4, 6.5]) > 0.99
    c = C.monotone_claim("x", "s", [1, 2, 3], [0.1, 0.2, 0.3], x_name="a", y_name="b")
    assert c.holds is True and "ρ = 1.00" in c.measured
    c = C.monotone_claim("x", "s", [1, 2, 3], [0.3, 0.2, 0.1], x_name="a", y_name="b")
    assert c.holds is False and c.verdict == "FAILS"
    c = C.monotone_claim("x", "s", [1], [0.3], x_name="a", y_name="b")
    assert c.holds is None and c.verdict == "n/a"
    md = C.to_markdown([c])
    assert "0 hold, 0 fail, 1 not evaluated" in md


# ----------------------------------------------------------------------------- issue 12, items 8, 9
def test_run_dir_is_checked_before_training(tmp_path, monkeypatch):
    from crh_kernels.experiments import RunDirError
    import crh_kernels.experiments.fc1 as fc1
    out = tmp_path / "run"
    _run_tiny("fc1", out, steps=20)
    real = fc1.run
    monkeypatch.setattr(fc1, "run", lambda cfg, ctx: pytest.fail("trained before the refusal"))
    with pytest.raises(RunDirError, match="already holds a run"):
        run_experiment("fc1", out, Context(), profile="tiny", plots=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="not a directory"):
        run_experiment("fc1", tmp_path / "file", Context(), profile="tiny", plots=False)
    monkeypatch.setattr(fc1, "run", real)
    _, _, _, saved = run_experiment("fc1", out, Context(), profile="tiny", plots=False, overwrite=True,
                                    overrides={"steps": 30})
    assert saved["run_dir"] == str(out) and json.loads((out / "config.json").read_text())["config"]["steps"] == 30


def test_rebuild_refuses_a_config_of_another_experiment(tmp_path):
    from crh_kernels.experiments import SavedRunError
    out = tmp_path / "run"
    _run_tiny("fc1", out, steps=20)
    assert json.loads((out / "report.json").read_text())["meta"]["experiment"] == "fc1"
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, experiment="resnet", config={})))
    with pytest.raises(SavedRunError, match="report.json: holds a fc1 run but config.json says resnet"):
        rebuild(out, plots=False)


# ----------------------------------------------------------------------------- issue 15, item 3
_QUICK = dict(steps=20, weight_decays=[1e-3], batch_sizes=[100], checkpoints=1)


def test_a_tiny_run_is_labelled_a_smoke_test_and_its_outputs_have_legends(tmp_path):
    from crh_kernels.analysis import PHASES
    out = tmp_path / "run"
    _run_tiny("fc1", out, **_QUICK)
    table, md = (out / "table.txt").read_text(), (out / "claims.md").read_text()
    assert table.startswith("SMOKE TEST (profile tiny") and "numbers mean nothing" in table
    assert "SMOKE TEST (profile tiny" in md.split("| claim (paper) |")[0]
    assert "(smoke test: the verdicts mean nothing)" in md
    assert "Legend (docs/spec.md" in table and "\nLegend:" in md
    for term in ("**verdict**", "**source**", "**RGA, RWA, GWA**", "the layer's output side",
                 "the layer's input side", "**baseline**", "**ρ**"):
        assert term in md, term
    for name in PHASES:
        assert f"- **{name}**:" in md, name
    # a real profile carries no banner (the rendering, without training one)
    rep = rebuild(out, plots=False)[1]
    from crh_kernels.experiments.runs import smoke_note, write_outputs
    assert smoke_note("cpu") is None and smoke_note("cuda") is None
    (tmp_path / "cpu").mkdir()
    write_outputs(tmp_path / "cpu", rep, [], "fc1", "cpu")
    assert not (tmp_path / "cpu" / "table.txt").read_text().startswith("SMOKE")
    assert "smoke" not in (tmp_path / "cpu" / "claims.md").read_text().lower()


def test_config_records_the_threads_the_run_used(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        _run_tiny("fc1", tmp_path / "one", **_QUICK)                       # the profile's threads=1
        _run_tiny("fc1", tmp_path / "two", threads=2, **_QUICK)
        assert torch.get_num_threads() == 3                              # restored after the run
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "one" / "config.json").read_text())["torch_threads"] == 1
    assert json.loads((tmp_path / "two" / "config.json").read_text())["torch_threads"] == 2


def test_rebuild_draws_every_figure_of_the_run_or_names_those_it_cannot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    _run_tiny("fc1", out, plots=True, **_QUICK)
    ran = json.loads((out / "config.json").read_text())["figures"]
    assert sum(f.startswith("heatmap_") for f in ran) == 4 and (out / "matrices.npz").is_file()
    for p in (out / "figures").glob("*.png"):
        p.unlink()
    warned = []
    saved, _, _, figs = rebuild(out, warn=warned.append)
    assert sorted(p.split("/")[-1] for p in figs) == sorted(ran) and not warned
    assert "not_redrawn" not in saved
    # without the matrices (a run saved before they were): the heatmaps are named, with the reason
    (out / "matrices.npz").unlink()
    saved, _, _, figs = rebuild(out, warn=warned.append)
    heat = sorted(f for f in ran if f.startswith("heatmap_"))
    assert sorted(p.split("/")[-1] for p in figs) == sorted(set(ran) - set(heat))
    assert sorted(saved["not_redrawn"]) == heat
    assert len(warned) == 1 and "not redrawn: heatmap_layers.0.png" in warned[0] and "no matrices.npz" in warned[0]


@pytest.mark.parametrize("damage, needle", [
    (lambda p, np: p.write_bytes(b"not a zip"), "matrices.npz: not a matrices file written by `crh run`"),
    (lambda p, np: np.savez(p, **{"nope|H_a": np.eye(2)}), "names no layer of report.json"),
    (lambda p, np: np.savez(p, **{"layers.0|H_a": np.ones((2, 3))}), "must be a square matrix of finite floats"),
    (lambda p, np: np.savez(p, **{"layers.0|H_a": np.full((2, 2), np.nan)}), "must be a square matrix"),
    (lambda p, np: np.savez(p, **{"layers.0|H_a": np.array([[object()]], dtype=object)}), "not a matrices file"),
])
def test_rebuild_refuses_a_damaged_matrices_file(tmp_path, damage, needle):
    import numpy as np
    from crh_kernels.experiments import SavedRunError
    out = tmp_path / "run"
    _run_tiny("fc1", out, **_QUICK)
    damage(out / "matrices.npz", np)
    with pytest.raises(SavedRunError, match=re.escape(needle)):
        rebuild(out, plots=False)


def test_a_modules_pattern_that_matches_nothing_is_an_experiment_error(tmp_path):
    with pytest.raises(ExperimentError, match=r"modules='nomatch' .*matched no module.*'layers.0'"):
        _run_tiny("fc1", tmp_path / "run", modules="nomatch", **_QUICK)
    assert not (tmp_path / "run").exists()
