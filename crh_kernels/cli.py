"""``crh``: reproduce the paper's experiments and measure real models.

Argument parsing and progress only; the work lives in :mod:`crh_kernels.experiments`.
Progress goes to stderr: tqdm bars on a terminal, plain lines otherwise (a log file, a pipe, CI):
no carriage return or escape code ever reaches a file.

    crh run fc1                         # the main job (CPU settings)
    crh run fc2 --steps 20000 --seed 1
    crh run fc1 --seeds 3               # seeds 0, 1, 2; claims with 95 % intervals over them
    crh run transformer --device cuda   # full-scale settings on a GPU
    crh run minilm --set n_texts=512
    crh run fc1 --tiny --out /tmp/x     # seconds: a smoke test (the tests' configuration)
    crh run fc1 --profile paper --out D # the paper's scale (10^5 steps per run); checkpointed:
    crh run fc1 --profile paper --out D --resume   # continues it after an interruption
    crh report runs/fc1-20250101-120000 # rebuild table, claims and figures from report.json
    crh list                            # experiments, profiles and settings
    crh check                           # each backend: accuracy against float64, time

Exit codes: 0 done; 2 bad arguments (unknown experiment or setting, steps ≤ 0, CUDA or a
backend asked for but unavailable, an ``--out`` that is a file, not writable or already holds a
run without ``--overwrite``) or, for ``crh report``, a malformed or inconsistent saved run (one
line naming the file and the field); 3 the run cannot proceed (a data package missing, the
memory plan over ``--max-memory``, training diverged), with a message that says what to do.
All of exit 2 is decided before anything is trained. Without matplotlib a run still writes
everything but the figures (a warning says so; ``crh report`` draws them later), and a figure
that fails is a warning, never a lost run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from .experiments import EXPERIMENTS


#: How long `crh run fc1` takes: one measured figure, quoted verbatim in README.md and
#: docs/experiments.md (tests/test_cli.py checks that the three agree).
FC1_RUN_TIME = "43 s on a quiet 2-core CPU (92 s while other jobs shared it), measured 2026-11-30"


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _size(text: str) -> int:
    from .experiments.runs import parse_bytes
    try:
        v = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def _setting(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    from .experiments.runs import parse_value
    return key.strip(), parse_value(value.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crh",
        description="Measure the Canonical Representation Hypothesis (CRH) and the Polynomial "
                    "Alignment Hypothesis (PAH) of Ziyin et al.: reproduce the paper's experiments "
                    "and measure a real pretrained transformer (experiments: "
                    f"{', '.join(EXPERIMENTS)}; `crh list` describes each).",
        epilog=f"Start with `crh run fc1` ({FC1_RUN_TIME}). `crh run EXPERIMENT --help` lists "
               "the run options; `crh list` the experiments and their settings.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run an experiment and write report.json, claims, table, figures",
                       description="Run an experiment: train (where it trains), measure every chosen "
                                   "layer with the Collector, write DIR/report.json, DIR/table.txt, "
                                   "DIR/claims.md and DIR/figures/*.png, and print the claims table.")
    r.add_argument("experiment", choices=EXPERIMENTS, metavar="EXPERIMENT",
                   help=f"one of: {', '.join(EXPERIMENTS)}")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default; CPU-sized settings) or cuda (full-scale settings of the paper: "
                        "profile cuda, for fc1/fc2 the same as profile paper)")
    r.add_argument("--steps", type=_positive_int, metavar="N",
                   help="training steps (minilm: measured batches); default: the profile's")
    r.add_argument("--out", metavar="DIR", help="run directory (default: runs/EXPERIMENT-TIMESTAMP); "
                                                "checked before training, refused when it already holds files")
    r.add_argument("--overwrite", action="store_true",
                   help="let --out name a directory that already holds a run: its run files are "
                        "replaced once the new run has finished training (other files are kept); "
                        "without --resume, checkpoints of an unfinished run there are discarded")
    r.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out from its checkpoints (fc1, fc2: the "
                        "same experiment, profile, settings and seeds; finished sub-runs are read "
                        "back, the current one continues from its last checkpoint); with no "
                        "checkpoints there, a fresh run"),
    r.add_argument("--seed", type=_int, default=0, metavar="S", help="seed of everything (default 0)")
    r.add_argument("--seeds", type=_positive_int, metavar="N",
                   help="run N seeds (S, S+1, …) into one run directory and give every claim a 95 %% "
                        "confidence interval over them (every experiment; default: the profile's)")
    r.add_argument("--tiny", action="store_true",
                   help="a smoke test: the tests' tiny configuration (seconds); its numbers mean "
                        "nothing, and table.txt, claims.md and the output say so")
    r.add_argument("--profile", choices=("tiny", "cpu", "paper", "cuda"),
                   help="settings profile (default: cpu, or cuda with --device cuda); paper (fc1, "
                        "fc2): the paper's setup, 10^5 steps per run, runnable on a CPU")
    r.add_argument("--set", dest="settings", action="append", type=_setting, default=[],
                   metavar="KEY=VALUE", help="override one setting (repeatable; `crh list` shows them), "
                                             "e.g. --set weight_decays=1e-4,1e-3 --set lr=0.05")
    r.add_argument("--max-memory", type=_size, metavar="SIZE",
                   help="refuse to start when the covariance states would exceed SIZE (e.g. 4G; "
                        "default: half the RAM, or half the free GPU memory)")
    r.add_argument("--backend", choices=("torch", "triton", "cpp", "cuda"),
                   help="moment backend (default: the fastest available)")
    r.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads (default: the profile's; fc1/fc2 use 1)")
    r.add_argument("--no-plots", action="store_true",
                   help="skip the PNG figures (without matplotlib they are skipped with a warning)")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    r.add_argument("--show-config", action="store_true", help="print the settings and exit")

    rp = sub.add_parser("report", help="rebuild table, claims and figures of a saved run",
                        description="Rebuild DIR/table.txt, DIR/claims.md and DIR/figures/ from "
                                    "DIR/report.json and DIR/extras.json, and print them.")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `crh run`")
    rp.add_argument("--no-plots", action="store_true", help="skip the PNG figures")

    sub.add_parser("list", help="list the experiments, their profiles and settings")
    ck = sub.add_parser("check", help="every available backend on sample data: accuracy vs float64 and time",
                        description="Run each available backend on rows whose mean is 100x their "
                                    "spread; print the covariance error against a float64 reference "
                                    "(the bounds of docs/spec.md §2) and the time per update. Exit 1 if a bound fails.")
    ck.add_argument("--n", type=_positive_int, default=4096, help="rows (default 4096)")
    ck.add_argument("--d", type=_positive_int, default=256, help="features (default 256)")
    ck.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.commands = {"run": r, "report": rp, "check": ck}
    return p


class LineBar:
    """The progress of one loop as plain lines, for output that is not a terminal: a line at
    most every ``interval`` seconds while it runs and one when it ends (tqdm-like: ``update``,
    ``set_postfix``, ``set_description``, ``close``, context manager)."""

    def __init__(self, total: Optional[int] = None, desc: str = "", stream=None,
                 interval: float = 30.0):
        self.total, self.desc, self.n = total, desc, 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._t0 = self._last = time.monotonic()
        self._postfix: dict = {}
        self._closed = False

    def _line(self, what: str) -> None:
        took = time.monotonic() - self._t0
        tail = "".join(f", {k}={v}" for k, v in self._postfix.items())
        print(f"{self.desc or 'progress'}: {what} after {took:.0f} s{tail}", file=self.stream, flush=True)

    def _count(self) -> str:
        if self.total:
            return f"{self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)"
        return str(self.n)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._line(self._count())

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self._postfix = dict(ordered_dict or {}, **kwargs)  # formatted only when a line is printed

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._line(f"done, {self._count()}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _progress(quiet: bool, stream=None):
    """The progress-bar factory of a run: nothing with ``--quiet``; tqdm on a terminal; plain
    lines (:class:`LineBar`) when ``stream`` (default stderr) is not one."""
    if quiet:
        from .experiments.runs import null_progress
        return null_progress
    stream = stream if stream is not None else sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    if not tty:
        def lines(total=None, desc: str = "", leave: bool = False, **kwargs):
            return LineBar(total, desc, stream)
        return lines
    from tqdm.auto import tqdm

    def make(total=None, desc: str = "", leave: bool = False, **kwargs):
        return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, file=stream,
                    mininterval=0.5, **kwargs)
    return make


def _log(quiet: bool):
    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)
    return log


def _cmd_list() -> int:
    from .experiments import get
    for name in EXPERIMENTS:
        mod = get(name)
        print(f"{name}: {mod.DESCRIPTION}")
        print(f"  profiles: {', '.join(mod.PROFILES)}")
        cpu = mod.PROFILES["cpu"]
        print("  settings (cpu profile): " + ", ".join(f"{k}={json.dumps(v)}" for k, v in cpu.items()))
    return 0


def _warn(msg: str) -> None:
    """What the user must see even with --quiet (a figure failed, figures skipped)."""
    print(f"crh: warning: {msg}", file=sys.stderr, flush=True)


def _backend_problem(name: str, device) -> Optional[str]:
    """Why the moment backend ``name`` cannot measure tensors on ``device`` here, or None."""
    from . import backends
    if name not in backends.names():
        return f"no such backend (one of {', '.join(backends.names())})"
    try:
        be = backends.get(name)
        ok, why = be.supports(device)
    except (RuntimeError, ValueError, ImportError) as exc:
        why, ok = str(exc).splitlines()[0] if str(exc) else type(exc).__name__, False
        why = why.replace(f"backend {name!r} is unavailable: ", "")
    if ok:
        return None
    usable = []
    for other, (avail, _) in backends.available_backends().items():
        if avail and backends.get(other).supports(device)[0]:
            usable.append(other)
    return (f"unavailable on {device}: {why}; usable here: {', '.join(usable) or 'none'} "
            "(or leave it out for the fastest)")


def _cmd_run(args, parser) -> int:
    import torch
    from . import _env
    from .experiments import (ExperimentError, MissingData, RunDirError, get, profile_config, run_experiment,
                              seeds_of, smoke_note)
    from .experiments import claims as C
    from .experiments.runs import Context, default_max_memory, human_bytes, prepare_run_dir, remove_if_empty

    run_parser = parser.commands["run"]
    if args.device == "cuda" and not torch.cuda.is_available():
        run_parser.error("--device cuda: no CUDA device is available (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False); use --device cpu")
    if args.tiny and args.profile and args.profile != "tiny":
        run_parser.error(f"--tiny contradicts --profile {args.profile}")
    profile = "tiny" if args.tiny else (args.profile or ("cuda" if args.device == "cuda" else "cpu"))
    overrides = dict(args.settings)
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    try:
        cfg = profile_config(args.experiment, profile, overrides)
        seeds = seeds_of(args.experiment, cfg, args.seed)
    except ExperimentError as exc:
        if args.seeds is not None and "seeds" not in get(args.experiment).PROFILES[profile]:
            run_parser.error(f"--seeds: {args.experiment} does not aggregate claims over seeds "
                             "(fc1 and fc2 do)")
        run_parser.error(str(exc))
    if args.show_config:
        print(json.dumps({"experiment": args.experiment, "profile": profile, "config": cfg}, indent=1))
        return 0
    device = torch.device(args.device)
    # Everything that can be refused is refused here, before a step is trained.
    backend, where = (args.backend, f"--backend {args.backend}") if args.backend else \
        (_env.backend(), f"CRH_BACKEND={_env.backend()}")
    if backend:
        why = _backend_problem(backend, device)
        if why:
            run_parser.error(f"{where}: {why}")
    out = Path(args.out) if args.out else Path("runs") / f"{args.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume and not getattr(get(args.experiment), "RESUMABLE", False):
        run_parser.error(f"--resume: {args.experiment} does not checkpoint its training (fc1 and fc2 do)")
    try:
        created = prepare_run_dir(out, overwrite=args.overwrite, resume=args.resume)
    except RunDirError as exc:
        run_parser.error(f"--out: {exc}")
    max_memory = args.max_memory if args.max_memory is not None else default_max_memory(device)
    ctx = Context(device=device, seed=args.seed, progress=_progress(args.quiet), log=_log(args.quiet),
                  warn=_warn, max_memory=max_memory, backend=args.backend)
    log = _log(args.quiet)
    note = smoke_note(profile)
    which = f"seed {args.seed}" if len(seeds) == 1 else f"seeds {seeds[0]}…{seeds[-1]}"
    log(f"crh run {args.experiment}: profile {profile}, device {device}, {which}, "
        f"out {out}, memory budget {human_bytes(max_memory)}" + (f"\n{note}" if note else ""))
    t0 = time.perf_counter()
    try:
        result, claims, figures, saved = run_experiment(args.experiment, out, ctx, profile=profile,
                                                        overrides=overrides, plots=not args.no_plots,
                                                        overwrite=args.overwrite, resume=args.resume)
    except RunDirError as exc:  # --resume onto checkpoints of another run: refused before training
        if created:
            remove_if_empty(out)
        run_parser.error(f"--out: {exc}")
    except (MissingData, ExperimentError) as exc:
        if created:
            remove_if_empty(out)
        print(f"crh: cannot run {args.experiment}: {exc}", file=sys.stderr)
        return 3
    except BaseException:
        if created:
            remove_if_empty(out)
        raise
    wall = time.perf_counter() - t0
    out = Path(saved.get("run_dir", out))
    if note:
        print(note)
        print()
    print(result.report.table())
    print()
    print(C.to_text(claims, note=note))
    print()
    if args.no_plots:
        figs = "no figures (--no-plots)"
    elif saved.get("figures_skipped"):
        figs = f"no figures ({saved['figures_skipped'].split(' (')[0]}: see the warning)"
    else:
        failed = len(saved.get("figure_errors", ()))
        figs = f"{len(figures)} figures in {out}/figures" + (f" ({failed} failed: see the warnings)"
                                                             if failed else "")
    if len(seeds) > 1:
        print(f"{len(seeds)} seeds: the table and figures are seed {seeds[0]}'s, the claims use every "
              f"seed (the others' runs in {out}/seeds/)")
    print(f"wrote {out}/report.json, {out}/table.txt, {out}/claims.md and {figs}; "
          f"{wall:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in ctx.timings.items())})")
    return 0


def _cmd_report(args, parser) -> int:
    from .experiments import ExperimentError, SavedRunError, rebuild, smoke_note
    from .experiments import claims as C
    run_dir = Path(args.run_dir)
    rp = parser.commands["report"]
    if not run_dir.is_dir():
        rp.error(f"{run_dir} is not a directory")
    try:
        saved, report, claims, figures = rebuild(run_dir, plots=not args.no_plots, warn=_warn)
    except SavedRunError as exc:  # a malformed file: one line naming the file and the field
        print(f"crh report: error: {run_dir}: {exc}", file=sys.stderr)
        return 2
    except ExperimentError as exc:
        rp.error(str(exc))
    except (ValueError, KeyError, TypeError) as exc:  # not foreseen by the checks: still one line
        first = (str(exc).splitlines() or [""])[0]
        print(f"crh report: error: {run_dir}: cannot read the saved run ({type(exc).__name__}: {first})",
              file=sys.stderr)
        return 2
    note = smoke_note(saved.get("profile"))
    if note:
        print(note)
        print()
    print(report.table())
    print()
    print(C.to_text(claims, note=note))
    print()
    missing = saved.get("not_redrawn") or {}
    print(f"rebuilt {run_dir}/table.txt, {run_dir}/claims.md"
          + (f" and {len(figures)} figures in {run_dir}/figures" if figures else "")
          + (f"; not redrawn: {', '.join(missing)} ({next(iter(missing.values()))})" if missing else ""))
    return 0


def _cmd_check(args, parser) -> int:
    import torch
    from . import selfcheck
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.commands["check"].error("--device cuda: no CUDA device is available")
    rows = selfcheck.run(n=args.n, d=args.d, device=args.device)
    return 0 if rows and all(r["ok"] for r in rows) else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `crh` / `python -m crh_kernels` alone: the help (a smoke check)
        parser.print_help()
        return 0
    if args.command == "list":
        return _cmd_list()
    if args.command == "run":
        return _cmd_run(args, parser)
    if args.command == "report":
        return _cmd_report(args, parser)
    if args.command == "check":
        return _cmd_check(args, parser)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


def console_main() -> None:  # pragma: no cover - thin wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
