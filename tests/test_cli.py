"""`crh` / `python -m crh_kernels`: a tiny run writes the run directory, `crh report` rebuilds
it, and bad arguments give a clear message, exit code 2 and no traceback."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crh_kernels.cli import main
from crh_kernels.experiments import EXPERIMENTS

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _crh(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "crh_kernels", *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=timeout)


def test_module_run_fc1_tiny_writes_everything(tmp_path):
    out = tmp_path / "run"
    r = _crh("run", "fc1", "--tiny", "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("report.json", "table.txt", "claims.md", "claims.json", "extras.json", "config.json"):
        assert (out / f).is_file(), f
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert "alpha_vs_weight_decay.png" in pngs and "alpha.png" in pngs
    assert "claims hold" in r.stdout and "fRGA" in r.stdout          # claims and table printed
    assert "train" in r.stderr                                        # a progress bar was shown
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["experiment"] == "fc1" and cfg["seed"] == 3 and cfg["profile"] == "tiny"
    # `crh report` rebuilds table, claims and figures from the saved files alone
    (out / "table.txt").unlink()
    (out / "claims.md").unlink()
    r2 = _crh("report", str(out), "--no-plots")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert (out / "table.txt").is_file() and (out / "claims.md").is_file()
    assert "claims hold" in r2.stdout


def test_help(capsys):
    assert main([]) == 0
    assert "crh" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--device" in out and "--steps" in out and "--max-memory" in out and "--overwrite" in out


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert f"{name}:" in out


def test_show_config(capsys):
    assert main(["run", "fc2", "--steps", "7", "--set", "weight_decays=1e-4,1e-3", "--show-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert cfg["steps"] == 7 and cfg["weight_decays"] == [1e-4, 1e-3] and cfg["momentum"] == 0.9


@pytest.mark.parametrize("argv, needle", [
    (["run", "fc9"], "invalid choice: 'fc9'"),
    (["run", "fc1", "--steps", "0"], "--steps: must be a positive integer, got 0"),
    (["run", "fc1", "--steps", "-5"], "--steps: must be a positive integer, got -5"),
    (["run", "fc1", "--steps", "ten"], "--steps: must be a positive integer"),
    (["run", "fc1", "--set", "nope=1"], "unknown setting 'nope'"),
    (["run", "fc1", "--set", "steps"], "expected KEY=VALUE"),
    (["run", "fc1", "--max-memory", "lots"], "not a size"),
    (["run", "fc1", "--tiny", "--profile", "cpu"], "--tiny contradicts"),
    (["report", "/nonexistent/run"], "is not a directory"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the error path cannot be reached")
    with pytest.raises(SystemExit) as info:
        main(["run", "fc1", "--device", "cuda"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err


def test_report_of_a_non_run_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path)])
    assert info.value.code == 2
    assert "report.json" in capsys.readouterr().err


def test_memory_plan_refusal_via_cli(tmp_path, capsys):
    rc = main(["run", "fc1", "--tiny", "-q", "--max-memory", "4K", "--out", str(tmp_path / "r")])
    assert rc == 3
    err = capsys.readouterr().err
    assert "memory plan" in err and "largest matrices" in err and "options" in err
    assert not (tmp_path / "r" / "report.json").exists()


def test_missing_data_message_via_cli(tmp_path, capsys):
    rc = main(["run", "resnet", "--tiny", "-q", "--set", f"data_dir={tmp_path}", "--out", str(tmp_path / "r")])
    assert rc == 3
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err


def test_check_reports_every_available_backend(capsys):
    import crh_kernels
    assert main(["check", "--n", "300", "--d", "37"]) == 0
    out = capsys.readouterr().out
    for name, (ok, _) in crh_kernels.available_backends().items():
        assert name in out
    assert "NO" not in out.split("ok", 1)[1]  # every bound held


# ----------------------------------------------------------------------------- issue 12, item 8
# `crh run`: the run directory, the backend and matplotlib are checked before training; what was
# measured is saved before figures; a figure never loses a run.
def _code(argv) -> int:
    """main(argv)'s exit code, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def no_training(monkeypatch):
    """fc1's training replaced by a call counter: a refusal must come before any step."""
    import crh_kernels.experiments.fc1 as fc1
    calls = []
    monkeypatch.setattr(fc1, "run", lambda cfg, ctx: calls.append(1) or pytest.fail("trained"))
    return calls


