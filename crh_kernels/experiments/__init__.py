"""The paper's experiments (section 6, appendix C.1) and a real pretrained model.

Each experiment module has ``NAME``, ``DESCRIPTION``, ``PROFILES`` (``tiny`` for tests, ``cpu``
the default on a CPU, ``cuda`` full-scale settings), ``run(cfg, ctx) -> RunResult``,
``claims(report, extras, cfg)`` and ``figures(report, extras, cfg, out_dir)``; each also has
a ``seeds`` setting and ``claims_over_seeds(runs, cfg)`` with ``runs = [(seed, report, extras)]``: ``--seeds N`` trains
the N seeds into one run directory (the first seed's run, the others under ``seeds/``) and
writes claims over all of them. fc1 and fc2 also have a ``paper`` profile (the paper's setup,
runnable on a CPU) and ``RESUMABLE = True`` (checkpoints; ``--resume``). This module is
the registry: the experiment list (:data:`EXPERIMENTS`, defined here only), running one end to
end (:func:`run_experiment`) and rebuilding a saved run (:func:`rebuild`). How a run is carried
out and saved is :mod:`.runs`; claims tables and the rules they share are :mod:`.claims`;
``crh`` (:mod:`crh_kernels.cli`) only parses arguments and shows progress. Benchmarks are not
experiments: they live in ``bench/``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import claims as C
from .data import MissingData
from .runs import (CHECKPOINT_FOLDER, CheckpointStore, Context, ExperimentError, MemoryPlanError, RunDirError,
                   RunResult, SavedRunError, SMOKE_PROFILES, checkpoints_hold_progress, clear_run_files,
                   holds_run, load_run, merge_config, open_checkpoints, prepare_run_dir, remove_checkpoints,
                   remove_if_empty, save_run, seed_dir, seed_everything, seeds_preamble, smoke_note,
                   write_config, write_outputs)

#: The experiments, in the order ``crh list`` shows them: the one list (the CLI's choices, its
#: help and ``crh list`` are built from it; each name is a module of this package).
EXPERIMENTS = ("fc1", "fc2", "resnet", "transformer", "minilm", "simclr")

__all__ = ["EXPERIMENTS", "get", "profile_config", "run_experiment", "rebuild", "seeds_of", "claims_of", "Context",
           "ExperimentError", "MemoryPlanError", "MissingData", "RunDirError", "RunResult",
           "SavedRunError", "figures_unavailable", "SMOKE_PROFILES", "smoke_note"]


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


def figures_unavailable() -> Optional[str]:
    """Why no figure can be drawn here (matplotlib missing or broken), or None."""
    from ..plots import unavailable
    return unavailable()


def seeds_of(name: str, cfg: Dict[str, Any], first: int) -> List[int]:
    """The seeds of a run: ``first``, ``first + 1``, … (``cfg["seeds"]`` of them, 1 when the
    experiment has no such setting). More than one needs an experiment that aggregates claims
    over seeds (``claims_over_seeds``: every experiment in the registry has it); else
    :class:`ExperimentError`."""
    n = cfg.get("seeds", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ExperimentError(f"setting 'seeds' must be a positive integer, got {n!r}")
    if n > 1 and not hasattr(get(name), "claims_over_seeds"):
        multi = [e for e in EXPERIMENTS if hasattr(get(e), "claims_over_seeds")]
        raise ExperimentError(f"{name} does not aggregate claims over seeds ({', '.join(multi)} do)")
    return [int(first) + i for i in range(n)]


def claims_of(mod, runs: List[Tuple[int, Any, Dict[str, Any]]], cfg: Dict[str, Any]) -> List[C.Claim]:
    """The claims of ``runs`` = ``[(seed, report, extras)]``: the experiment's
    ``claims_over_seeds`` where it has one, else its ``claims`` of the one run."""
    if hasattr(mod, "claims_over_seeds"):
        return mod.claims_over_seeds(runs, cfg)
    if len(runs) != 1:
        raise ExperimentError(f"{mod.NAME} does not aggregate claims over seeds")
    _, rep, extras = runs[0]
    return mod.claims(rep, extras, cfg)


def make_figures(mod, report, extras, cfg, run_dir: Path, heatmaps: bool = True,
                 warn: Optional[Callable[[str], None]] = None) -> Tuple[List[str], List[str]]:
    """Draw the report's figures and the experiment's own under ``run_dir/figures``. A figure
    that fails is reported through ``warn`` and the others are still drawn. Returns
    ``(paths written, one line per failure)``."""
    from ..plots import MAX_HEATMAPS, plot_report
    warn = warn or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=2))
    fig_dir = Path(run_dir) / "figures"
    failures: List[str] = []

    def failed(what: str, exc: BaseException) -> None:
        first = (str(exc).splitlines() or [""])[0]
        line = f"figure {what} failed ({type(exc).__name__}: {first})"
        failures.append(line)
        warn(line)

    paths = list(plot_report(report, str(fig_dir), heatmaps=heatmaps, max_heatmaps=MAX_HEATMAPS,
                             on_error=failed))
    try:
        paths += mod.figures(report, extras, cfg, fig_dir)
    except Exception as exc:  # a figure is never worth a lost run
        failed(f"of {mod.NAME}", exc)
    return [str(p) for p in paths], failures


def run_experiment(name: str, out_dir, ctx: Context, *, profile: str = "cpu",
                   overrides: Optional[Dict[str, Any]] = None, plots: bool = True,
                   overwrite: bool = False, resume: bool = False
                   ) -> Tuple[RunResult, List[C.Claim], List[str], Dict[str, Any]]:
    """Run ``name`` with ``profile`` settings (updated by ``overrides``) and write the run
    directory. Returns ``(result, claims, figure paths, saved config)``; the saved config's
    ``run_dir`` says where the run went (``out_dir``, unless another run was saved there while
    this one trained: then a fresh sibling, with a ``ctx.warn``).

    Before training: the settings are checked, the run directory is prepared
    (:func:`~.runs.prepare_run_dir`: refused when it holds files unless ``overwrite``) and, when
    ``plots``, matplotlib is looked for (missing: ``ctx.warn`` says so and the run goes on
    without figures). After training, what was measured is saved first (report.json, extras,
    config), then claims and table, and figures last: a failing figure is a ``ctx.warn``, listed
    under ``figure_errors`` in config.json.

    Checkpoints (an experiment with ``RESUMABLE = True``: fc1, fc2): while it trains, the run
    keeps its finished sub-runs and, every ``checkpoint_every`` steps, the training state of
    the current one under ``out_dir/checkpoints/seed-S/`` (:class:`~.runs.CheckpointStore`,
    each file written atomically); they are removed once the run is saved, and kept when it is
    interrupted (an exception other than :class:`ExperimentError`, a kill). ``resume``: continue
    from the checkpoints in ``out_dir`` (those of the same experiment, profile, settings and
    seeds, else :class:`RunDirError` before training): finished sub-runs are read back, the
    unfinished one continues from its last checkpoint, and the numbers are those of an
    uninterrupted run. Without ``resume`` a directory holding checkpoints is refused unless
    ``overwrite`` (which discards them)."""
    mod = get(name)
    cfg = profile_config(name, profile, overrides)
    seeds = seeds_of(name, cfg, ctx.seed)
    resumable = bool(getattr(mod, "RESUMABLE", False))
    if resume and not resumable:
        multi = [e for e in EXPERIMENTS if getattr(get(e), "RESUMABLE", False)]
        raise ExperimentError(f"--resume: {name} does not checkpoint its training ({', '.join(multi)} do)")
    out_dir = Path(out_dir)
    skipped = None
    if plots:
        skipped = figures_unavailable()
        if skipped:
            ctx.warn(f"{skipped}: this run writes no figure (`crh report {out_dir}` draws them "
                     "once it is installed; --no-plots silences this)")
    created = prepare_run_dir(out_dir, overwrite, resume=resume)
    ckpt_dir = None
    if resumable:
        try:
            ckpt_dir = open_checkpoints(out_dir, {"experiment": name, "profile": profile, "config": cfg,
                                                  "seeds": seeds}, resume=resume)
        except BaseException:
            if created:
                remove_if_empty(out_dir)
            raise
    stores = {s: (CheckpointStore(ckpt_dir / f"seed-{s}", cfg.get("checkpoint_every", 0))
                  if ckpt_dir is not None else None) for s in seeds}
    threads = cfg.get("threads")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    used_threads = torch.get_num_threads()  # what the run uses (restored below, before saving)
    t0 = time.perf_counter()
    results: List[RunResult] = []
    walls: List[float] = []
    try:
        for i, seed in enumerate(seeds):
            if len(seeds) > 1:
                ctx.log(f"seed {seed} ({i + 1} of {len(seeds)})")
            t_seed = time.perf_counter()
            seed_everything(seed)
            # one Context per seed; progress, log, warnings and the timings are the run's
            results.append(mod.run(cfg, dataclasses.replace(ctx, seed=seed, checkpoints=stores[seed])))
            walls.append(time.perf_counter() - t_seed)
    except BaseException as exc:
        # an interrupted run keeps its checkpoints (--resume continues it); one that cannot
        # proceed (diverged, data missing, …) or made no progress leaves none
        if isinstance(exc, ExperimentError) or not checkpoints_hold_progress(out_dir):
            remove_checkpoints(out_dir)
        if created:
            remove_if_empty(out_dir)
        raise
    finally:
        torch.set_num_threads(old_threads)
    if overwrite:
        clear_run_files(out_dir)  # the replaced run's files, now that there is a new one
    elif holds_run(out_dir):  # another run was saved there while this one trained: keep both
        taken, out_dir = out_dir, Path(tempfile.mkdtemp(prefix=f"{out_dir.name}-", dir=out_dir.parent))
        ctx.warn(f"{taken} received another run while this one trained: this run is saved in "
                 f"{out_dir} instead")
    result = results[0]
    saved = save_run(out_dir, name, profile, result, ctx, None, (), time.perf_counter() - t0,
                     torch_threads=used_threads)
    if len(seeds) > 1:
        for seed, res, wall in zip(seeds[1:], results[1:], walls[1:]):
            d = seed_dir(out_dir, seed)
            save_run(d, name, profile, res, dataclasses.replace(ctx, seed=seed), None, (), wall,
                     torch_threads=used_threads, matrices=False)
            (d / "table.txt").write_text(res.report.table() + "\n")
        saved["seeds"] = seeds
        saved["seed_wall_s"] = [round(w, 2) for w in walls]
    with ctx.timed("claims"):
        claims = claims_of(mod, [(s, r.report, r.extras) for s, r in zip(seeds, results)], result.config)
    write_outputs(out_dir, result.report, claims, name, profile, seeds=seeds,
                  preamble=(seeds_preamble(seeds, result.report.meta.get("jackknife"))
                            if hasattr(mod, "claims_over_seeds") else None))
    figures: List[str] = []
    if plots and not skipped:
        with ctx.timed("figures"):
            figures, failures = make_figures(mod, result.report, result.extras, result.config, out_dir,
                                             warn=ctx.warn)
        saved["figures"] = [Path(f).name for f in figures]
        if failures:
            saved["figure_errors"] = failures
    elif skipped:
        saved["figures_skipped"] = skipped
    resumed = sorted({k for st in stores.values() if st is not None for k in st.loaded})
    if resumed:
        saved["resumed"] = resumed  # the sub-runs read back from checkpoints
    saved["timings_s"] = {k: round(v, 2) for k, v in ctx.timings.items()}
    write_config(out_dir, saved)
    if ckpt_dir is not None:
        remove_checkpoints(ckpt_dir.parent)
    return result, claims, figures, dict(saved, run_dir=str(out_dir))


def _check_saved(run_dir: Path, saved: Dict[str, Any], report, extras: Dict[str, Any]):
    """The experiment module and settings of a saved run, after checking that its files agree:
    config.json names a known experiment and profile, its settings are that experiment's (names
    and types), report.json's meta names the same experiment (runs written since it does), and
    extras.json holds what that experiment writes. Raises :class:`SavedRunError`."""
    name = saved.get("experiment")
    if name is None:
        raise SavedRunError("config.json: names no experiment")
    if not isinstance(name, str) or name not in EXPERIMENTS:
        raise SavedRunError(f"config.json: experiment must be one of {', '.join(EXPERIMENTS)}, "
                            f"got {json.dumps(name)[:40]}")
    mod = get(name)
    profile = saved.get("profile", "cpu")
    if not isinstance(profile, str) or profile not in mod.PROFILES:
        raise SavedRunError(f"config.json: profile must be one of {', '.join(mod.PROFILES)} "
                            f"({name}), got {json.dumps(profile)[:40]}")
    claimed = report.meta.get("experiment")
    if claimed is not None and claimed != name:
        raise SavedRunError(f"report.json: holds a {claimed} run but config.json says {name}; "
                            "refusing to read one experiment's data as another's")
    settings = saved.get("config") or {}
    if not isinstance(settings, dict):
        raise SavedRunError(f"config.json: config must be an object, got {type(settings).__name__}")
    try:
        cfg = merge_config(mod.PROFILES[profile], settings)
    except ExperimentError as exc:
        raise SavedRunError(f"config.json: {exc} (a run of another experiment than {name}?)") from None
    missing = [k for k in getattr(mod, "EXTRAS", ()) if k not in extras]
    if missing:
        raise SavedRunError(f"extras.json: lacks {', '.join(missing)}, which every {name} run writes "
                            f"(a run of another experiment than config.json's {name}?)")
    return mod, cfg


def _saved_seeds(saved: Dict[str, Any]) -> List[int]:
    """The seeds of a saved run: config.json's ``seeds`` (a run over several), else its
    ``seed``. Raises :class:`SavedRunError` when they are not integers."""
    seeds = saved.get("seeds")
    if seeds is None:
        seed = saved.get("seed", 0)
        seeds = [seed]
    if (not isinstance(seeds, list) or not seeds or len(seeds) > 1000
            or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds)):
        raise SavedRunError(f"config.json: seeds must be a list of distinct integers, got "
                            f"{json.dumps(seeds)[:40]}")
    return seeds


def rebuild(run_dir, plots: bool = True, warn: Optional[Callable[[str], None]] = None
            ) -> Tuple[Dict[str, Any], Any, List[C.Claim], List[str]]:
    """Rebuild table, claims and figures of a saved run from its files alone, every file
    checked first (:func:`~.runs.load_run`, then the files must agree on the experiment).
    Malformed or contradicting files raise :class:`SavedRunError` naming the file and field; a
    figure that fails, or matplotlib missing, is a ``warn``. Every figure the run drew is drawn
    again; heatmaps need the run's matrices.npz: without it (a run saved before it existed, or
    the file removed) a ``warn`` names the heatmaps not redrawn, and so does the returned config's
    ``not_redrawn`` (``{figure: reason}``). Returns ``(saved config, report, claims, figure
    paths)``."""
    warn = warn or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=2))
    run_dir = Path(run_dir)
    saved, report, extras, _ = load_run(run_dir)
    mod, cfg = _check_saved(run_dir, saved, report, extras)
    seeds = _saved_seeds(saved)
    runs = [(seeds[0], report, extras)]
    for seed in seeds[1:]:
        d = seed_dir(run_dir, seed)
        where = f"{d.relative_to(run_dir)}/"
        try:
            _, rep_s, ex_s, _ = load_run(d)
        except SavedRunError as exc:
            raise SavedRunError(f"{where}{exc}") from None
        except ExperimentError:
            raise SavedRunError(f"config.json: lists seed {seed}, but {where} holds no report.json") from None
        missing = [k for k in getattr(mod, "EXTRAS", ()) if k not in ex_s]
        if missing:
            raise SavedRunError(f"{where}extras.json: lacks {', '.join(missing)}, which every "
                                f"{mod.NAME} run writes")
        runs.append((seed, rep_s, ex_s))
    try:
        claims = claims_of(mod, runs, cfg)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise SavedRunError(f"extras.json or report.json: not what a {mod.NAME} run writes "
                            f"({type(exc).__name__}: {first})") from None
    profile = saved.get("profile", "cpu")
    write_outputs(run_dir, report, claims, mod.NAME, profile, seeds=seeds,
                  preamble=(seeds_preamble(seeds, report.meta.get("jackknife"))
                            if hasattr(mod, "claims_over_seeds") else None))
    figures: List[str] = []
    saved = dict(saved)
    if plots:
        why = figures_unavailable()
        if why:
            warn(f"{why}: no figure drawn (--no-plots silences this)")
        else:
            figures, _ = make_figures(mod, report, extras, cfg, run_dir, heatmaps=True, warn=warn)
            if not report.matrices:
                ran = saved.get("figures") if isinstance(saved.get("figures"), list) else []
                heat = [f for f in ran if isinstance(f, str) and f.startswith("heatmap_")]
                reason = ("their matrices are not in the saved run: no matrices.npz; any PNG "
                          "the run drew is left as it is")
                saved["not_redrawn"] = {f: reason for f in heat or ["heatmap_*.png"]}
                warn(f"not redrawn: {', '.join(saved['not_redrawn'])} ({reason})")
    return saved, report, claims, figures
