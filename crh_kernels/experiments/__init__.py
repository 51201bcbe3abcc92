"""The paper's experiments (section 6, appendix C.1) and a real pretrained model.

Each experiment module has ``NAME``, ``DESCRIPTION``, ``PROFILES`` (``tiny`` for tests, ``cpu``
the default on a CPU, ``cuda`` full-scale settings), ``run(cfg, ctx) -> RunResult``,
``claims(report, extras, cfg)`` and ``figures(report, extras, cfg, out_dir)``. This module is
the registry: the experiment list (:data:`EXPERIMENTS`, defined here only), running one end to
end (:func:`run_experiment`) and rebuilding a saved run (:func:`rebuild`). How a run is carried
out and saved is :mod:`.runs`; claims tables and the rules they share are :mod:`.claims`;
``crh`` (:mod:`crh_kernels.cli`) only parses arguments and shows progress. Benchmarks are not
experiments: they live in ``bench/``.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import claims as C
from .data import MissingData
from .runs import (Context, ExperimentError, MemoryPlanError, RunResult, load_run, merge_config,
                   save_run, seed_everything, write_outputs)

#: The experiments, in the order ``crh list`` shows them: the one list (the CLI's choices, its
#: help and ``crh list`` are built from it; each name is a module of this package).
EXPERIMENTS = ("fc1", "fc2", "resnet", "transformer", "minilm")

__all__ = ["EXPERIMENTS", "get", "profile_config", "run_experiment", "rebuild", "Context",
           "ExperimentError", "MemoryPlanError", "MissingData", "RunResult"]


def get(name: str):
    """The experiment module called ``name``."""
    if name not in EXPERIMENTS:
        raise ExperimentError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{name}")


def profile_config(name: str, profile: str, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    mod = get(name)
    if profile not in mod.PROFILES:
        raise ExperimentError(f"{name} has no profile {profile!r} (profiles: {', '.join(mod.PROFILES)})")
    return merge_config(mod.PROFILES[profile], overrides or {})


def make_figures(mod, report, extras, cfg, run_dir: Path, heatmaps: bool = True) -> List[str]:
    fig_dir = Path(run_dir) / "figures"
    paths = list(report.plot(fig_dir, heatmaps=heatmaps, max_heatmaps=8))
    paths += mod.figures(report, extras, cfg, fig_dir)
    return [str(p) for p in paths]


def run_experiment(name: str, out_dir, ctx: Context, *, profile: str = "cpu",
                   overrides: Optional[Dict[str, Any]] = None, plots: bool = True
                   ) -> Tuple[RunResult, List[C.Claim], List[str], Dict[str, Any]]:
    """Run ``name`` with ``profile`` settings (updated by ``overrides``) and write the run
    directory. Returns ``(result, claims, figure paths, saved config)``."""
    mod = get(name)
    cfg = profile_config(name, profile, overrides)
    threads = cfg.get("threads")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    try:
        seed_everything(ctx.seed)
        result = mod.run(cfg, ctx)
        with ctx.timed("claims"):
            claims = mod.claims(result.report, result.extras, result.config)
        figures: List[str] = []
        if plots:
            with ctx.timed("figures"):
                figures = make_figures(mod, result.report, result.extras, result.config, Path(out_dir))
    finally:
        torch.set_num_threads(old_threads)
    saved = save_run(Path(out_dir), name, profile, result, ctx, claims, figures, time.perf_counter() - t0)
    return result, claims, figures, saved


def rebuild(run_dir, plots: bool = True) -> Tuple[Dict[str, Any], Any, List[C.Claim], List[str]]:
    """Rebuild table, claims and figures of a saved run from its files alone.
    Returns ``(saved config, report, claims, figure paths)``."""
    run_dir = Path(run_dir)
    saved, report, extras, _ = load_run(run_dir)
    name = saved.get("experiment")
    if name is None:
        raise ExperimentError(f"{run_dir}/config.json names no experiment")
    mod = get(name)
    cfg = dict(mod.PROFILES.get(saved.get("profile", "cpu"), {}))
    cfg.update(saved.get("config") or {})
    claims = mod.claims(report, extras, cfg)
    write_outputs(run_dir, report, claims, name)
    figures = make_figures(mod, report, extras, cfg, run_dir, heatmaps=False) if plots else []
    return saved, report, claims, figures