def _one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    msg = lines[-1]
    for n in needles:
        assert n in msg, (n, err)
    return msg


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys, no_training):
    f = tmp_path / "afile"
    f.write_text("mine")
    assert _code(["run", "fc1", "--tiny", "-q", "--out", str(f)]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "not a directory")
    assert _code(["run", "fc1", "--tiny", "-q", "--out", str(f / "sub")]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "cannot create")
    assert f.read_text() == "mine" and not no_training


def test_existing_run_dir_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "fc1", "--tiny", "-q", "--no-plots", "--out", str(out)]
    assert main(argv + ["--set", "steps=20"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _code(argv) == 2  # refused: the first run stays as it was
    _one_error_line(capsys.readouterr().err, "already holds a run", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # a directory of other files is refused too, before training
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert _code(["run", "fc1", "--tiny", "-q", "--no-plots", "--out", str(other)]) == 2
    _one_error_line(capsys.readouterr().err, "already holds files", "--overwrite")
    # --overwrite replaces the run files (no stale figure or sweep report), keeps other files
    (out / "figures").mkdir()
    (out / "figures" / "stale.png").write_bytes(b"old")
    (out / "reports" / "stale.json").write_text("{}")
    (out / "keep.txt").write_text("mine")
    assert main(argv + ["--overwrite", "--set", "steps=30"]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 30
    assert not (out / "figures").exists() and not (out / "reports" / "stale.json").exists()
    assert (out / "keep.txt").read_text() == "mine"
    for f in ("report.json", "extras.json", "table.txt", "claims.md", "claims.json"):
        assert (out / f).is_file(), f


def test_overwrite_keeps_the_old_run_until_the_new_one_is_trained(tmp_path, capsys, monkeypatch):
    import crh_kernels.experiments.fc1 as fc1
    from crh_kernels.experiments import ExperimentError
    out = tmp_path / "run"
    assert main(["run", "fc1", "--tiny", "-q", "--no-plots", "--out", str(out), "--set", "steps=20"]) == 0
    before = (out / "report.json").read_bytes()

    def diverge(cfg, ctx):
        raise ExperimentError("training diverged at step 3 (loss nan); lower --set lr=")
    monkeypatch.setattr(fc1, "run", diverge)
    assert main(["run", "fc1", "--tiny", "-q", "--no-plots", "--out", str(out), "--overwrite"]) == 3
    assert (out / "report.json").read_bytes() == before
    # a fresh directory of a failed run is not left behind empty
    assert main(["run", "fc1", "--tiny", "-q", "--no-plots", "--out", str(tmp_path / "new")]) == 3
    assert not (tmp_path / "new").exists()


def test_unavailable_backend_is_an_argparse_error_before_anything_runs(capsys, monkeypatch, tmp_path,
                                                                       no_training):
    import crh_kernels.backends as B
    out = tmp_path / "run"
    # every backend that cannot measure CPU tensors here (cuda on a CPU machine)
    for name, (ok, _) in B.available_backends().items():
        if ok and B.get(name).supports(torch.device("cpu"))[0]:
            continue
        assert _code(["run", "fc1", "--tiny", "-q", "--backend", name, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        _one_error_line(err, f"--backend {name}: unavailable on cpu", "usable here")
        assert "crh run fc1:" not in err  # not even the run header
    # deterministic whatever the machine: the torch backend made unavailable
    monkeypatch.setattr(B.backend_class("torch"), "availability", lambda self: (False, "switched off by the test"))
    assert _code(["run", "fc1", "--tiny", "--backend", "torch", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    _one_error_line(err, "--backend torch: unavailable on cpu: switched off by the test")
    assert "crh run fc1:" not in err
    monkeypatch.setenv("CRH_BACKEND", "torch")  # the environment variable is checked the same way
    assert _code(["run", "fc1", "--tiny", "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "CRH_BACKEND=torch: unavailable on cpu")
    assert not out.exists() and not no_training


_NO_MPL = ("import sys; sys.modules['matplotlib'] = None\n"  # matplotlib cannot be imported
           "from crh_kernels.cli import main\n"
           "sys.exit(main(sys.argv[1:]))\n")


def _crh_without_matplotlib(*args):
    return subprocess.run([sys.executable, "-c", _NO_MPL, *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=300)


def test_without_matplotlib_the_run_is_saved_with_a_warning(tmp_path):
    out = tmp_path / "run"
    r = _crh_without_matplotlib("run", "fc1", "--tiny", "-q", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("crh: warning:")]
    assert len(warning) == 1 and "matplotlib is not installed" in warning[0]
    assert "crh report" in warning[0]  # says how to get the figures later
    for f in ("report.json", "extras.json", "config.json", "table.txt", "claims.md", "claims.json"):
        assert (out / f).is_file(), f
    assert not list(out.glob("figures/*.png"))
    assert "matplotlib" in json.loads((out / "config.json").read_text())["figures_skipped"]
    assert "claims hold" in r.stdout and "no figures" in r.stdout
    r2 = _crh_without_matplotlib("report", str(out))  # crh report without matplotlib: same
    assert r2.returncode == 0 and "matplotlib is not installed" in r2.stderr, r2.stderr[-3000:]
    # once matplotlib is there, `crh report` draws the figures of the saved run
    r3 = _crh("report", str(out))
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert {"alpha.png", "alpha_vs_weight_decay.png"} <= {p.name for p in out.glob("figures/*.png")}


def test_a_failing_figure_is_a_warning_and_the_run_is_saved_first(tmp_path, capsys, monkeypatch):
    import crh_kernels.experiments.fc1 as fc1
    import crh_kernels.plots as P
    out = tmp_path / "run"
    seen = {}
    real_alpha = P.plot_alpha

    def alpha_after_save(rep, path):
        # figures come last: what was measured, the claims and the table are already on disk
        seen["saved"] = all((out / f).is_file() for f in ("report.json", "extras.json", "config.json",
                                                          "claims.md", "table.txt"))
        return real_alpha(rep, path)

    def broken(*args, **kwargs):
        raise ValueError("x and y must have same first dimension\nsecond line")
    monkeypatch.setattr(P, "plot_alpha", alpha_after_save)
    monkeypatch.setattr(P, "plot_spectra", broken)
    monkeypatch.setattr(P, "plot_heatmaps", broken)
    monkeypatch.setattr(fc1, "figures", broken)
    assert main(["run", "fc1", "--tiny", "-q", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and seen["saved"]
    warnings_ = [ln for ln in err.splitlines() if ln.startswith("crh: warning: figure")]
    assert len(warnings_) == 3 and "spectra.png" in warnings_[0] and "same first dimension" in warnings_[0]
    pngs = {p.name for p in out.glob("figures/*.png")}
    assert pngs == {"alpha.png", "exponents.png", "phase.png"}  # the others were still drawn
    saved = json.loads((out / "config.json").read_text())
    assert len(saved["figure_errors"]) == 3 and sorted(saved["figures"]) == sorted(pngs)
    for f in ("report.json", "extras.json", "table.txt", "claims.md", "claims.json"):
        assert (out / f).is_file(), f


# ----------------------------------------------------------------------------- issue 12, item 9
# `crh report`: a malformed or inconsistent saved run is exit 2 with one line naming the file and
# the field, never a traceback and never one experiment's data read as another's claims.
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "fc1"
    assert main(["run", "fc1", "--tiny", "-q", "--no-plots", "--out", str(out), "--set", "steps=20"]) == 0
    return out


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    d = fn(d) or d
    path.write_text(json.dumps(d))


def _set(keys, value):
    def fn(d):
        x = d
        for k in keys[:-1]:
            x = x[k]
        x[keys[-1]] = value
    return fn


def _deep(text):  # a JSON value nested 100000 levels deep in meta
    return text.replace('"meta": {', '"meta": {"x": ' + "[" * 100000 + "]" * 100000 + ", ", 1)


_BAD_RUNS = {
    "layers_a_list": ("report.json", _set(["layers"], [1, 2]), "report.json: layers must be an object"),
    "p_a_string": ("report.json", _set(["layers", "layers.1", "p"], "abc"),
                   'report.json: layers["layers.1"].p must be a finite number or null'),
    "n_negative": ("report.json", _set(["layers", "layers.0", "n"], -3), 'layers["layers.0"].n must be an integer'),
    "alpha_a_list": ("report.json", _set(["layers", "layers.2", "alpha_cov", "forward_RGA"], [0.5]),
                     'layers["layers.2"].alpha_cov["forward_RGA"] must be a finite number'),
    "exponent_z_string": ("report.json", _set(["layers", "layers.0", "exponents", "z"], "zz"),
                          'layers["layers.0"].exponents.z must be a list'),
    "notes_a_number": ("report.json", _set(["meta", "notes"], 7), "report.json: meta.notes must be a list"),
    "top_level_list": ("report.json", lambda d: [d], "report.json: the top level must be an object"),
    "not_a_report": ("report.json", _set(["format"], "other/1"), "not a crh_kernels report"),
    "deep_nesting": ("report.json", _deep, "report.json: nested 100002 levels deep"),
    "nan_token": ("report.json", lambda t: t.replace('"p": ', '"p": NaN, "p_": ', 1), "report.json: NaN is not a JSON number"),
    "overflowing_number": ("report.json", lambda t: t.replace('"p": ', '"p": 1e999, "p_": ', 1),
                           "report.json: number 1e999 overflows"),
    "not_json": ("report.json", lambda t: t[: len(t) // 2], "report.json: not valid JSON"),
    "sweep_report": ("reports/bs_20.json", _set(["layers", "layers.0", "kind"], 3),
                     'reports/bs_20.json: layers["layers.0"].kind must be a string'),
    "config_a_list": ("config.json", lambda d: [d], "config.json: must be an object"),
    "config_unknown_experiment": ("config.json", _set(["experiment"], "fc9"), "config.json: experiment must be one of"),
    "config_other_experiment": ("config.json", _set(["experiment"], "fc2"),
                                "report.json: holds a fc1 run but config.json says fc2"),
    "config_setting_type": ("config.json", _set(["config", "steps"], "many"),
                            "config.json: setting 'steps' must be an integer"),
    "extras_a_list": ("extras.json", lambda d: [d], "extras.json: must be an object"),
    "extras_wrong_type": ("extras.json", _set(["weight_decay"], "high"), "not what a fc1 run writes"),
}


@pytest.mark.parametrize("case", sorted(_BAD_RUNS))
def test_report_of_a_malformed_run_is_exit_2_naming_the_field(case, saved_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    name, edit, needle = _BAD_RUNS[case]
    path = run / name
    if name == "report.json" and case in ("deep_nesting", "nan_token", "overflowing_number", "not_json"):
        path.write_text(edit(path.read_text()))
    else:
        _edit_json(path, edit)
    before = (run / "claims.md").read_text()
    assert _code(["report", str(run), "--no-plots"]) == 2
    msg = _one_error_line(capsys.readouterr().err, needle)
    assert len(capsys.readouterr().err.strip().splitlines()) <= 1 and len(msg) < 400
    assert (run / "claims.md").read_text() == before  # nothing was rewritten


def test_report_refuses_another_experiments_data(saved_run, tmp_path, capsys):
    """Runs written before report.json named its experiment: the settings and extras give a
    config that claims another experiment away."""
    import shutil
    for other, config in (("fc2", None), ("resnet", {}), ("transformer", {}), ("minilm", {})):
        run = tmp_path / other
        shutil.copytree(saved_run, run)
        _edit_json(run / "report.json", lambda d: [d["meta"].pop("experiment"), d][1])
        _edit_json(run / "config.json", lambda d: d.update(experiment=other, profile="tiny",
                                                          **({} if config is None else {"config": config})))
        assert _code(["report", str(run), "--no-plots"]) == 2, other
        _one_error_line(capsys.readouterr().err, "another experiment")
    # the untouched run still rebuilds
    assert main(["report", str(saved_run), "--no-plots"]) == 0


# ----------------------------------------------------------------------------- issue 15, item 3
def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "fc1", "--tiny", "--out", str(out), "--no-plots", "--steps", "20",
                 "--set", "weight_decays=1e-3", "--set", "batch_sizes=100"]) == 0
    cap = capsys.readouterr()
    for stream in (cap.err, cap.out):
        assert "\r" not in stream and "\x1b" not in stream
    lines = cap.err.splitlines()
    assert any(line.startswith("base γ=0.001 B=100 train: done, 20/20 (100%) after ") and "loss=" in line
               for line in lines), lines
    # --tiny is labelled a smoke test: at the start (stderr), above the table and in the tally
    assert "SMOKE TEST (profile tiny" in cap.err
    assert cap.out.startswith("SMOKE TEST (profile tiny") and "numbers mean nothing" in cap.out
    assert "claims hold (smoke test: the verdicts mean nothing)" in cap.out
    assert "Legend (docs/spec.md" in cap.out


def test_line_bar_and_the_terminal_bar():
    import io
    from tqdm.auto import tqdm
    from crh_kernels.cli import LineBar, _progress
    buf = io.StringIO()
    with _progress(False, buf)(total=4, desc="train") as bar:        # not a terminal: lines
        assert isinstance(bar, LineBar)
        bar.interval = 0.0                                            # a line per update
        for _ in range(4):
            bar.set_postfix(loss="0.100", refresh=False)
            bar.update(1)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("train: 1/4 (25%) after ") and lines[0].endswith(" s, loss=0.100")
    assert lines[-1].startswith("train: done, 4/4 (100%) after ") and len(lines) == 5

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    bar = _progress(False, term)(total=2, desc="train")
    assert isinstance(bar, tqdm)
    bar.update(2)
    bar.close()
    assert "\r" in term.getvalue()                                   # a real bar on a terminal
    assert _progress(True, term)(total=2).__class__.__name__ == "NullBar"


def test_report_says_which_figures_it_cannot_redraw(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert main(["run", "fc1", "--tiny", "--out", str(out), "--quiet", "--steps", "20",
                 "--set", "weight_decays=1e-3", "--set", "batch_sizes=100"]) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("and 11 figures in " + str(out) + "/figures"), last
    (out / "matrices.npz").unlink()
    assert main(["report", str(out)]) == 0
    cap = capsys.readouterr()
    last = cap.out.strip().splitlines()[-1]
    assert "7 figures" in last and "not redrawn: heatmap_layers.0.png, heatmap_layers.1.png" in last
    assert "no matrices.npz" in last and "crh: warning: not redrawn" in cap.err


def test_one_measured_run_time_everywhere():
    """`crh run fc1` takes the same measured time in README, `crh --help` and docs/experiments.md."""
    from crh_kernels.cli import FC1_RUN_TIME, build_parser
    assert re.search(r"\d+ s\b", FC1_RUN_TIME) and re.search(r"20\d\d-\d\d-\d\d", FC1_RUN_TIME)
    flat = lambda text: " ".join(text.split())
    helptext = flat(build_parser().format_help())
    readme, docs = flat((ROOT / "README.md").read_text()), flat((ROOT / "docs/experiments.md").read_text())
    for where, text in (("crh --help", helptext), ("README.md", readme), ("docs/experiments.md", docs)):
        assert FC1_RUN_TIME in text, where
        for stale in ("about a minute", "≈ 1 minute", "≈ 2 minutes", "| 58 s |"):
            assert stale not in text, (where, stale)
