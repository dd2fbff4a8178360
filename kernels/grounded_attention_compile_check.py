"""Compile the grounded attention kernels for a CUDA target without a GPU (Triton AOT + the bundled ptxas).

Catches GPU-only compile errors on CPU machines (the interpreter accepts code the GPU compiler refuses, e.g. a
plain global read inside a kernel) and reports shared memory, registers and spills of the launcher's default
block sizes, so a configuration that would not fit an H100 (227 KiB shared memory per block) shows up before a GPU
run. It says nothing about speed.

    TRITON_INTERPRET=0 python -m kernels.grounded_attention_compile_check --dtype bf16 --head-dims 40,64,80,160
"""

from __future__ import annotations

import argparse
import json
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


def _arg_specialization(value) -> tuple[str, object]:
    """(type, key) of one launch argument as Triton's JIT specialises it: ints equal to 1 become constexprs, ints
    divisible by 16 carry a divisibility hint ("D"); a pointer is 16-byte aligned unless its view offset says not."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    if isinstance(value, torch.Tensor):
        aligned = (value.storage_offset() * value.element_size()) % 16 == 0
        return "*" + TRITON_TYPES.get(value.dtype, {torch.int64: "i64", torch.int32: "i32"}.get(value.dtype)), (
            "D" if aligned else ""
        )
    return native_specialize_impl(BaseBackend, value, False, True, True)


def _compile(launch: ga._Launch, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    constexprs, signature, attrs = dict(launch.constexprs), {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, launch.args)):
        kind, key = _arg_specialization(value)
        if kind == "constexpr":
            constexprs[name] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
        signature[name] = kind
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def planned_launches(
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 40,
    lk: int = 77,
    phrases: int = 8,
    *,
    batch: int = 8,
    heads: int = 8,
    lq: int = 4096,
    layout: str = "diffusers",
    config: ga.KernelConfig | None = None,
    token_loss_heads: str = "mean_map",
) -> list[ga._Launch]:
    """The launches of one forward + backward exactly as the launchers plan them on an H100 (meta tensors: no data,
    no device). ``layout="diffusers"``: q and dO are (B, H, Lq, d) views of (B, Lq, H·d) tensors, as the grounding
    processor passes them; ``"contiguous"``: (B, H, Lq, d) tensors, as the benchmark makes them."""
    meta = dict(device="meta", dtype=dtype)
    if layout == "diffusers":
        q = torch.empty(batch, lq, heads, head_dim, **meta).transpose(1, 2)
    elif layout == "contiguous":
        q = torch.empty(batch, heads, lq, head_dim, **meta)
    else:
        raise ValueError(f"layout must be 'diffusers' or 'contiguous', got {layout!r}")
    k = torch.empty(batch, heads, lk, head_dim, **meta)
    v = torch.empty_like(k)
    masks = torch.empty(batch, phrases, lq, device="meta", dtype=torch.float32)
    token_phrase = torch.empty(batch, lk, device="meta", dtype=torch.int64)
    launches: list[ga._Launch] = []
    out, token_loss, pixel_loss, saved = ga.grounded_attention_forward(
        q,
        k,
        v,
        masks,
        token_phrase,
        config=config,
        validate_values=False,
        token_loss_heads=token_loss_heads,
        launch=launches.append,
    )
    grad_out = torch.empty_like(q)  # the gradient of a diffusers view arrives with the view's strides
    grad_token, grad_pixel = torch.empty_like(token_loss), torch.empty_like(pixel_loss)
    ga.grounded_attention_backward(grad_out, grad_token, grad_pixel, q, k, v, saved, config, launch=launches.append)
    return launches


def compile_kernels(
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 40,
    lk: int = 77,
    phrases: int = 8,
    arch: int = 90,
    *,
    lq: int = 4096,
    heads: int = 8,
    layout: str = "diffusers",
    config: ga.KernelConfig | None = None,
    token_loss_heads: str = "mean_map",
) -> list[dict]:
    """Compile the forward, finalize, batch-mean and backward launches the launchers plan; one report each."""
    if ga.interpreter_enabled():
        raise RuntimeError("unset TRITON_INTERPRET: the kernels must be decorated for the GPU compiler")
    reports = []
    launches = planned_launches(
        dtype,
        head_dim,
        lk,
        phrases,
        heads=heads,
        lq=lq,
        layout=layout,
        config=config,
        token_loss_heads=token_loss_heads,
    )
    names = {"_grounded_attention_fwd_kernel": "forward", "_grounding_finalize_kernel": "finalize",
             "_grounding_batch_mean_kernel": "batch_mean", "_grounded_attention_bwd_kernel": "backward"}  # fmt: skip
    for launch in launches:
        compiled = _compile(launch, arch)
        report = dict(
            kernel=names[launch.kernel.__name__], dtype=TRITON_TYPES[dtype], head_dim=head_dim, lk=lk, layout=layout,
            token_loss_heads=token_loss_heads, shared_bytes=compiled.metadata.shared,
        )  # fmt: skip
        report.update(_ptxas_report(compiled.asm["ptx"], arch))
        report.update(_sass_counts(compiled.asm.get("cubin")))
        reports.append(report)
    return reports


def _sass_counts(cubin: bytes | None) -> dict[str, int]:
    """Counts of the instructions that say whether the code is on the intended path: tensor-core MMAs (HMMA/HGMMA),
    16-byte global loads/stores (vectorised), 2-byte ones (scalar), local-memory traffic (spills), fp64 arithmetic."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(cuobjdump):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M)
    groups = {
        "mma": r"^(HMMA|HGMMA)",
        "ldg128": r"^(LDG|LDGSTS)\.E.*\.128$",
        "stg128": r"^STG\.E.*\.128$",
        "ldst_16bit": r"^(LDG|STG)\.E\.U16$",
        "local": r"^(LDL|STL)",
        "fp64": r"^(D(ADD|MUL|FMA)|MUFU\.\w+64H)",
    }
    return {f"sass_{name}": sum(1 for op in ops if re.match(pat, op)) for name, pat in groups.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(TORCH_DTYPES))
    parser.add_argument("--head-dims", default="40,64,80,160")
    parser.add_argument("--lk", type=int, default=77)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--layout", default="diffusers", choices=("diffusers", "contiguous"))
    parser.add_argument("--token-loss-heads", default="mean_map", choices=ga.TOKEN_LOSS_HEADS)
    args = parser.parse_args(argv)
    too_big = []
    for head_dim in map(int, args.head_dims.split(",")):
        reports = compile_kernels(
            TORCH_DTYPES[args.dtype], head_dim, args.lk, arch=args.arch, layout=args.layout,
            token_loss_heads=args.token_loss_heads,
        )  # fmt: skip
        for report in reports:
            print(json.dumps(report), flush=True)
            if report["shared_bytes"] > H100_SHARED_BYTES:
                too_big.append(report)
    if too_big:
        print(f"shared memory above {H100_SHARED_BYTES} bytes: {too_big}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
