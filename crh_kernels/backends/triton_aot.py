"""Ahead-of-time compilation of every Triton kernel for a GPU target, without a GPU.

``compile_kernel(name, dtype, cc, config)`` returns PTX facts and the register/spill report
that ``cuobjdump --dump-resource-usage`` gives for the cubin. ``python -m
crh_kernels.backends.triton_aot`` prints the table recorded in NOTES.md.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..kernels.cross import _cross_scatter_kernel
from ..kernels.row_stats import _row_stats_kernel
from ..kernels.syrk import _scatter_upper_kernel

_PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
_TL = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


@dataclass
class AotResult:
    kernel: str
    dtype: str
    cc: int
    config: str
    registers: int
    local_bytes: int
    shared_bytes: int
    wgmma: bool
    mma_sync: bool


def _mm_spec(kernel, dtype, precision, cfg):
    x = _PTR[dtype]
    common = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_K": cfg["BLOCK_K"], "DOT_DTYPE": _TL[dtype],
              "INPUT_PRECISION": precision, "ROUND_ONLY": False}
    if kernel == "syrk":
        sig = {"x_ptr": x, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "out_ptr": "*fp32",
               "N": "i32", "D": "i32", "stride_xn": "i32", "stride_xd": "i32"}
        return _scatter_upper_kernel, sig, dict(common, USE_ATOMIC=cfg.get("USE_ATOMIC", False))
    sig = {"g_ptr": x, "h_ptr": x, "sg_ptr": "*fp32", "sh_ptr": "*fp32", "kg_ptr": "*fp32",
           "kh_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "DG": "i32", "DH": "i32",
           "stride_gn": "i32", "stride_gd": "i32", "stride_hn": "i32", "stride_hd": "i32"}
    return _cross_scatter_kernel, sig, common


def _rows_spec(dtype, cfg):
    sig = {"x_ptr": _PTR[dtype], "mask_ptr": "*u8", "gate_ptr": "*fp32", "scale_ptr": "*fp32",
           "status_ptr": "*u8", "psum_ptr": "*fp32", "N": "i32", "D": "i32",
           "stride_xn": "i32", "stride_xd": "i32", "stride_m": "i32"}
    const = {"HAS_MASK": True, "HAS_GATE": False, "NORMALIZE": True, "WITH_SUM": True,
             "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"]}
    return _row_stats_kernel, sig, const


def _resource_usage(cubin: bytes):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    fields = {k: int(v) for k, v in re.findall(r"(REG|LOCAL|SHARED):(\d+)", text)}
    return fields.get("REG", -1), fields.get("LOCAL", -1), fields.get("SHARED", 0)


def compile_kernel(kernel: str, dtype: str, cc: int, cfg: dict, precision: str = "ieee") -> AotResult:
    """Compile ``kernel`` ("row_stats", "syrk", "cross") for sm_``cc`` with launch config ``cfg``
    (block sizes plus ``num_warps``/``num_stages``)."""
    if kernel == "row_stats":
        fn, sig, const = _rows_spec(dtype, cfg)
    else:
        fn, sig, const = _mm_spec(kernel, dtype, precision, cfg)
    sig = dict(sig, **{k: "constexpr" for k in const})
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    opts = {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if k in cfg}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
    ptx = compiled.asm["ptx"]
    regs, local, shared = _resource_usage(compiled.asm["cubin"])
    shared = max(shared, int(getattr(compiled.metadata, "shared", 0) or 0))
    label = ",".join(f"{k}={v}" for k, v in cfg.items())
    if kernel != "row_stats" and dtype == "fp32":
        label += f",{precision}"
    return AotResult(kernel, dtype, cc, label, regs, local, shared, "wgmma" in ptx, "mma.sync" in ptx)


def gpu_configs():
    """Every launch config the GPU path can use, per kernel."""
    from . import triton as launch

    mm = {bits: [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in cfgs]
          for bits, cfgs in launch._GPU_MM_CONFIGS.items()}
    rows = [dict(launch._GPU_ROWS)]
    return {"row_stats": {16: rows, 32: rows}, "syrk": mm, "cross": mm}


def compile_many(cases, timeout: float = 1800.0):
    """Compile ``cases`` [(kernel, dtype, cc, cfg, precision), ...] in a fresh interpreter.

    Compilation needs real ``triton.jit`` functions, which ``TRITON_INTERPRET=1`` replaces, so
    the work runs in a subprocess with the variable removed. Returns a list of AotResult.
    """
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "crh_kernels.backends.triton_aot", "--json"],
                          input=json.dumps(cases), capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{proc.stderr[-4000:]}")
    return [AotResult(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _json_main():  # pragma: no cover - runs in the subprocess of compile_many
    import dataclasses
    import json
    import sys

    cases = json.loads(sys.stdin.read())
    out = [dataclasses.asdict(compile_kernel(k, dt, cc, cfg, prec)) for k, dt, cc, cfg, prec in cases]
    print(json.dumps(out))


def main():  # pragma: no cover - a report for NOTES.md
    print(f"triton {triton.__version__}")
    print(f"{'kernel':10s} {'dtype':5s} {'sm':>3s} {'REG':>4s} {'LOCAL':>5s} {'SHARED':>7s} wgmma mma.sync  config")
    for kernel, cfgs in gpu_configs().items():
        for dtype in ("bf16", "fp16", "fp32"):
            precisions = ("tf32", "ieee") if (dtype == "fp32" and kernel != "row_stats") else ("ieee",)
            for precision in precisions:
                for cfg in cfgs[32 if dtype == "fp32" else 16]:
                    for cc in (80, 90):
                        r = compile_kernel(kernel, dtype, cc, cfg, precision)
                        print(f"{r.kernel:10s} {r.dtype:5s} {r.cc:3d} {r.registers:4d} {r.local_bytes:5d} "
                              f"{r.shared_bytes:7d} {str(r.wgmma):5s} {str(r.mma_sync):8s} {r.config}")


if __name__ == "__main__":  # pragma: no cover
    import sys

    _json_main() if "--json" in sys.argv else main()
