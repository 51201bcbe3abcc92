"""Running an experiment: the run context, progress bars, configs and seeding, the memory-plan
check, the measurement loop around a :class:`~crh_kernels.collect.Collector`, and the run
directory (saving and loading it). What a run *claims* is :mod:`.claims`.

A run directory holds::

    config.json    experiment, profile, the full config, device, seed, timings, versions
    report.json    the main Report (crh_kernels.report.Report.to_json)
    matrices.npz   the heatmaps' matrices (H, G, Z per side, downsized) of the layers they show
    extras.json    experiment-specific numbers (sweeps, α over training, baselines)
    table.txt      Report.table() and its legend (a smoke-test banner for the tiny profile)
    claims.md      the claims table and its legend (also claims.json)
    figures/       Report.plot() PNGs and the experiment's own PNGs
    reports/       further Reports of a sweep (one JSON per setting), when the experiment has them
    seeds/seed-S/  a run over several seeds (``--seeds N``): the directory itself
                   holds the first seed's run (table and figures are that seed's) and claims over
                   every seed; each further seed S its report.json, reports/, extras.json,
                   config.json and table.txt here
    checkpoints/   while a resumable run (fc1, fc2) trains: its checkpoints
                   (:class:`CheckpointStore`), removed once the run is saved

``crh report RUN_DIR`` rebuilds table, claims and every figure from these files alone (a run
saved without matrices.npz: every figure but the heatmaps, and it says so).

A run directory is checked before training (:func:`prepare_run_dir`: it must be creatable and
writable, and empty unless ``overwrite``, or holding only checkpoints with ``resume``). What was measured is written first (report.json,
reports/, extras.json, config.json), then claims and table, figures last: a failing figure is a
warning (``Context.warn``), never a lost run. Reading a run back (:func:`load_run`) checks every
file (strict JSON, depth-limited, report schema, config against the experiment's settings)
before anything uses it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from . import claims as C

# ----------------------------------------------------------------------------- errors
class ExperimentError(RuntimeError):
    """A run cannot proceed for a reason the user can fix (the message says how)."""


class MemoryPlanError(ExperimentError):
    """The requested matrices would exceed ``--max-memory``."""


class RunDirError(ExperimentError):
    """The run directory cannot take a run (a file, not writable, or holding another run)."""


class SavedRunError(ExperimentError):
    """A saved run's files are malformed or contradict each other (the message names the file
    and the field)."""


# ----------------------------------------------------------------------------- smoke runs
#: Profiles that only check that the pipeline runs (``--tiny``): their numbers mean nothing.
SMOKE_PROFILES = ("tiny",)


def smoke_note(profile: Optional[str]) -> Optional[str]:
    """The banner that table.txt, claims.md and ``crh run``'s output carry for a smoke-test
    profile, or None for a real run."""
    if profile not in SMOKE_PROFILES:
        return None
    return (f"SMOKE TEST (profile {profile}, `--tiny`): a tiny model and a few steps, to check that "
            "the pipeline runs; these numbers mean nothing, and neither do the verdicts.")


# ----------------------------------------------------------------------------- progress
class NullBar:
    """tqdm-like bar that shows nothing (tests, library use)."""

    def __init__(self, total: Optional[int] = None, desc: str = ""):
        self.total, self.desc, self.n = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def null_progress(total: Optional[int] = None, desc: str = "", **kwargs) -> NullBar:
    return NullBar(total, desc)


@dataclass
class Context:
    """How a run is carried out (not what it computes: that is the config).

    ``progress(total, desc)`` returns a tqdm-like bar (``update``, ``set_postfix``, context
    manager); ``log(msg)`` prints a line; ``warn(msg)`` reports something the user must see
    (a figure that failed, figures skipped: default ``warnings.warn``); ``max_memory`` is the
    budget in bytes of the collector's matrices (None: unlimited).
    """
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: Callable[..., Any] = null_progress
    log: Callable[[str], None] = lambda msg: None
    warn: Callable[[str], None] = lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=3)
    max_memory: Optional[int] = None
    backend: Optional[str] = None
    timings: Dict[str, float] = field(default_factory=dict)
    #: where a resumable experiment keeps its training checkpoints (:class:`CheckpointStore`;
    #: None: no checkpoints, e.g. an experiment run from library code without a run directory)
    checkpoints: Optional["CheckpointStore"] = None

    @contextlib.contextmanager
    def timed(self, what: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t0


@dataclass
class RunResult:
    """What an experiment's ``run`` returns: the main report, experiment-specific numbers
    (JSON-ready), further named reports (a sweep's), and the config actually used."""
    report: Any
    extras: Dict[str, Any]
    config: Dict[str, Any]
    reports: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- configs
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:  # pragma: no cover
        pass


def parse_value(text: str):
    """``--set key=VALUE``: JSON when it parses (numbers, lists, true/false/null), else a string;
    a comma-separated list without brackets becomes a list."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "," in text:
        return [parse_value(t.strip()) for t in text.split(",") if t.strip()]
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    return text


def merge_config(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """``base`` updated with ``overrides``; an unknown key is an error that lists the known ones,
    and a value is coerced to the type of the default where that is unambiguous."""
    cfg = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise ExperimentError(f"unknown setting {key!r}; known settings: {', '.join(sorted(base))}")
        default = base[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ExperimentError(f"setting {key!r} must be true or false, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ExperimentError(f"setting {key!r} must be an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ExperimentError(f"setting {key!r} must be a number, got {value!r}")
            value = float(value)
        elif isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
            value = [value]
        cfg[key] = value
    return cfg


def parse_bytes(text) -> int:
    """'8G', '512MiB', '1.5GB', '1000000' -> bytes (binary multiples)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 512M, 8G, 1.5GiB)")
    mult = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"  # pragma: no cover


