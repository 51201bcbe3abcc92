"""bench/gpu_check.sh's dry run on CPU: every step's plumbing, the deadline arithmetic, the
stale-lock clean-up and what it leaves in $OUT (at most 8 files come back from the GPU machine).

The dry run runs each step's command on CPU-sized inputs (≈ 40 s on two cores); a second run
under a short deadline checks that steps are cut in order of value and the deadline holds.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "check", "table", "triton_tests", "gpt2_step", "cuda_build", "cuda_tests", "cuda_table"]
FILES = {"gpu_check.log", "gpu_check.json", "gpu_table.json", "gpt2_step.json", "gpu_table_cuda.json"}
DEADLINE = 540


def _dry_run(tmp: Path, **env):
    out, ext = tmp / "out", tmp / "torch_extensions"
    run_env = {k: v for k, v in os.environ.items()
               if k not in ("TRITON_INTERPRET", "CRH_TEST_DEVICE", "OUT", "CRH_GPU_CHECK_DEADLINE")}
    run_env.update(OUT=str(out), TORCH_EXTENSIONS_DIR=str(ext), CRH_GPU_CHECK_STAGE=str(tmp / "stage"),
                   **env)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=run_env,
                          capture_output=True, text=True, timeout=600)
    return proc, out, ext


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    # what a JIT build killed by a timeout leaves behind: it would hang the next build
    stale = tmp / "torch_extensions" / "crh_kernels_cuda" / "lock"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    proc, out, ext = _dry_run(tmp)
    return proc, out, ext, stale


def _summary(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def test_dry_run_passes_every_step_in_order(dry):
    proc, out, _, _ = dry
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (out / "gpu_check.log").read_text()
    assert proc.stdout == log  # one combined log, the same as what the call prints
    assert re.findall(rf"^== \[\d/{len(STEPS)}\] (\w+)", log, flags=re.M) == STEPS
    for name in STEPS:
        assert re.search(rf"^-- {name}: ok in \d+s$", log, flags=re.M), name
    assert "mode: dry run (CPU)" in log and f"deadline {DEADLINE}s" in log
    steps = _summary(out)["steps"]
    assert [s["name"] for s in steps] == STEPS and all(s["status"] == "ok" for s in steps)


def test_files_in_out(dry):
    _, out, ext, _ = dry
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and {p.name for p in files} == FILES
    assert all(p.parent == out for p in files)
    assert not str(ext).startswith(str(out))  # the extension builds outside $OUT
    table = json.loads((out / "gpu_table.json").read_text())
    assert {(r["n"], r["d"]) for r in table} == {(512, 96), (1024, 16)}
    assert {r["impl"] for r in table} == {"mm", "pipeline", "torch"}
    assert all(r["rel_err"] < 1e-4 for r in table if r["impl"] == "torch")
    cpp = json.loads((out / "gpu_table_cuda.json").read_text())  # the dry run's stand-in: cpp
    assert {r["impl"] for r in cpp} == {"mm", "pipeline", "cpp"}
    step = json.loads((out / "gpt2_step.json").read_text())
    assert step["size"] == "tiny" and step["step_s_with"] > 0 and step["step_s_without"] > 0


def test_deadline_arithmetic(dry):
    _, out, _, _ = dry
    s = _summary(out)
    budgets = [st["budget_s"] for st in s["steps"]]
    assert s["deadline_s"] == DEADLINE and sum(budgets) == s["budget_total_s"] <= DEADLINE
    cumulative = 0
    for st in s["steps"]:
        cumulative += st["budget_s"]
        # a step may run (with its kill grace) until its cumulative budget, never past the deadline
        assert st["start_s"] + st["limit_s"] + st["grace_s"] == min(cumulative, DEADLINE)
        assert st["seconds"] <= st["limit_s"] + st["grace_s"]
    assert s["elapsed_s"] <= DEADLINE


def test_stale_lock_removed_before_building(dry):
    proc, _, _, stale = dry
    assert not stale.exists()
    assert f"removed stale lock {stale}" in proc.stdout


def test_early_steps_cannot_build_extensions(dry):
    """Until the extension steps, Python runs from a staged tree without csrc/: no JIT build
    can eat an early step's time (and leave a lock when killed)."""
    log = dry[0].stdout
    check = log[log.index(f"== [2/{len(STEPS)}] check"):log.index(f"== [3/{len(STEPS)}]")]
    assert re.search(r"^cpp +- +unavailable .*sources for a JIT build are missing", check, flags=re.M)


def test_short_deadline_cuts_the_least_valuable_steps(tmp_path):
    proc, out, _ = _dry_run(tmp_path, CRH_GPU_CHECK_DEADLINE="17")
    assert proc.returncode != 0  # a skipped step is a check not made
    s = _summary(out)
    assert s["deadline_s"] == 17 and s["elapsed_s"] <= 17 + 1
    statuses = [st["status"] for st in s["steps"]]
    ran = [not x.startswith("skipped") for x in statuses]
    assert ran[0] and not ran[-1]
    assert ran == sorted(ran, reverse=True), statuses  # a prefix runs, the rest is skipped
    for st in s["steps"]:
        if not st["status"].startswith("skipped"):
            assert st["start_s"] + st["limit_s"] + st["grace_s"] <= 17
    assert len(list(out.iterdir())) <= 8
