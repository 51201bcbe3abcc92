"""What every experiment shares: the run context, configs, seeding, the memory plan check,
the measurement loop around a :class:`~crh_kernels.collect.Collector`, and saving a run.

A run directory holds::

    config.json    experiment, profile, the full config, device, seed, timings, versions
    report.json    the main Report (crh_kernels.report.Report.to_json)
    extras.json    experiment-specific numbers (sweeps, α over training, baselines)
    table.txt      Report.table()
    claims.md      the claims table (also claims.json)
    figures/       Report.plot() PNGs and the experiment's own PNGs
    reports/       further Reports of a sweep (one JSON per setting), when the experiment has them

``crh report RUN_DIR`` rebuilds table, claims and figures from these files alone.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from ..plots import figure, save_figure  # noqa: F401  (the experiments' figures use these)
from . import claims as C


# ----------------------------------------------------------------------------- errors
class ExperimentError(RuntimeError):
    """A run cannot proceed for a reason the user can fix (the message says how)."""


class MemoryPlanError(ExperimentError):
    """The requested matrices would exceed ``--max-memory``."""


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
    manager); ``log(msg)`` prints a line; ``max_memory`` is the budget in bytes of the collector's
    matrices (None: unlimited).
    """
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: Callable[..., Any] = null_progress
    log: Callable[[str], None] = lambda msg: None
    max_memory: Optional[int] = None
    backend: Optional[str] = None
    timings: Dict[str, float] = field(default_factory=dict)

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
    col = Collector(model, modules=modules, streams=tuple(streams), heads=heads, backend=ctx.backend,
                    state_dtype=dtype, **kwargs)
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


# ----------------------------------------------------------------------------- report access
RELATIONS = C.RELATIONS


def alpha(rep, layer: str, relation: str, kind: str = "cov") -> float:
    e = rep.layers.get(layer) if hasattr(rep, "layers") else rep.get(layer)
    if e is None:
        return float("nan")
    v = (e.get("alpha_cov" if kind == "cov" else "alpha_second") or {}).get(relation)
    return float("nan") if v is None else float(v)


