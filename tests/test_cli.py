"""`crh` / `python -m crh_kernels`: a tiny run writes the run directory, `crh report` rebuilds
it, and bad arguments give a clear message, exit code 2 and no traceback."""
from __future__ import annotations

import json
import os
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
    assert "--device" in out and "--steps" in out and "--max-memory" in out


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