def default_max_memory(device: torch.device) -> int:
    """Half the free accelerator memory (CUDA) or half the physical memory (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return int(pages * size // 2)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 2 ** 30


# ----------------------------------------------------------------------------- measurement
def check_memory_plan(col, max_memory: Optional[int], what: str = "the collector") -> int:
    """Total bytes of ``col.memory_plan()``; raises :class:`MemoryPlanError` naming the largest
    matrices and the ways out when it exceeds ``max_memory``."""
    plan = col.memory_plan()
    total = sum(b for *_, b in plan)
    if max_memory is None or total <= max_memory:
        return total
    biggest = sorted(plan, key=lambda r: -r[3])[:6]
    by_layer: Dict[str, int] = {}
    for name, _, _, b in plan:
        by_layer[name] = by_layer.get(name, 0) + b
    heavy = sorted(by_layer.items(), key=lambda kv: -kv[1])[:5]
    streams = sorted({s for _, s, _, _ in plan})
    lines = [f"memory plan: {what} would hold {human_bytes(total)} of covariance state "
             f"({len(plan)} matrices over {len(by_layer)} layers), more than --max-memory "
             f"{human_bytes(max_memory)}.",
             "largest matrices:"]
    lines += [f"  {name} {stream} {shape[0]}x{shape[1]}: {human_bytes(b)}" if shape else
              f"  {name} {stream}: {human_bytes(b)}" for name, stream, shape, b in biggest]
    lines.append("heaviest layers: " + ", ".join(f"{n} ({human_bytes(b)})" for n, b in heavy))
    lines += ["options:",
              f"  * fewer streams: --set streams=h_a,g_a (now {','.join(streams)}; "
              "each stream is one D×D matrix per layer)",
              "  * a subset of layers: --set modules=REGEX (e.g. 'blocks\\.[0-2]\\.' or 'attn')"]
    if getattr(col, "state_dtype", None) == torch.float64:
        lines.append("  * packed storage: --set state_dtype=float32 halves every matrix (this plan "
                     "counts float64 states)")
    lines.append("  * or raise the budget: --max-memory SIZE (e.g. 64G)")
    raise MemoryPlanError("\n".join(lines))


def make_collector(model, ctx: Context, *, modules=None, streams=("h_a", "h_b", "g_a", "g_b"),
                   heads=None, state_dtype: str = "float64", what: str = "the collector", **kwargs):
    """A Collector whose memory plan was checked against ``ctx.max_memory`` before any hook."""
    from ..collect import Collector
    dtype = {"float64": torch.float64, "float32": torch.float32}.get(str(state_dtype))
    if dtype is None:
        raise ExperimentError(f"state_dtype must be 'float64' or 'float32', got {state_dtype!r}")
    if isinstance(modules, str) and modules in ("", "all", "None"):
        modules = None
    try:
        col = Collector(model, modules=modules, streams=tuple(streams), heads=heads,
                        backend=ctx.backend, state_dtype=dtype, **kwargs)
    except ValueError as exc:  # e.g. --set modules=REGEX that picks nothing: the user can fix it
        if modules is None:
            raise
        raise ExperimentError(f"{what}: {str(exc).splitlines()[0]}") from None
    if not col.layers:
        raise ExperimentError(f"{what}: no layer matched modules={modules!r}")
    check_memory_plan(col, ctx.max_memory, what)
    return col


def measure(col, batches: Iterable, step_fn: Callable[[Any], torch.Tensor], ctx: Context, *,
            desc: str = "measure", total: Optional[int] = None, model=None):
    """Run ``step_fn(batch) -> loss`` over ``batches`` with the collector's hooks on; the loss
    is backpropagated (weights are not updated: their gradients are cleared afterwards).
    Returns ``col.report()``."""
    with ctx.timed("measure"):
        with ctx.progress(total=total, desc=desc, leave=False) as bar, col:
            for batch in batches:
                loss = step_fn(batch)
                loss.backward()
                col.step()
                if model is not None:
                    model.zero_grad(set_to_none=True)
                bar.update(1)
    with ctx.timed("analysis"):
        return col.report()


# ----------------------------------------------------------------------------- saving
#: The files and folders a run writes (what ``overwrite`` replaces; nothing else is touched).
RUN_FILES = ("report.json", "matrices.npz", "extras.json", "config.json", "table.txt", "claims.md",
             "claims.json")
RUN_FOLDERS = {"figures": "*.png", "reports": "*.json"}
#: Where the further seeds of a run over several seeds go (:func:`seed_dir`).
SEEDS_FOLDER = "seeds"


def seed_dir(run_dir, seed: int) -> Path:
    """The directory of seed ``seed`` of a run over several seeds (not the first seed's: that
    one is ``run_dir`` itself)."""
    return Path(run_dir) / SEEDS_FOLDER / f"seed-{int(seed)}"


def seeds_preamble(seeds: Sequence[int], jackknife: Optional[Dict[str, Any]] = None) -> str:
    """What claims.md says above the table of an experiment whose claims carry intervals: the
    seeds, where each seed's run is, and how numbers and verdicts were computed. ``jackknife``:
    the first seed's ``report.meta["jackknife"]`` (a collector with blocks), which gives a
    one-seed run's claims on an α the report's own interval."""
    seeds = [int(s) for s in seeds]
    jk = jackknife if isinstance(jackknife, dict) else None
    if len(seeds) == 1 and jk:
        where = (f"One seed ({seeds[0]}): a claim on an α uses the report's own interval, the "
                 f"jackknife bias-corrected value ± z·se over K = {jk.get('k')} blocks (by "
                 f"{jk.get('by')}; docs/usage.md, \"Standard errors\"); a number without a standard "
                 "error (a median over heads, a fraction of exponents, r_g) has no interval, so its "
                 "claim is **undetermined**; `--seeds 3` gives intervals over seeds.")
    elif len(seeds) == 1:
        where = (f"One seed ({seeds[0]}): a number over seeds has no interval, so its claim is "
                 "**undetermined**; `--seeds 3` gives intervals.")
    else:
        where = (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): this directory holds seed "
                 f"{seeds[0]}'s run (table.txt and the figures are that seed's), "
                 + ", ".join(f"`{SEEDS_FOLDER}/seed-{s}/`" for s in seeds[1:])
                 + " the others; the claims below use every seed.")
    return (where + " Every interval is a 95 % confidence interval: a number measured once per "
            "seed is shown as the mean over seeds with its Student-t interval (n − 1 degrees of "
            "freedom); a trend over a sweep is the least-squares slope over every (setting, seed) "
            "point with its t interval (n − 2 degrees of freedom). A verdict **holds** only when "
            "the interval lies on the claimed side of the threshold, **FAILS** when it lies on "
            "the other side, and is **undetermined** when it straddles it.")


def _versions() -> Dict[str, str]:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    from .._version import __version__
    v["crh_kernels"] = __version__
    return v


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def prepare_run_dir(run_dir, overwrite: bool = False, resume: bool = False) -> bool:
    """Make sure a run can be saved in ``run_dir`` before anything is trained: it is created
    when absent (parents too) and must be a writable directory; one that already holds files is
    refused unless ``overwrite`` (then the previous run's files are replaced once the new run has
    finished training: :func:`clear_run_files`), or ``resume`` and what it holds is the
    checkpoints of an unfinished run (:data:`CHECKPOINT_FOLDER`). Returns whether the directory
    was created here (so that a failed run can remove it again while it is empty). Raises
    :class:`RunDirError`."""
    run_dir = Path(run_dir)
    created = False
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a directory; choose another --out")
    if run_dir.is_dir():
        try:
            entries = [p.name for p in run_dir.iterdir()]
        except OSError as exc:
            raise RunDirError(f"{run_dir}: cannot list it ({_os_reason(exc)})") from None
        busy = bool(entries)
        only_checkpoints = CHECKPOINT_FOLDER in entries and all(
            e == CHECKPOINT_FOLDER or e.startswith(".") for e in entries)
        if busy and not overwrite and not (resume and only_checkpoints):
            if holds_run(run_dir):
                if resume:
                    raise RunDirError(f"{run_dir} already holds a finished run: nothing to resume "
                                      "(`crh report` rebuilds it; --overwrite replaces it)")
                raise RunDirError(f"{run_dir} already holds a run: pass --overwrite to replace it, "
                                  "or choose another --out")
            if CHECKPOINT_FOLDER in entries:
                raise RunDirError(f"{run_dir} holds the checkpoints of an unfinished run: pass "
                                  "--resume to continue it, or --overwrite to start afresh")
            raise RunDirError(f"{run_dir} already holds files (not a run): pass --overwrite to "
                              "write the run among them, or choose another --out")
    else:
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:  # created meanwhile, or a parent is a file
            if not run_dir.is_dir():
                raise RunDirError(f"cannot create {run_dir}: a parent is not a directory") from None
        except OSError as exc:
            raise RunDirError(f"cannot create {run_dir} ({_os_reason(exc)})") from None
        else:
            created = True
    try:
        fd, probe = tempfile.mkstemp(prefix=".crh-write-check-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if created:
            remove_if_empty(run_dir)
        raise RunDirError(f"{run_dir} is not writable ({_os_reason(exc)})") from None
    return created


def holds_run(run_dir) -> bool:
    """Whether ``run_dir`` holds any of the files a run writes."""
    return any((Path(run_dir) / f).exists() for f in RUN_FILES)


def remove_if_empty(run_dir) -> None:
    """Remove ``run_dir`` if it holds nothing (a run that failed before saving anything)."""
    try:
        Path(run_dir).rmdir()
    except OSError:
        pass


def clear_run_files(run_dir) -> None:
    """Remove the files a previous run wrote in ``run_dir`` (:data:`RUN_FILES`, the PNGs of
    figures/, the JSONs of reports/), so that an overwritten run holds no stale file; other
    files are left alone."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_file() or p.is_symlink():
            p.unlink()
    for folder, pattern in RUN_FOLDERS.items():
        d = run_dir / folder
        if d.is_dir() and not d.is_symlink():
            for p in d.glob(pattern):
                if p.is_file() or p.is_symlink():
                    p.unlink()
            remove_if_empty(d)
    seeds = run_dir / SEEDS_FOLDER
    if seeds.is_dir() and not seeds.is_symlink():
        for d in seeds.glob("seed-*"):
            if d.is_dir() and not d.is_symlink():
                clear_run_files(d)
                remove_if_empty(d)
        remove_if_empty(seeds)