def layer_summary(rep, layers: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """The compact per-layer numbers a sweep keeps: six α (cov), effective ranks, dims, p, q,
    forward slope, phase."""
    out = {}
    for name, e in rep.layers.items():
        if layers is not None and name not in layers:
            continue
        out[name] = {
            "alpha": {r: (e.get("alpha_cov") or {}).get(r) for r in RELATIONS},
            "alpha_second": {r: (e.get("alpha_second") or {}).get(r) for r in RELATIONS},
            "effective_rank_h": e.get("effective_rank_h"),
            "effective_rank_g": e.get("effective_rank_g"),
            "dims": e.get("dims"),
            "p": e.get("p"), "q": e.get("q"),
            "forward_slope": e.get("forward_slope"),
            "pairing_slope": e.get("pairing_slope"),
            "phase": e.get("phase"),
        }
    return out


def rga(summary_layer: Dict[str, Any]) -> float:
    """Mean of the forward and backward RGA of a layer summary (finite ones)."""
    a = summary_layer["alpha"]
    return C.mean([a.get("forward_RGA"), a.get("backward_RGA")])


def mean_alpha(summary_layer: Dict[str, Any]) -> float:
    return C.mean(summary_layer["alpha"].values())


def exponent_values(rep, layers: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Every power-law exponent the report holds, as ``{layer, what, value, r2}``: p (h vs z),
    q (g vs z), p/q (h vs g, backward), the forward slope (H_b vs G_b in W's basis) and the
    sorted-spectrum pairing slope (paper Fig. 3)."""
    out = []
    for name, e in rep.layers.items():
        if layers is not None and name not in layers:
            continue
        ex = e.get("exponents") or {}
        r2 = {"p": (ex.get("p") or {}).get("r2"), "q": (ex.get("q") or {}).get("r2"),
              "forward_slope": (ex.get("forward") or {}).get("r2")}
        p, q = e.get("p"), e.get("q")
        vals = [("p", p, r2["p"]), ("q", q, r2["q"])]
        if p is not None and q is not None and abs(q) > 1e-12:
            vals.append(("p/q", p / q, None))
        vals.append(("forward_slope", e.get("forward_slope"), r2["forward_slope"]))
        vals.append(("pairing_slope", e.get("pairing_slope"), None))
        for what, v, r in vals:
            if v is not None and math.isfinite(float(v)):
                out.append({"layer": name, "what": what, "value": float(v), "r2": r})
    return out


def exponent_range_claim(rep, layers: Optional[Sequence[str]] = None, *, eps: float = 0.1,
                         min_fraction: float = 0.8, source: str = "§5, §6, C.8 (PAH)",
                         which: Sequence[str] = ("p", "q", "p/q", "forward_slope", "pairing_slope")
                         ) -> C.Claim:
    """"Almost all positive exponents are within [1/3, 3]": the fraction of the measured
    exponents above ``eps`` (smaller ones are "flat", exponent 0 is a legal value) that lie in
    [1/3, 3] must be ≥ ``min_fraction``."""
    vals = [v for v in exponent_values(rep, layers) if v["what"] in which]
    pos = [v for v in vals if v["value"] > eps]
    inside = [v for v in pos if 1 / 3 <= v["value"] <= 3]
    claim = "positive spectral exponents lie within [1/3, 3]"
    rule = f"of the exponents > {eps} ({', '.join(which)}), ≥ {min_fraction:.0%} in [1/3, 3]"
    if not pos:
        return C.Claim(claim, source, f"no positive exponent among {len(vals)} fitted", rule, None)
    frac = len(inside) / len(pos)
    outside = [f"{v['layer']}:{v['what']}={v['value']:.2f}" for v in pos if v not in inside][:4]
    measured = (f"{len(inside)}/{len(pos)} = {frac:.0%} in range (median {C.fmt(C.median(v['value'] for v in pos))}"
                f", range {C.fmt(min(v['value'] for v in pos))}…{C.fmt(max(v['value'] for v in pos))})")
    if outside:
        measured += "; outside: " + ", ".join(outside)
    return C.Claim(claim, source, measured, rule, frac >= min_fraction, frac)


@functools.lru_cache(maxsize=64)
def paper_baseline(dim: int) -> float:
    """The paper's significance baseline at dimension ``dim``: α between the covariances of two
    independent random projections of rank dim/5 (its example: rank 40 of 200 ≈ 0.14)."""
    from ..analysis import random_baseline
    return random_baseline(int(dim), max(1, int(round(dim / 5))), trials=10 if dim <= 512 else 3)


def baseline_claim(rep, layers: Sequence[str], relations: Sequence[str] = ("forward_RGA", "backward_RGA"),
                   *, source: str, claim: Optional[str] = None, skip: Sequence[str] = ()) -> C.Claim:
    """Each ``relation`` α of each layer above :func:`paper_baseline` of its dimension. ``skip``
    lists ``"layer:relation"`` pairs left out (e.g. the backward side of a first layer, whose
    H_a is the data's covariance, which training cannot change)."""
    rows, ok = [], []
    for name in layers:
        e = rep.layers.get(name) or {}
        dims = e.get("dims") or {}
        for rel in relations:
            if f"{name}:{rel}" in skip:
                continue
            a = alpha(rep, name, rel)
            d = dims.get("h_a" if rel.startswith("backward") else "h_b")
            if not d or d < 2 or not math.isfinite(a):
                continue
            base = paper_baseline(int(d))
            rows.append((f"{name} {rel.split('_')[0][0]}{rel.split('_')[1]} {a:.2f}/{base:.2f}", a > base))
            ok.append(a > base)
    names = " and ".join(r.replace("_", " ") for r in relations)
    claim = claim or f"the {names} are significant (above the random baseline)"
    rule = "every α > α of two random rank-D/5 covariances of its dimension D (paper: 0.14 at 40/200)"
    if not ok:
        return C.Claim(claim, source, "no layer with a finite α", rule, None)
    if len(rows) <= 12:
        measured = "α/baseline: " + "; ".join(r for r, _ in rows)
    else:
        below = [r for r, good in rows if not good]
        measured = (f"{sum(ok)}/{len(ok)} α above the baseline"
                    + (f"; below: {'; '.join(below[:8])}" + (f" and {len(below) - 8} more" if len(below) > 8 else "")
                       if below else ""))
    return C.Claim(claim, source, measured, rule, all(ok), sum(ok) / len(ok))


# ----------------------------------------------------------------------------- saving
def _versions() -> Dict[str, str]:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from .. import __version__
        v["crh_kernels"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return v


def save_run(run_dir: Path, experiment: str, profile: str, result: RunResult, ctx: Context,
             claims: Sequence[C.Claim], figures: Sequence[str], wall_s: float) -> Dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result.report.to_json(run_dir / "report.json")
    for name, rep in result.reports.items():
        rep.to_json(run_dir / "reports" / f"{name}.json")
    with open(run_dir / "extras.json", "w") as f:
        json.dump(C._jsonable(result.extras), f, indent=1)
    cfg = {"experiment": experiment, "profile": profile, "config": result.config,
           "device": str(ctx.device), "seed": ctx.seed, "backend": ctx.backend,
           "max_memory": ctx.max_memory, "wall_s": round(wall_s, 2),
           "timings_s": {k: round(v, 2) for k, v in ctx.timings.items()},
           "torch_threads": torch.get_num_threads(), "versions": _versions(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(run_dir / "config.json", "w") as f:
        json.dump(C._jsonable(cfg), f, indent=1)
    write_outputs(run_dir, result.report, claims, experiment)
    return cfg


def write_outputs(run_dir: Path, report, claims: Sequence[C.Claim], experiment: str) -> None:
    run_dir = Path(run_dir)
    (run_dir / "table.txt").write_text(report.table() + "\n")
    (run_dir / "claims.md").write_text(C.to_markdown(claims, f"Claims: {experiment}"))
    C.to_json(claims, run_dir / "claims.json")


def load_run(run_dir: Path):
    """``(config dict, Report, extras dict, {name: Report})`` of a saved run."""
    from ..report import Report
    run_dir = Path(run_dir)
    if not (run_dir / "report.json").exists():
        raise ExperimentError(f"{run_dir} holds no report.json (is it a directory written by `crh run`?)")
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    rep = Report.from_json(run_dir / "report.json")
    ex_path = run_dir / "extras.json"
    extras = json.loads(ex_path.read_text()) if ex_path.exists() else {}
    reports = {}
    if (run_dir / "reports").is_dir():
        for p in sorted((run_dir / "reports").glob("*.json")):
            reports[p.stem] = Report.from_json(p)
    return cfg, rep, extras, reports


# ----------------------------------------------------------------------------- figures
def record_loss(loss, step: int, curve: list, bar, what: str = "training") -> float:
    """The loss of one step: refuse a diverged run, log it to ``curve`` and the progress bar."""
    v = float(loss.detach())
    if not math.isfinite(v):
        raise ExperimentError(f"{what} diverged at step {step} (loss {v}); lower --set lr=")
    curve.append((step, v))
    bar.set_postfix(loss=f"{v:.3f}", refresh=False)
    bar.update(1)
    return v


def nan(v) -> float:
    return float("nan") if v is None else float(v)
