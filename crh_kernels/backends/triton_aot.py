"""Ahead-of-time compilation of every Triton kernel the GPU launcher runs, without a GPU.

Owns: which kernel variants the GPU path can launch (read from ``backends/triton.py`` itself),
compiling each exactly as Triton would specialize it at run time, for sm_80 and sm_90, and the
resource report (registers, spills, shared memory, matrix instructions) that NOTES.md records
and ``tests/test_aot.py`` asserts.

How a case is made, and why each step:

1. **The launcher's own calls.** The launcher's public functions (``row_stats``,
   ``syrk_update``, ``cross_update``, called as ``moments_op`` / ``cross_moments_op`` call
   them) run on fake CUDA tensors (``FakeTensorMode``) while Triton's two launch entry points
   (``JITFunction.run``, ``Autotuner.run``) record instead of launching. So the positional
   arguments, the constexprs and the autotune configs are the launcher's, not a copy of them
   that could drift.
2. **The run-time specialization.** Triton specializes every launch on its arguments: an int
   equal to 1 becomes a compile-time constant (a unit column stride), pointers and ints
   divisible by 16 get ``tt.divisibility = 16`` (vector loads, fewer masks). Compiling with
   plain ``i32`` strides and no hints measures another kernel (issue 14: 171 registers instead
   of the 165 that run, and no sight of the spills at unaligned D). The recorded arguments go
   through Triton's own binder (``create_function_from_signature``, the function a launch
   calls), with stand-ins whose ``data_ptr`` is a 256-byte-aligned base plus the view's
   offset, as the CUDA caching allocator gives. The binder and ``ASTSource(fn, signature,
   constexprs, attrs)`` are the same in Triton 3.6 (the lent GPU machine's) and 3.9 (here).
3. **Layouts.** ``aligned``: (8192, 1024) contiguous, everything divisible by 16. ``N8191``:
   (8191, 1024), aligned D on an odd number of rows (N's divisibility changes the registers
   too). ``D1000``: (8192, 1000), D and the row stride not divisible by 16. ``D1025``: (8191,
   1025), a bias column on an odd number of rows. ``I64``, ``I64D1000``: aligned and unaligned
   D with N·D > 2^31, so the launcher takes int64 offsets (the ``INT64`` constexpr). A case
   that specializes identically under two layouts is compiled once. The matrix kernels'
   autotune configs depend on the launch's class (``backends/triton.py`` ``mm_configs``:
   target, alignment, atomics, int64): each call is recorded once per target, as the launcher
   runs on it, so a case is a config that class can pick.
4. **The report.** ``cuobjdump --dump-resource-usage`` of the cubin gives REG, STACK (spilled
   registers live on the stack frame: this is where spills show) and LOCAL; the PTX says
   whether the matrix loop uses ``wgmma`` or ``mma.sync``.

    python -m crh_kernels.backends.triton_aot            # the NOTES.md table (markdown)
    python -m crh_kernels.backends.triton_aot --rows     # one line per compiled case
    python -m crh_kernels.backends.triton_aot --json     # every case as JSON (tests/test_aot.py)

Everything that needs real ``triton.jit`` kernels and the GPU launcher runs in a fresh
interpreter (``list_cases``, ``compile_cases``): the test process has ``TRITON_INTERPRET=1``,
under which the launcher is built for the interpreter.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

#: (N, D) per layout name; see the module docstring
LAYOUTS = {"aligned": (8192, 1024), "N8191": (8191, 1024), "D1000": (8192, 1000), "D1025": (8191, 1025),
           "I64": (2 ** 21 + 1, 1024), "I64D1000": (2 ** 21 + 2 ** 17, 1000)}
#: the layouts the launcher classes as aligned (``MMCase.aligned``)
ALIGNED_LAYOUTS = ("aligned", "N8191", "I64")
CCS = (80, 90)
#: operand types × fp32 precision of the matrix kernels; row_stats has no precision
MM_OPERANDS = (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee"))
ROW_OPERANDS = ("bf16", "fp16", "fp32")
#: shared memory per block that each target allows (bytes)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_BASE_ADDRESS = 1 << 20  # a CUDA allocation: 512-byte aligned
_KERNEL_NAMES = {"_row_stats_kernel": "row_stats", "_scatter_upper_kernel": "syrk",
                 "_cross_scatter_kernel": "cross"}


@dataclass
class AotResult:
    id: str
    kernel: str
    dtype: str
    precision: str
    variant: str
    config: str
    layout: str
    cc: int
    spec: str = ""  # the run-time specialization: constants and 16-divisible arguments
    registers: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1
    wgmma: bool = False
    mma_sync: bool = False
    ints: Dict[str, int] = field(default_factory=dict)  # the launch's integer arguments
    same_as: str = ""  # the id this case compiled identically to (compiled once)
    notes: List[str] = field(default_factory=list)

    @property
    def spills(self) -> bool:
        return self.stack != 0 or self.local != 0


# ----------------------------------------------------------------------------- recording

class _Launch:
    def __init__(self, fn, configs, args, kwargs):
        self.fn, self.configs, self.args, self.kwargs = fn, configs, args, kwargs


class _Ptr:
    """What the binder needs of a tensor argument: its dtype and its address."""

    def __init__(self, dtype, address):
        self.dtype = dtype
        self._address = address

    def data_ptr(self):
        return self._address


def _stand_in(arg):
    import torch

    if isinstance(arg, torch.Tensor):
        return _Ptr(arg.dtype, _BASE_ADDRESS + arg.storage_offset() * arg.element_size())
    return arg


class _Recorder:
    """Within it, Triton launches are recorded, not run, and CUDA tensors can be fake."""

    SM_COUNT = 132  # H200; only the grid (not compiled) depends on it

    def __init__(self, cc: int = 90):
        self.cc = cc  # the target the launcher believes it runs on (its configs depend on it)

    def __enter__(self):
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        self.launches: List[_Launch] = []
        launches = self.launches

        def autotuned(tuner, *args, grid=None, warmup=False, **kwargs):
            launches.append(_Launch(tuner.fn, [c.all_kwargs() for c in tuner.configs], args, kwargs))

        def direct(fn, *args, grid=None, warmup=False, **kwargs):
            launches.append(_Launch(fn, [{}], args, kwargs))

        class _Props:
            multi_processor_count = self.SM_COUNT

        self._saved = [(Autotuner, "run", Autotuner.run), (JITFunction, "run", JITFunction.run),
                       (torch.cuda, "get_device_properties", torch.cuda.get_device_properties),
                       (torch.cuda, "get_device_capability", torch.cuda.get_device_capability)]
        Autotuner.run = autotuned
        JITFunction.run = direct
        torch.cuda.get_device_properties = lambda *a, **k: _Props()
        torch.cuda.get_device_capability = lambda *a, **k: divmod(self.cc, 10)
        self._mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for owner, name, value in self._saved:
            setattr(owner, name, value)
        return False


def _scenarios():
    """(kernel, dtype, precision, variant, layout, call) for every launcher call the GPU path
    makes: ``call()`` runs the launcher function on fake CUDA tensors."""
    out = []
    for layout, (n, d) in LAYOUTS.items():
        out += _layout_calls(layout, n, d)
    return out


def _layout_calls(layout: str, n: int, d: int):
    import torch

    from . import triton as launch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    def x_of(dt):
        return torch.empty(n, d, dtype=dtypes[dt], device="cuda")

    def rows():
        return torch.empty(n, dtype=torch.float32, device="cuda")

    def mask():
        return torch.ones(n, dtype=torch.bool, device="cuda")

    def cols():
        return torch.empty(d, dtype=torch.float32, device="cuda")

    out = []
    for dt in ROW_OPERANDS:
        # as moments_op calls it, with and without a mask / normalization; as
        # cross_moments_op calls it: first look at h (no sums), then gated
        out += [
            ("row_stats", dt, "", "mask,norm,sum", layout,
             lambda dt=dt: launch.row_stats(x_of(dt), mask(), True)),
            ("row_stats", dt, "", "sum", layout,
             lambda dt=dt: launch.row_stats(x_of(dt), None, False)),
            ("row_stats", dt, "", "mask,norm", layout,
             lambda dt=dt: launch.row_stats(x_of(dt), mask(), True, with_sum=False)),
            ("row_stats", dt, "", "mask,norm,gate,sum", layout,
             lambda dt=dt: launch.row_stats(x_of(dt), mask(), True, gate=rows())),
        ]
    for dt, prec in MM_OPERANDS:
        for atomic in (False, True):  # CRH_TRITON_ATOMICS
            out.append(("syrk", dt, prec, "atomic" if atomic else "det", layout,
                        lambda dt=dt, prec=prec, atomic=atomic: launch.syrk_update(
                            x_of(dt), rows(), cols(), prec, atomic=atomic)))
        out.append(("cross", dt, prec, "", layout,
                    lambda dt=dt, prec=prec: launch.cross_update(
                        x_of(dt), x_of(dt), rows(), rows(), cols(), cols(), prec)))
    # the fused paths (moments_op, update_op: pass 1, its totals, the main pass, the epilogue
    # with the shift removed / merged into a float32 or float64 state), under both settings of
    # CRH_TRITON_ATOMICS; jobs() keeps only their launches that no call above makes
    for dt, prec in MM_OPERANDS:
        for atomic in (False, True):
            mode = "atomic" if atomic else "det"
            out.append(("moments", dt, prec, mode, layout,
                        lambda dt=dt, prec=prec, atomic=atomic: _with_atomics(
                            atomic, launch._moments_impl, x_of(dt), mask(), True, prec)))
            for state in ("fp32", "fp64"):
                sdt = torch.float32 if state == "fp32" else torch.float64
                out.append(("update", dt, prec, f"{state},{mode}", layout,
                            lambda dt=dt, prec=prec, atomic=atomic, sdt=sdt: _with_atomics(
                                atomic, launch._update_impl, x_of(dt), mask(), True, prec,
                                torch.empty(2, dtype=torch.int64, device="cuda"),
                                torch.empty(d, dtype=sdt, device="cuda"),
                                torch.empty(d, d, dtype=sdt, device="cuda"))))
    return out


def _with_atomics(atomic: bool, fn, *args):
    """``fn(*args)`` with ``CRH_TRITON_ATOMICS`` set as given (the fused paths read it)."""
    saved = os.environ.get("CRH_TRITON_ATOMICS")
    os.environ["CRH_TRITON_ATOMICS"] = "1" if atomic else "0"
    try:
        return fn(*args)
    finally:
        if saved is None:
            os.environ.pop("CRH_TRITON_ATOMICS", None)
        else:
            os.environ["CRH_TRITON_ATOMICS"] = saved


def _config_label(fn, cfg: dict, kwargs: dict) -> str:
    """Block sizes, warps, stages (and a register cap) of one launch: "128x64 w8 s3"."""
    merged = dict(kwargs, **cfg)
    blocks = [str(merged[p.name]) for p in fn.params
              if (p.name == "BLOCK" or p.name.startswith("BLOCK_")) and p.name in merged]
    label = "x".join(blocks) + f" w{merged.get('num_warps', 4)}"
    if "num_stages" in merged:
        label += f" s{merged['num_stages']}"
    if merged.get("maxnreg"):
        label += f" r{merged['maxnreg']}"
    return label


def mm_label(cfg) -> str:
    """The label of a main-pass autotune config (``triton.Config``), as cases carry it."""
    kw = cfg.kwargs
    label = f"{kw['BLOCK_M']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"
    return label + (f" r{cfg.maxnreg}" if getattr(cfg, "maxnreg", None) else "")


def _short(fn) -> str:
    return _KERNEL_NAMES.get(fn.__name__, fn.__name__.strip("_").removesuffix("_kernel"))


def jobs():
    """Every (case, how to compile it), in the order of ``_scenarios``; ``build`` compiles one.
    Needs real ``triton.jit`` kernels (no ``TRITON_INTERPRET``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backends = {cc: make_backend(GPUTarget("cuda", cc, 32)) for cc in CCS}
    out, seen = [], set()
    # (layout, kernel, target, specialization, options) of every case: a kernel a call
    # launches besides its own (pass 1 and the main pass of the fused paths, the epilogue of
    # each operand type) is a case only where no earlier call launched it so
    compiled_as = set()
    for cc, (kernel, dt, prec, variant, layout, call) in ((cc, sc) for cc in CCS for sc in _scenarios()):
        with _Recorder(cc) as rec:
            try:
                call()
                stopped = ""
            except Exception as e:  # noqa: BLE001 - fake tensors cannot run every torch op
                if not rec.launches:
                    raise
                stopped = f"launcher stopped after its first launch under fake tensors: {e}"
        for launch_ in rec.launches:  # every launch of the call: a new epilogue kernel too
            fn = launch_.fn
            name = _short(fn)
            args = [_stand_in(a) for a in launch_.args]
            backend = backends[cc]
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            for cfg in launch_.configs:
                kwargs = dict(launch_.kwargs, **cfg)
                bound, spec, options = binder(*args, **kwargs)
                config = _config_label(fn, cfg, launch_.kwargs)
                # a kernel the call launches besides its own: named after the call
                var = variant if name == kernel else "+".join(x for x in (kernel, variant) if x)
                parts = [name, dt] + ([prec] if name != "row_stats" and dt == "fp32" else [])
                parts += [var, config.replace(" ", ""), layout, f"sm{cc}"]
                case = AotResult("-".join(x for x in parts if x), name, dt, prec, var, config, layout, cc)
                if case.id in seen:
                    continue
                same = (layout, fn.__name__, cc, repr(spec), repr(sorted(options.items())))
                if name != kernel and same in compiled_as:
                    continue
                seen.add(case.id)
                compiled_as.add(same)
                case.ints = {p.name: v for p, v in zip(fn.params, bound.values())
                             if not p.is_constexpr and type(v) is int}
                if stopped:
                    case.notes.append(stopped)
                out.append((case, fn, list(bound.values()), spec, options, backend))
    return out


def _specialization(fn, values, spec, backend):
    """Triton's own packing of a launch (``JITFunction._pack_args``), flat arguments only."""
    signature = {p.name: s[0] for p, s in zip(fn.params, spec)}
    constexprs = {(i,): v for i, (v, s) in enumerate(zip(values, spec)) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec)
             if s[0] != "constexpr" and isinstance(s[1], str)}
    consts = [f"{p.name}={values[i]}" for i, p in enumerate(fn.params)
              if spec[i][0] == "constexpr" and not p.is_constexpr]
    div16 = [p.name for i, p in enumerate(fn.params) if attrs.get((i,))]
    label = "; ".join(x for x in (" ".join(consts), "16 | " + ",".join(div16) if div16 else "") if x)
    return signature, constexprs, attrs, label


