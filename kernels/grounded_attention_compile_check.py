"""Compile the grounded attention kernels for a CUDA target without a GPU (Triton AOT + the bundled ptxas).

Catches GPU-only compile errors on CPU machines (the interpreter accepts code the GPU compiler refuses, e.g. a
plain global read inside a kernel) and reports shared memory, registers and spills of the launcher's default
block sizes, so a configuration that would not fit an H100 (227 KiB shared memory per block) shows up before a GPU
run. It says nothing about speed.

    TRITON_INTERPRET=0 python -m kernels.grounded_attention_compile_check --dtype bf16 --head-dims 40,64,80,160
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

import kernels.grounded_attention as ga

H100_SHARED_BYTES = 232448  # 227 KiB opt-in shared memory per block on sm_90
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
TORCH_DTYPES = {name: dtype for dtype, name in TRITON_TYPES.items()}


def _ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [ptxas, f"-arch=sm_{arch}a", "-v", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    text = " ".join(run.stderr.split())
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_store_bytes": int(spills.group(1)) if spills else -1,
    }


def _compile(fn, pointer_types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    for name in fn.arg_names:  # the JIT specialises unit strides; the head-dim strides are 1 in practice
        if name.startswith("stride_") and name.endswith("d"):
            constexprs[name] = 1
    floats = ("scale", "scale_log2e", "inv_H")
    signature = {
        n: "constexpr" if n in constexprs else pointer_types.get(n, "fp32" if n in floats else "i32")
        for n in fn.arg_names
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if signature[n].startswith("*")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_kernels(
    dtype: torch.dtype = torch.bfloat16, head_dim: int = 40, lk: int = 77, phrases: int = 8, arch: int = 90
) -> list[dict]:
    """Compile forward, finalize, batch-mean and backward kernels with the default blocks; one report per kernel."""
    if ga.interpreter_enabled():
        raise RuntimeError("unset TRITON_INTERPRET: the kernels must be decorated for the GPU compiler")
    q = torch.empty(8, 8, 1024, head_dim, dtype=dtype, device="meta")
    blocks = ga._pick_blocks(q, lk, phrases, ga.KernelConfig())
    t, f32 = TRITON_TYPES[dtype], "*fp32"
    precision = "ieee" if dtype == torch.float32 else "tf32"
    num_dk = triton.cdiv(head_dim, blocks.block_d)
    common = dict(D=head_dim, BLOCK_N=blocks.BLOCK_N, BLOCK_DK=blocks.block_d, NUM_DK=num_dk, BLOCK_P=blocks.BLOCK_P)
    specs = [
        (
            "forward",
            ga._grounded_attention_fwd_kernel,
            dict(Q=f"*{t}", K=f"*{t}", V=f"*{t}", Out=f"*{t}", LSE=f32, Masks=f32, TokPhrase="*i64", PhraseMaps=f32,
                 PartA=f32, PartS=f32, PartBCE=f32),
            dict(common, BLOCK_M=blocks.block_m_fwd, HAS_PHRASES=True, DOT_PRECISION=precision),
            blocks.num_warps, blocks.num_stages,
        ),
        (
            "finalize",
            ga._grounding_finalize_kernel,
            dict(PartA=f32, PartS=f32, PartBCE=f32, TokPhrase="*i64", Ratio=f32, TokCoef=f32, PixCoef=f32,
                 SampleStats=f32),
            dict(BLOCK_N=blocks.BLOCK_N, BLOCK_P=blocks.BLOCK_P, BLOCK_MB=16),
            4, 1,
        ),
        (
            "batch_mean",
            ga._grounding_batch_mean_kernel,
            dict(SampleStats=f32, TokenLoss=f32, PixelLoss=f32, InvBatch=f32),
            dict(BLOCK_B=8),
            1, 1,
        ),
        (
            "backward",
            ga._grounded_attention_bwd_kernel,
            dict(Q=f"*{t}", K=f"*{t}", V=f"*{t}", dOut=f"*{t}", LSE=f32, Masks=f32, TokPhrase="*i64", PhraseMaps=f32,
                 Ratio=f32, TokCoef=f32, PixCoef=f32, InvBatch=f32, GradToken=f32, GradPixel=f32, dQ=f"*{t}",
                 dK=f32, dV=f32),
            dict(common, BLOCK_M=blocks.block_m_bwd, HAS_PHRASES=True, DOT_PRECISION=precision,
                 LOSS_DOT_PRECISION=precision),
            blocks.num_warps, blocks.num_stages,
        ),
    ]  # fmt: skip
    reports = []
    for name, fn, pointer_types, constexprs, num_warps, num_stages in specs:
        compiled = _compile(fn, pointer_types, constexprs, num_warps, num_stages, arch)
        report = dict(kernel=name, dtype=t, head_dim=head_dim, lk=lk, shared_bytes=compiled.metadata.shared)
        report.update(_ptxas_report(compiled.asm["ptx"], arch))
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(TORCH_DTYPES))
    parser.add_argument("--head-dims", default="40,64,80,160")
    parser.add_argument("--lk", type=int, default=77)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    too_big = []
    for head_dim in map(int, args.head_dims.split(",")):
        for report in compile_kernels(TORCH_DTYPES[args.dtype], head_dim, args.lk, arch=args.arch):
            print(report, flush=True)
            if report["shared_bytes"] > H100_SHARED_BYTES:
                too_big.append(report)
    if too_big:
        print(f"shared memory above {H100_SHARED_BYTES} bytes: {too_big}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