def _write_json(path: Path, obj) -> None:
    """Write ``obj`` as strict JSON through a temporary file: the path holds the old or the new
    content, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(C._jsonable(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def save_run(run_dir: Path, experiment: str, profile: str, result: RunResult, ctx: Context,
             claims: Optional[Sequence[C.Claim]] = None, figures: Sequence[str] = (),
             wall_s: float = 0.0, torch_threads: Optional[int] = None,
             matrices: bool = True) -> Dict[str, Any]:
    """Write what was measured: report.json (its meta names the experiment), matrices.npz (the
    heatmaps' matrices, when the report holds them and ``matrices``), reports/, extras.json,
    config.json; then table and claims when ``claims`` is given. ``torch_threads``: the torch
    CPU threads the run used (default: the current setting)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result.report.meta["experiment"] = experiment
    result.report.to_json(run_dir / "report.json")
    if matrices:
        save_matrices(run_dir / "matrices.npz", result.report)
    for name, rep in result.reports.items():
        rep.meta["experiment"] = experiment
        rep.to_json(run_dir / "reports" / f"{name}.json")
    _write_json(run_dir / "extras.json", result.extras)
    cfg = {"experiment": experiment, "profile": profile, "config": result.config,
           "device": str(ctx.device), "seed": ctx.seed, "backend": ctx.backend,
           "max_memory": ctx.max_memory, "wall_s": round(wall_s, 2),
           "timings_s": {k: round(v, 2) for k, v in ctx.timings.items()},
           "torch_threads": torch.get_num_threads() if torch_threads is None else int(torch_threads),
           "versions": _versions(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_config(run_dir, cfg)
    if claims is not None:
        write_outputs(run_dir, result.report, claims, experiment, profile)
    return cfg


#: What a heatmap draws per layer (plots.plot_heatmaps), and the largest side a saved one may
#: have (Report keeps them at most ``heatmap_size``, 128 by default).
_MATRIX_KEYS = ("H_a", "G_a", "Z_a", "H_b", "G_b", "Z_b")
_MAX_MATRIX_SIDE = 4096


def save_matrices(path: Path, report) -> Optional[Path]:
    """Write the matrices behind the run's heatmaps (those of the layers
    :func:`crh_kernels.plots.heatmap_layers` picks, float32, downsized as the report keeps them)
    to ``path`` (a compressed ``.npz``, through a temporary file), so that ``crh report`` can
    draw them again. Nothing is written when the report holds no matrices."""
    import numpy as np
    from ..plots import MAX_HEATMAPS, heatmap_layers
    if not getattr(report, "matrices", None):
        return None
    arrays = {}
    for name in heatmap_layers(report, MAX_HEATMAPS):
        for key, m in (report.matrices.get(name) or {}).items():
            if key in _MATRIX_KEYS and m is not None:
                arrays[f"{name}|{key}"] = np.asarray(m, dtype=np.float32)
    if not arrays:
        return None
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_matrices(path: Path, layers) -> Dict[str, Dict[str, Any]]:
    """``{layer: {"H_a": ndarray, ...}}`` from a file :func:`save_matrices` wrote, every entry
    checked first (names of known layers and matrices, square finite float arrays of a bounded
    size; no pickles). Raises :class:`SavedRunError` naming the file and the entry."""
    import zipfile

    import numpy as np
    name = Path(path).name
    limit = _MAX_MATRIX_SIDE ** 2 * 8 + 4096
    try:
        with zipfile.ZipFile(path) as zf:
            big = [i.filename for i in zf.infolist() if i.file_size > limit]
        if big:
            raise SavedRunError(f"{name}: entry {big[0]!r} is larger than a saved heatmap matrix can be")
        out: Dict[str, Dict[str, Any]] = {}
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                layer, _, which = key.rpartition("|")
                if layer not in layers or which not in _MATRIX_KEYS:
                    raise SavedRunError(f"{name}: entry {key[:60]!r} names no layer of report.json "
                                        f"and matrix ({', '.join(_MATRIX_KEYS)})")
                m = npz[key]
                if (m.ndim != 2 or m.shape[0] != m.shape[1] or m.dtype.kind != "f"
                        or not np.isfinite(m).all()):
                    raise SavedRunError(f"{name}: entry {key[:60]!r} must be a square matrix of finite "
                                        f"floats, got shape {tuple(m.shape)}, dtype {m.dtype}")
                out.setdefault(layer, {})[which] = m
        return out
    except SavedRunError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise SavedRunError(f"{name}: not a matrices file written by `crh run` "
                            f"({type(exc).__name__}: {first[:80]})") from None


def write_config(run_dir: Path, cfg: Dict[str, Any]) -> None:
    _write_json(Path(run_dir) / "config.json", cfg)


def write_outputs(run_dir: Path, report, claims: Sequence[C.Claim], experiment: str,
                  profile: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None,
                  preamble: Optional[str] = None) -> None:
    """table.txt (with its legend) and claims.md (with its legend), both under a smoke-test
    banner for a smoke profile (:func:`smoke_note`), and claims.json. ``seeds``: the seeds of a
    run over several (claims.md's title names them, table.txt says whose table it is);
    ``preamble``: how the claims were computed (:func:`seeds_preamble`)."""
    run_dir = Path(run_dir)
    note = smoke_note(profile)
    table = report.table()
    if seeds is not None and len(seeds) > 1:
        table = (f"Seed {seeds[0]} of the seeds {', '.join(map(str, seeds))} (the others: "
                 f"{SEEDS_FOLDER}/seed-S/table.txt).\n\n{table}")
    if note:
        table = f"{note}\n\n{table}"
    (run_dir / "table.txt").write_text(table + "\n")
    title = f"Claims: {experiment}"
    if seeds is not None and len(seeds) > 1:
        title += f" ({len(seeds)} seeds: {', '.join(map(str, seeds))})"
    (run_dir / "claims.md").write_text(C.to_markdown(claims, title, note=note, legend=True,
                                                     preamble=preamble))
    C.to_json(claims, run_dir / "claims.json")


def _read(path: Path, what: str):
    from ..report import read_json
    try:
        return read_json(path, what=what)
    except ValueError as exc:
        raise SavedRunError(str(exc)) from None


def load_run(run_dir: Path):
    """``(config dict, Report, extras dict, {name: Report})`` of a saved run, every file checked
    first (strict JSON nested at most :data:`crh_kernels.report.MAX_JSON_DEPTH` levels; report
    schema; config.json and extras.json objects; matrices.npz, when present, becomes the
    Report's ``matrices``: :func:`load_matrices`). Raises :class:`SavedRunError` with one line
    naming the file and the field."""
    from ..report import Report
    run_dir = Path(run_dir)
    if not (run_dir / "report.json").exists():
        raise ExperimentError(f"{run_dir} holds no report.json (is it a directory written by `crh run`?)")
    cfg_path = run_dir / "config.json"
    cfg = _read(cfg_path, "config.json") if cfg_path.exists() else {}
    if not isinstance(cfg, dict):
        raise SavedRunError(f"config.json: must be an object, got {type(cfg).__name__}")

    def report(path, what):
        try:
            return Report.from_json(path)
        except ValueError as exc:
            msg = str(exc)
            base = path.name
            raise SavedRunError(what + msg[len(base):] if msg.startswith(base) else f"{what}: {msg}") from None

    rep = report(run_dir / "report.json", "report.json")
    ex_path = run_dir / "extras.json"
    extras = _read(ex_path, "extras.json") if ex_path.exists() else {}
    if not isinstance(extras, dict):
        raise SavedRunError(f"extras.json: must be an object, got {type(extras).__name__}")
    if (run_dir / "matrices.npz").exists():
        rep.matrices = load_matrices(run_dir / "matrices.npz", rep.layers)
    reports = {}
    if (run_dir / "reports").is_dir():
        for p in sorted((run_dir / "reports").glob("*.json")):
            reports[p.stem] = report(p, f"reports/{p.name}")
    return cfg, rep, extras, reports


# ----------------------------------------------------------------------------- checkpoints
#: The folder of a run directory that holds the checkpoints of a run not yet saved (removed once
#: the run is saved; ``crh run --resume`` continues from it).
CHECKPOINT_FOLDER = "checkpoints"
_CHECKPOINT_META = "meta.json"
_KEY_RE = re.compile(r"[A-Za-z0-9_.+-]{1,100}")


def _torch_save(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_states() -> Dict[str, Any]:
    """The global random states a run may draw from (Python, torch CPU, NumPy), in a form
    ``torch.load(weights_only=True)`` reads back."""
    out: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover
        pass
    return out


def set_rng_states(states: Dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


class CheckpointStore:
    """The checkpoints of one seed of a resumable run, in ``folder``
    (``RUN_DIR/checkpoints/seed-S``), per sub-run ``key`` (one setting of a sweep: ``base``,
    ``wd_1e-05``, …):

    * a finished sub-run: its record (``KEY.done.json``, written last: the mark that it is
      finished) and its report (``KEY.report.json``, plus ``KEY.matrices.npz`` for the heatmaps);
    * an unfinished one: its training state (``KEY.pt``: model, optimizer, random states, step,
      the record so far), written every ``every`` steps (0: never; finished sub-runs are still
      kept).

    Every file is written to a temporary name and renamed: a run killed at any moment leaves
    the previous checkpoint or the new one, never half of one. The training state is read with
    ``torch.load(weights_only=True)`` (tensors and plain containers, no pickled objects)."""

    def __init__(self, folder, every: int = 0):
        self.folder = Path(folder)
        self.every = int(every or 0)
        self.loaded: List[str] = []  # what was read back (config.json says a run was resumed)

    def _path(self, key: str, suffix: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"checkpoint key must match {_KEY_RE.pattern}, got {key!r}")
        return self.folder / f"{key}{suffix}"

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def finished(self, key: str):
        """``(record, report)`` of the finished sub-run ``key``, or None."""
        from ..report import Report
        done = self._path(key, ".done.json")
        if not done.is_file():
            return None
        record = _read(done, f"{CHECKPOINT_FOLDER}/{done.name}")
        try:
            rep = Report.from_json(self._path(key, ".report.json"))
        except (ValueError, OSError) as exc:
            raise SavedRunError(f"{CHECKPOINT_FOLDER}/{key}.report.json: {exc}") from None
        mats = self._path(key, ".matrices.npz")
        if mats.is_file():
            rep.matrices = load_matrices(mats, rep.layers)
        self.loaded.append(key)
        return record, rep

    def finish(self, key: str, record: Dict[str, Any], report) -> None:
        """Keep the finished sub-run ``key`` (report first, the record last) and drop its
        training state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(key, ".report.json")
        tmp = path.with_name(f".{path.name}.tmp")
        report.to_json(tmp)
        os.replace(tmp, path)
        save_matrices(self._path(key, ".matrices.npz"), report)
        _write_json(self._path(key, ".done.json"), record)
        state = self._path(key, ".pt")
        if state.exists():
            state.unlink()

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        """The training state saved by :meth:`save` for ``key``, or None."""
        path = self._path(key, ".pt")
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: say which, do not train from a wrong state
            raise SavedRunError(f"{CHECKPOINT_FOLDER}/{path.name}: cannot be read ({type(exc).__name__}: "
                                f"{(str(exc).splitlines() or [''])[0][:80]}); remove it to restart this "
                                "sub-run from its beginning") from None
        self.loaded.append(key)
        return state

    def save(self, key: str, state: Dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _torch_save(self._path(key, ".pt"), state)


def _jsonable_config(obj):
    return json.loads(json.dumps(C._jsonable(obj)))


def open_checkpoints(run_dir, meta: Dict[str, Any], *, resume: bool) -> Path:
    """Prepare ``RUN_DIR/checkpoints`` for a resumable run described by ``meta`` (experiment,
    profile, full config, seeds): with ``resume``, checkpoints already there must be those of
    the same run (else :class:`RunDirError` naming the first difference) and are kept; without
    it, any there are removed (only reached with ``--overwrite``: :func:`prepare_run_dir`
    refuses a directory holding checkpoints otherwise). Returns the folder."""
    import shutil
    folder = Path(run_dir) / CHECKPOINT_FOLDER
    meta = _jsonable_config(meta)
    path = folder / _CHECKPOINT_META
    if folder.is_dir() and resume and path.is_file():
        old = _read(path, f"{CHECKPOINT_FOLDER}/{_CHECKPOINT_META}")
        if old != meta:
            diff = _first_difference(old if isinstance(old, dict) else {}, meta)
            raise RunDirError(f"--resume: {folder} holds checkpoints of another run ({diff}); run "
                              "with the same experiment, profile, settings and seeds, or pass "
                              "--overwrite without --resume to start afresh")
        return folder
    if folder.exists() and not folder.is_symlink():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(path, meta)
    return folder


def _first_difference(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    for key in ("experiment", "profile", "seeds"):
        if old.get(key) != new.get(key):
            return f"{key} {json.dumps(old.get(key))} there, {json.dumps(new.get(key))} now"
    oc, nc = old.get("config") or {}, new.get("config") or {}
    for key in sorted(set(oc) | set(nc)):
        if oc.get(key) != nc.get(key):
            return f"setting {key} = {json.dumps(oc.get(key))} there, {json.dumps(nc.get(key))} now"
    return "its meta.json differs"


def checkpoints_hold_progress(run_dir) -> bool:
    """Whether ``RUN_DIR/checkpoints`` holds anything a resumed run would use."""
    folder = Path(run_dir) / CHECKPOINT_FOLDER
    if not folder.is_dir():
        return False
    return any(p.is_file() and not p.name.startswith(".") for p in folder.rglob("*")
               if p.name != _CHECKPOINT_META)


def remove_checkpoints(run_dir) -> None:
    """Remove ``RUN_DIR/checkpoints`` (the run is saved, or it cannot proceed)."""
    import shutil
    folder = Path(run_dir) / CHECKPOINT_FOLDER
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)


def record_loss(loss, step: int, curve: list, bar, what: str = "training") -> float:
    """The loss of one step: refuse a diverged run, log it to ``curve`` and the progress bar."""
    v = float(loss.detach())
    if not math.isfinite(v):
        raise ExperimentError(f"{what} diverged at step {step} (loss {v}); lower --set lr=")
    curve.append((step, v))
    bar.set_postfix(loss=f"{v:.3f}", refresh=False)
    bar.update(1)
    return v
