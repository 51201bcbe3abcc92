"""fc1/fc2 at the paper's scale (issue 13, deliverable 4): the ``paper`` profile holds the paper's
setup (checked against the paper's own words), a run is resumable from checkpoints with the
numbers of an uninterrupted run, and fc1's width (SGD, Adam) and tanh parts run and claim."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from crh_kernels.cli import main
from crh_kernels.experiments import (Context, ExperimentError, RunDirError, get, profile_config,
                                     run_experiment)
from crh_kernels.experiments import claims as C
from crh_kernels.experiments import fc1, fc2, fcnet
from crh_kernels.experiments.runs import CHECKPOINT_FOLDER, CheckpointStore

PAPER = Path("/work/shared/paper/formation-of-representations.txt")
ALL = list(fc1.SWEEPS)


def _code(argv) -> int:
    """``crh`` exit code (argparse errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _paper_text() -> str:
    if not PAPER.is_file():
        pytest.skip(f"the paper's text is not here ({PAPER})")
    return " ".join(PAPER.read_text().split())


# ----------------------------------------------------------------------------- the paper profile
def test_the_paper_profile_is_the_papers_setup():
    text = _paper_text()
    # fc1 (C.1): "depth of the network (D = 4), the width of the network (d = 100), weight decay
    # strength (γ = 2 × 10^{-5}), minibatch size (B = 100)"; Fig. 16: "10^5 iterations"
    for words in ("depth of the network (D = 4), the width of the network (d = 100), weight decay "
                  "strength $(\\gamma = 2 \\times 10^{-5})$, minibatch size (B = 100)",
                  "The training proceeds for 10^5 iterations", "The training proceeds with **SGD**",
                  "x \\in \\mathbb{R}^{100}$ is sampled from an isotropic Gaussian distribution",
                  "The model is a 4-hidden-layer tanh net with the same width."):
        assert words in text, words
    p1 = fc1.PROFILES["paper"]
    assert (p1["steps"], p1["weight_decay"], p1["batch_size"], p1["width"], p1["depth"]) == (100_000, 2e-5, 100, 100, 4)
    assert (p1["d_in"], p1["d_out"], p1["teacher_width"], p1["phi_x"]) == (100, 1, 100, None)
    assert p1["optimizer"] == "sgd" and p1["momentum"] == 0.0 and p1["n_measure"] == 3000
    assert p1["weight_decay"] in p1["weight_decays"] and p1["batch_size"] in p1["batch_sizes"]
    assert p1["width"] in p1["widths"] and set(p1["sweeps"]) == set(fc1.SWEEPS)
    assert p1["tanh_depth"] - 1 == 4  # "4-hidden-layer": Linear layers = hidden layers + 1
    # fc2 (C.1): "SGD with a learning rate of 0.1 with momentum 0.9 and γ = 10^{-4} for 10⁵ steps",
    # "a batch size of 100", "3000 independently sampled data points", "5-hidden layer"
    for words in ("SGD with a learning rate of 0.1 with momentum 0.9 and $\\gamma = 10^{-4}$ for 10⁵ steps",
                  "The training proceeds with a batch size of 100",
                  "estimated using 3000 independently sampled data points",
                  "The trained model is a 5-hidden layer fully connected network with the ReLU activation",
                  "u_i^* \\in \\mathbb{R}^{100}$", "from 10^{-6} to 10^{-4}"):
        assert words in text, words
    p2 = fc2.PROFILES["paper"]
    assert (p2["steps"], p2["lr"], p2["momentum"], p2["weight_decay"], p2["batch_size"]) == (100_000, 0.1, 0.9, 1e-4, 100)
    assert (p2["n_measure"], p2["depth"] - 1, p2["width"], p2["d_out"], p2["activation"]) == (3000, 5, 100, 100, "relu")
    assert {1e-6, 1e-5, 1e-4} <= set(p2["weight_decays"])  # Fig. 4: "from 10^{-6} to 10^{-4}"
    for mod in (fc1, fc2):
        p = mod.PROFILES["paper"]
        # phases and exponents are fitted on raw moments, where the identities of the lines hold
        assert mod.PROFILES["cpu"]["raw_moments"] is True and p["raw_moments"] is True
        assert p["threads"] == 1 and p["checkpoint_every"] > 0 and mod.RESUMABLE
        assert mod.PROFILES["cuda"] == p  # `--device cuda` picks the same settings
        assert profile_config(mod.NAME, "paper")["steps"] == 100_000


def test_cli_accepts_the_paper_profile(capsys):
    assert main(["run", "fc1", "--profile", "paper", "--show-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert cfg["steps"] == 100_000 and cfg["weight_decay"] == 2e-5
    with pytest.raises(SystemExit) as info:
        main(["run", "resnet", "--profile", "paper", "--show-config"])
    assert info.value.code == 2 and "no profile 'paper'" in capsys.readouterr().err


def test_the_measurement_uses_raw_moments(tmp_path):
    result, _, _, _ = run_experiment("fc2", tmp_path / "r", Context(), profile="tiny", plots=False,
                                     overrides={"steps": 20, "weight_decays": [1e-4], "checkpoints": 1})
    for name, e in result.report.layers.items():
        assert e["exponent_moments"] == "raw", name
        assert e["identity"]["H_b"]["residual"] is not None, name


# ----------------------------------------------------------------------------- resume
def _tree(out: Path):
    """Every number a run saved: report.json (but its creation time), the sweep reports,
    extras.json and claims.json."""
    def rep(p):
        d = json.loads(p.read_text())
        d["meta"].pop("created", None)
        return d
    out = Path(out)
    return {"report": rep(out / "report.json"),
            "reports": {p.name: rep(p) for p in sorted((out / "reports").glob("*.json"))},
            "extras": json.loads((out / "extras.json").read_text()),
            "claims": json.loads((out / "claims.json").read_text())}


_RESUME = dict(steps=150, checkpoint_every=50, weight_decays=[1e-3, 1e-2], batch_sizes=[100],
               sweeps=["weight_decay", "width", "adam"], widths=[8, 16], checkpoints=3)


class _Interrupt(RuntimeError):
    pass


def _interrupt_after(monkeypatch, n_steps: int, cls=torch.optim.SGD):
    """Make the ``n_steps``-th optimizer step of ``cls`` raise (a kill between two checkpoints)."""
    real = cls.step
    count = {"n": 0}

    def step(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == n_steps:
            raise _Interrupt(f"injected interruption at optimizer step {n_steps}")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, "step", step)
    return real


@pytest.mark.parametrize("experiment, overrides, cls, at", [
    # fc1: the base run (150 steps) finished, the γ=0.01 run killed at its step 75 (checkpoint 50)
    ("fc1", _RESUME, torch.optim.SGD, 150 + 75),
    # fc1: killed in the Adam part, after SGD base, γ and width runs (a finished Adam run before it)
    ("fc1", _RESUME, torch.optim.Adam, 150 + 120),
    # fc2 (momentum: the optimizer's buffers must come back): killed in the base run, step 120
    ("fc2", dict(steps=150, checkpoint_every=50, weight_decays=[1e-5, 1e-3], checkpoints=3), torch.optim.SGD, 120),
])
def test_a_resumed_run_gives_the_numbers_of_an_uninterrupted_one(tmp_path, monkeypatch, experiment, overrides,
                                                                  cls, at):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_experiment(experiment, whole, Context(seed=3), profile="tiny", overrides=overrides, plots=False)
    assert not (whole / CHECKPOINT_FOLDER).exists()  # removed once the run is saved
    real = _interrupt_after(monkeypatch, at, cls)
    with pytest.raises(_Interrupt):
        run_experiment(experiment, cut, Context(seed=3), profile="tiny", overrides=overrides, plots=False)
    monkeypatch.setattr(cls, "step", real)
    kept = sorted(p.name for p in (cut / CHECKPOINT_FOLDER / "seed-3").iterdir())
    assert "base.done.json" in kept or experiment == "fc2"
    states = [n for n in kept if n.endswith(".pt")]
    assert len(states) == 1, kept  # the interrupted sub-run's last state, at a multiple of 50
    st = torch.load(cut / CHECKPOINT_FOLDER / "seed-3" / states[0], weights_only=True)
    assert st["step"] % 50 == 0 and 0 < st["step"] < 150
    assert not (cut / "report.json").exists()
    # without --resume the checkpoints are not silently discarded
    with pytest.raises(RunDirError, match="--resume"):
        run_experiment(experiment, cut, Context(seed=3), profile="tiny", overrides=overrides, plots=False)
    _, _, _, saved = run_experiment(experiment, cut, Context(seed=3), profile="tiny", overrides=overrides,
                                    plots=False, resume=True)
    assert saved["resumed"] and not (cut / CHECKPOINT_FOLDER).exists()
    a, b = _tree(whole), _tree(cut)
    assert a["report"] == b["report"]
    assert a["reports"] == b["reports"] and a["extras"] == b["extras"] and a["claims"] == b["claims"]


def test_resume_refuses_checkpoints_of_another_run_and_a_finished_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    over = dict(steps=100, checkpoint_every=20, weight_decays=[1e-3], batch_sizes=[100], checkpoints=1)
    real = _interrupt_after(monkeypatch, 50)
    with pytest.raises(_Interrupt):
        run_experiment("fc1", out, Context(), profile="tiny", overrides=over, plots=False)
    monkeypatch.setattr(torch.optim.SGD, "step", real)
    with pytest.raises(RunDirError, match=r"another run \(setting lr = 0.1 there, 0.05 now\)"):
        run_experiment("fc1", out, Context(), profile="tiny", overrides=dict(over, lr=0.05), plots=False, resume=True)
    with pytest.raises(RunDirError, match=r"another run \(seeds \[0\] there, \[1\] now\)"):
        run_experiment("fc1", out, Context(seed=1), profile="tiny", overrides=over, plots=False, resume=True)
    # the CLI: the same refusal is exit 2, before training
    assert _code(["run", "fc1", "--tiny", "-q", "--no-plots", "--out", str(out), "--resume", "--set", "steps=99",
                 "--set", "checkpoint_every=20", "--set", "weight_decays=1e-3", "--set", "batch_sizes=100",
                 "--set", "checkpoints=1"]) == 2
    assert (out / CHECKPOINT_FOLDER / "seed-0" / "base.pt").is_file()  # still there
    # resnet keeps no checkpoints: --resume is refused rather than silently restarting
    with pytest.raises(ExperimentError, match="does not checkpoint"):
        run_experiment("resnet", tmp_path / "r", Context(), profile="tiny", plots=False, resume=True)
    assert _code(["run", "resnet", "--tiny", "-q", "--resume", "--out", str(tmp_path / "r2")]) == 2
    assert not (tmp_path / "r2").exists()
    # --overwrite without --resume starts afresh (the checkpoints are discarded)
    run_experiment("fc1", out, Context(), profile="tiny", overrides=over, plots=False, overwrite=True)
    assert (out / "report.json").is_file() and not (out / CHECKPOINT_FOLDER).exists()
    with pytest.raises(RunDirError, match="already holds a finished run"):
        run_experiment("fc1", out, Context(), profile="tiny", overrides=over, plots=False, resume=True)
    # --resume with nothing to resume is a fresh run
    run_experiment("fc1", tmp_path / "fresh", Context(), profile="tiny", overrides=over, plots=False, resume=True)
    assert (tmp_path / "fresh" / "report.json").is_file()


def test_a_failed_run_leaves_no_checkpoint(tmp_path):
    # diverged: an ExperimentError, nothing to resume from
    with pytest.raises(ExperimentError, match="diverged"):
        run_experiment("fc1", tmp_path / "run", Context(), profile="tiny", plots=False,
                       overrides=dict(steps=120, checkpoint_every=20, lr=1e6, checkpoints=1))
    assert not (tmp_path / "run").exists()


class _Evil:
    pass


def test_checkpoint_files_are_written_atomically_and_read_back_safely(tmp_path):
    store = CheckpointStore(tmp_path / "s", every=10)
    assert store.due(20) and not store.due(25) and not CheckpointStore(tmp_path, 0).due(10)
    store.save("base", {"step": 10, "x": torch.arange(3)})
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["base.pt"]  # no temporary file left
    assert store.load("base")["step"] == 10 and store.load("other") is None
    with pytest.raises(ValueError, match="checkpoint key"):
        store.save("../evil", {})
    (tmp_path / "s" / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExperimentError, match=r"checkpoints/bad.pt: cannot be read.*remove it"):
        store.load("bad")
    torch.save({"obj": _Evil()}, tmp_path / "s" / "evil.pt")  # an arbitrary object: refused
    with pytest.raises(ExperimentError, match="evil.pt: cannot be read"):
        store.load("evil")


# ----------------------------------------------------------------------------- width, Adam, tanh
def test_width_adam_and_tanh_parts_run_with_figures_and_claims(tmp_path):
    out = tmp_path / "run"
    result, claims, figures, _ = run_experiment(
        "fc1", out, Context(), profile="tiny", plots=True,
        overrides={"sweeps": ALL, "steps": 60, "checkpoints": 1, "weight_decays": [1e-3], "batch_sizes": [100]})
    ex = result.extras
    assert [r["width"] for r in ex["width"]] == [16, 8]  # the base run (width 16) and width 8
    assert [r["width"] for r in ex["adam_width"]] == [8, 16]
    # the tanh net: tanh_depth Linear layers, tanh activations, its whole layer entries kept
    t = ex["tanh"]
    assert t["depth"] == 3 and sorted(t["report_layers"]) == [f"layers.{i}" for i in range(3)]
    assert "reports" in {p.parent.name for p in out.glob("reports/tanh.json")}
    names = {Path(f).name for f in figures}
    assert {"alpha_vs_width.png", "alpha_vs_width_adam.png", "tanh_scalings.png"} <= names
    by = {c.claim: c for c in claims}
    assert by["wider nets align as well as thinner ones with SGD"].quote == fc1.QUOTE_WIDTH_SGD
    adam = [c for c in claims if "width with Adam" in c.claim]
    assert len(adam) == 2 and all(c.quote == fc1.QUOTE_WIDTH_ADAM and "Fig. 17" in c.source for c in adam)
    tanh = [c for c in claims if c.claim.startswith("tanh net (2 hidden layers)")]
    assert len(tanh) == 2 and all(fc1.QUOTE_TANH in c.quote and "Fig. 20" in c.source for c in tanh)
    # the γ and B sweeps were not run (one setting each): no claim about them
    assert not any("weight decay" in c.claim or "batch size" in c.claim for c in claims)
    # `crh report` gives the same claims from the files alone
    from crh_kernels.experiments import rebuild
    _, _, claims2, _ = rebuild(out, plots=False)
    assert [(c.claim, c.verdict, c.measured) for c in claims2] == [(c.claim, c.verdict, c.measured) for c in claims]


def test_the_models_of_the_parts_are_what_they_say(monkeypatch, tmp_path):
    seen = []
    real = fcnet.build

    def build(cfg, ctx):
        teacher, model = real(cfg, ctx)
        # what the net computes: tanh (or ReLU) between its Linear layers
        x = torch.randn(5, cfg["d_in"])
        h = x
        act = torch.tanh if cfg["activation"] == "tanh" else torch.relu
        for i, lin in enumerate(model.layers):
            h = lin(h)
            if i < len(model.layers) - 1:
                h = act(h)
        assert torch.allclose(model(x), h)
        seen.append((cfg["activation"], cfg["optimizer"], cfg["width"], cfg["depth"], cfg["lr"],
                     len(model.layers)))
        return teacher, model
    monkeypatch.setattr(fcnet, "build", build)
    opts = []
    real_opt = fcnet.make_optimizer
    monkeypatch.setattr(fcnet, "make_optimizer", lambda cfg, m, wd: opts.append(real_opt(cfg, m, wd)) or opts[-1])
    run_experiment("fc1", tmp_path / "r", Context(), profile="tiny", plots=False,
                   overrides={"sweeps": ["adam", "tanh"], "steps": 10, "checkpoints": 1, "adam_lr": 3e-3})
    assert [s[:5] for s in seen] == [("relu", "sgd", 16, 4, 0.1), ("relu", "adam", 8, 4, 3e-3),
                                     ("relu", "adam", 16, 4, 3e-3), ("tanh", "sgd", 16, 3, 0.1)]
    assert seen[-1][5] == 3  # tanh_depth Linear layers
    assert [type(o).__name__ for o in opts] == ["SGD", "Adam", "Adam", "SGD"]
    assert opts[1].defaults["lr"] == 3e-3 and opts[1].defaults["weight_decay"] == 1e-3
    with pytest.raises(ExperimentError, match="unknown part 'depth'"):
        run_experiment("fc1", tmp_path / "x", Context(), profile="tiny", plots=False, overrides={"sweeps": ["depth"]})


def _width_runs(slopes_by_seed, widths=(25, 100, 400)):
    """Synthetic runs whose mean hidden RGA is a + s·log10(width) per seed."""
    cfg = dict(fc1.PROFILES["tiny"])
    runs = []
    for seed, (a, s) in enumerate(slopes_by_seed):
        recs = []
        for w in widths:
            v = a + s * math.log10(w)
            layers = {f"layers.{i}": {"alpha": {r: v for r in C.RELATIONS}} for i in range(4)}
            recs.append({"width": w, "layers": layers})
        runs.append((seed, None, {"width": recs}))
    hidden = fcnet.hidden_representations(cfg, [f"layers.{i}" for i in range(4)])
    return runs, hidden


@pytest.mark.parametrize("per_seed, want", [
    ([(0.6, 0.01), (0.62, -0.01), (0.61, 0.0)], C.HOLDS),     # flat within ±0.1 per decade
    ([(0.2, 0.30), (0.25, 0.28), (0.22, 0.32)], C.FAILS),     # clearly rising
    ([(0.6, 0.05), (0.2, 0.25), (0.9, -0.15)], C.UNDETERMINED),  # seeds disagree: wide interval
])
def test_similar_alignment_over_width_is_an_equivalence_test(per_seed, want):
    runs, hidden = _width_runs(per_seed)
    c = fc1._similar_claim(runs, hidden, "hidden layers 1–3", 0.1)
    assert c.verdict == want, c.measured
    assert "within ±0.1" in c.rule


def test_one_seed_preamble_names_the_jackknife_interval_when_the_report_has_one():
    from crh_kernels.experiments.runs import seeds_preamble
    plain = seeds_preamble([0])
    assert "has no interval, so its claim is **undetermined**" in plain and "jackknife" not in plain
    jk = seeds_preamble([0], {"k": 8, "by": "batch", "method": "delete-one-block jackknife", "z": 2.36})
    assert "One seed (0): a claim on an α uses the report's own interval" in jk
    assert "K = 8 blocks (by batch" in jk and "`--seeds 3` gives intervals over seeds" in jk
    assert seeds_preamble([0, 1], {"k": 8, "by": "batch"}).startswith("2 seeds (0, 1)")  # seeds win