# ----------------------------------------------------------------------------- compiling

def _resource_usage(cubin: bytes) -> Dict[str, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    missing = {"REG", "STACK", "LOCAL"} - set(fields)
    if missing:
        raise RuntimeError(f"cuobjdump printed no {sorted(missing)}:\n{text}")
    return {k: int(v) for k, v in fields.items()}


def build(job):
    """Compile one job of ``jobs()``: ``(AotResult with its resources, Triton's compiled
    kernel)``; the kernel's ``asm`` holds the PTX and the cubin (bench/sass_model.py reads it)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    case, fn, values, spec, options, backend = job
    signature, constexprs, attrs, case.spec = _specialization(fn, values, spec, backend)
    opts = backend.parse_options(options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", case.cc, 32), options=opts.__dict__)
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    case.registers, case.stack, case.local = usage["REG"], usage["STACK"], usage["LOCAL"]
    # dynamic shared memory (the pipeline's stages) is in the metadata, static in the cubin
    case.shared = int(getattr(compiled.metadata, "shared", 0) or 0) + usage.get("SHARED", 0)
    case.wgmma = "wgmma.mma_async" in ptx
    case.mma_sync = "mma.sync" in ptx
    return case, compiled


def _compile(job) -> AotResult:
    return build(job)[0]


def _key(job):
    case, fn, values, spec, options, backend = job
    return (fn.__name__, case.cc, repr(spec), repr(sorted(options.items())))


_POOL_JOBS: list = []


def _compile_index(i: int) -> dict:
    return asdict(_compile(_POOL_JOBS[i]))


def run_all(jobs_n: int = 1, only: Optional[set] = None) -> List[AotResult]:
    """Record, specialize and compile every case (in this process; needs ``triton.jit``
    kernels, i.e. no ``TRITON_INTERPRET``). ``only``: ids to compile (all by default)."""
    global _POOL_JOBS
    todo = [j for j in jobs() if only is None or j[0].id in only]
    first: Dict[tuple, int] = {}
    unique = []
    for i, j in enumerate(todo):
        k = _key(j)
        if k not in first:
            first[k] = i
            unique.append(i)
    _POOL_JOBS = todo
    if jobs_n > 1 and len(unique) > 1:
        import multiprocessing as mp

        # fork: the children inherit the recorded jobs (kernels and dtypes do not pickle)
        with mp.get_context("fork").Pool(min(jobs_n, len(unique))) as pool:
            done = dict(zip(unique, pool.map(_compile_index, unique, chunksize=1)))
    else:
        done = {i: _compile_index(i) for i in unique}
    results = []
    for i, j in enumerate(todo):
        src = first[_key(j)]
        r = dict(done[src])
        r.update({k: getattr(j[0], k) for k in ("id", "dtype", "precision", "variant", "config", "layout",
                                                 "ints", "notes")})
        r["same_as"] = "" if src == i else todo[src][0].id
        results.append(AotResult(**r))
    return results


def list_all() -> List[AotResult]:
    """Every case with its specialization, without compiling (in this process)."""
    out = []
    for case, fn, values, spec, options, backend in jobs():
        case.spec = _specialization(fn, values, spec, backend)[3]
        out.append(case)
    return out


def defined_kernels() -> List[str]:
    """Short names of every ``triton.jit`` kernel (``*_kernel``) in ``crh_kernels.kernels``."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    from .. import kernels

    names = set()
    for mod in pkgutil.iter_modules(kernels.__path__):
        m = importlib.import_module(f"{kernels.__name__}.{mod.name}")
        for name, obj in vars(m).items():
            if name.endswith("_kernel") and isinstance(obj, JITFunction):
                names.add(_short(obj))
    return sorted(names)


def _subprocess(args, timeout: float, triton_path: Optional[str] = None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if triton_path:  # another Triton, installed aside (pip install --target DIR): first on the path
        env["PYTHONPATH"] = os.pathsep.join(x for x in (triton_path, env.get("PYTHONPATH", "")) if x)
    proc = subprocess.run([sys.executable, "-m", "crh_kernels.backends.triton_aot", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"triton_aot {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def list_cases(timeout: float = 600.0, triton_path: Optional[str] = None) -> dict:
    """``{"kernels": [...defined...], "cases": [AotResult without resources, ...], "triton":
    version}`` from a fresh interpreter (no compiling); ``triton_path``: a directory holding
    another Triton (``pip install --target``), put first on its path."""
    got = _subprocess(["--list"], timeout, triton_path)
    return {"kernels": got["kernels"], "cases": [AotResult(**c) for c in got["cases"]],
            "triton": got["triton"]}


def compile_cases(jobs: int = 0, timeout: float = 3600.0, triton_path: Optional[str] = None) -> List[AotResult]:
    """Compile every case in a fresh interpreter with ``jobs`` processes (0: one per CPU)."""
    jobs = jobs or (os.cpu_count() or 1)
    return [AotResult(**r) for r in _subprocess(["--json", f"--jobs={jobs}"], timeout, triton_path)]


# ----------------------------------------------------------------------------- report

def _cell(r: AotResult) -> str:
    cell = str(r.registers)
    if r.stack or r.local:
        cell += f" **S{r.stack}" + (f" L{r.local}" if r.local else "") + "**"
    return cell


def markdown(results: List[AotResult]) -> str:
    """One row per kernel × operands × variant × config: REG per target and layout, spills
    in bold (S = STACK bytes, L = LOCAL bytes), shared memory, matrix instruction."""
    layouts = list(LAYOUTS)
    by = {}
    for r in results:
        row = (r.kernel, r.dtype, r.precision, r.variant, r.config)
        by.setdefault(row, {})[(r.cc, r.layout)] = r
    lines = ["| kernel | operands | variant | config | "
             + " | ".join(f"sm_{cc} {lay}" for cc in CCS for lay in layouts)
             + " | SHARED (B) sm_80 / sm_90 | matrix instr. sm_80 / sm_90 |",
             "| --- " * (6 + len(CCS) * len(layouts)) + "|"]
    rows = list(by.items())
    merged = set()
    for i, ((kernel, dt, prec, variant, config), cells) in enumerate(rows):
        if i in merged:
            continue
        label = dt + (f" ({prec})" if dt == "fp32" and kernel != "row_stats" else "")
        # bf16 and fp16 rows that agree on every number: one row
        twin = next((j for j, ((k2, d2, p2, v2, c2), c) in enumerate(rows)
                     if j > i and (k2, p2, v2, c2) == (kernel, prec, variant, config)
                     and {dt, d2} == {"bf16", "fp16"}
                     and all(_cell(c[key]) == _cell(cells[key]) and c[key].shared == cells[key].shared
                             for key in cells if key in c)), None)
        if twin is not None:
            merged.add(twin)
            label = "bf16, fp16"
        line = [kernel, label, variant or "—", config]
        line += [_cell(cells[(cc, lay)]) if (cc, lay) in cells else "—" for cc in CCS for lay in layouts]
        shared = [sorted({cells[k].shared for k in cells if k[0] == cc}) for cc in CCS]
        line.append(" / ".join("–".join(map(str, (s[0], s[-1])) if len(s) > 1 else map(str, s)) if s else "—"
                               for s in shared))

        def instr(cc):
            rs = [cells[k] for k in cells if k[0] == cc]
            if not rs:  # a config this target's classes never pick
                return "—"
            return ("wgmma" if all(r.wgmma for r in rs) else "mma.sync" if all(r.mma_sync for r in rs)
                    else "—" if not any(r.wgmma or r.mma_sync for r in rs) else "mixed")
        line.append(" / ".join(instr(cc) for cc in CCS))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def summary(results: List[AotResult]) -> str:
    """One line: how many cases, how many spill (per kernel, the largest STACK), registers."""
    spilled = [r for r in results if r.spills]
    regs = [r.registers for r in results]
    per_kernel = ", ".join(f"{k} {sum(r.kernel == k for r in spilled)}" for k in sorted({r.kernel for r in spilled}))
    line = (f"{len(results)} cases ({len({r.same_as or r.id for r in results})} compiled), "
            f"{len(spilled)} spill")
    if spilled:
        line += (f" ({per_kernel}; STACK up to {max(r.stack for r in spilled)} B, "
                 f"LOCAL up to {max(r.local for r in spilled)} B)")
    return line + f"; registers {min(regs)}–{max(regs)}"


def main(argv=None) -> int:  # pragma: no cover - a report for NOTES.md, run as a module
    import argparse

    p = argparse.ArgumentParser(prog="python -m crh_kernels.backends.triton_aot",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="compile every case, print JSON (one line)")
    p.add_argument("--list", action="store_true", help="list every case and kernel as JSON, no compiling")
    p.add_argument("--rows", action="store_true", help="one line per case instead of the markdown table")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    args = p.parse_args(argv)
    # as the launcher runs (bench/gpu_check.sh, tests/conftest.py), and Triton 3.6's default
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
        p.error("unset TRITON_INTERPRET: ahead-of-time compilation needs the GPU launcher")
    if args.list:
        import triton

        print(json.dumps({"kernels": defined_kernels(), "cases": [asdict(c) for c in list_all()],
                          "triton": triton.__version__}))
        return 0
    results = run_all(args.jobs)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
        return 0
    import triton

    if args.rows:  # the spilling cases are the lines with STACK or LOCAL above 0
        for r in results:
            print(f"{r.id:60s} REG {r.registers:3d} STACK {r.stack:4d} LOCAL {r.local:3d} "
                  f"SHARED {r.shared:6d} wgmma={int(r.wgmma)} mma.sync={int(r.mma_sync)}  [{r.spec}]")
    else:
        print(f"triton {triton.__version__}; REG per target and layout "
              f"({', '.join(f'{k} = {n}×{d}' for k, (n, d) in LAYOUTS.items())}); "
              "bold: spills (S = STACK bytes, L = LOCAL bytes)\n")
        print(markdown(results))
    print("\n" + summary(results))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
