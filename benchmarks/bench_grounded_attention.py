"""Benchmark: fused cross-attention + grounding losses vs materialised reference vs SDPA (docs/DESIGN.md §7).

Providers, side by side on every grounded cross-attention layer shape:
  reference  explicit softmax probabilities + ``tcscale.losses.grounding_losses`` (what a PyTorch trainer does)
  sdpa       ``F.scaled_dot_product_attention`` with no loss at all: the floor
  fused      ``kernels.cross_attention_with_grounding``
Modes: forward, backward (backward alone, graph retained), full (forward + backward). Time: median and 20/80 %
quantiles of ``triton.testing.do_bench``; memory: peak extra allocation of one forward + backward.

Timers (``--timer``): ``eager`` (default) is what a training step sees when the CPU cannot run ahead — every launch
and the Python around it, L2 flushed between calls; ``graph`` captures many calls in one CUDA graph
(``triton.testing.do_bench_cudagraph``: launch overhead gone, no L2 flush) and times forward and full only (a
backward alone would replay a forward graph built outside the capture). The two together separate GPU time from
host overhead on the small layers.

Rows are appended to benchmarks/results/grounded_attention.csv with the GPU name, torch/triton versions and date;
a plot (grounded_attention_<gpu>.png) and a summary of the ratios against the docs/DESIGN.md §7 targets
(grounded_attention_summary_<gpu>.md: fused full ≤ 1.15× sdpa, ≥ 3× faster than reference) are written beside it.

    python benchmarks/bench_grounded_attention.py                 # every shape, bf16, B=8, all providers/modes
    python benchmarks/bench_grounded_attention.py --timer graph --modes forward,full   # GPU time without launches
    python benchmarks/bench_grounded_attention.py --smoke         # CPU: tiny shapes in the Triton interpreter

Without CUDA the script refuses to run, except with --smoke, which only proves that the script executes
(wall-clock timer, results written to a temporary directory).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench_grounded_attention.py` from anywhere finds kernels/, tcscale/
    sys.path.insert(0, str(REPO))
RESULTS_DIR = REPO / "benchmarks" / "results"
PROVIDERS = ("reference", "sdpa", "fused")
OPTIONAL_PROVIDERS = ("xformers",)  # no-loss floor like sdpa; skipped with a message where it cannot run


def xformers_unavailable() -> str | None:
    """Why the xformers provider cannot run here (None when it can)."""
    from tcscale.config import xformers_missing

    return xformers_missing()


MODES = ("forward", "backward", "full")
LAMBDA_TOKEN, GAMMA_PIXEL = 1e-3, 5e-5  # docs/DESIGN.md §3 loss weights: the upstream gradients of the two losses
TARGET_VS_SDPA, TARGET_VS_REFERENCE = 1.15, 3.0  # docs/DESIGN.md §7
# Ceilings measured on this workplace's H100 (device KINDS.md, 2026-11-13): device-to-device copy ≈ 3.0 TB/s (bytes
# read + written), 8192³ bf16 matmul ≈ 798 TFLOP/s. Used only to turn the floors below into times.
H100_BYTES_PER_S, H100_BF16_FLOP_PER_S = 3.0e12, 798e12


@dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    heads: int
    lq: int
    head_dim: int
    lk: int = 77

    @property
    def name(self) -> str:
        return f"{self.model}:{self.layer} H{self.heads} Lq{self.lq} d{self.head_dim}"


# Every grounded (mid + up block) cross-attention layer, deduplicated by (H, Lq, d).
SD14_512 = [  # SD1.4 at 512 px: 8 heads, d = channels / 8
    Shape("sd14", "mid 8x8", 8, 64, 160),
    Shape("sd14", "up 16x16 (x3)", 8, 256, 160),
    Shape("sd14", "up 32x32 (x3)", 8, 1024, 80),
    Shape("sd14", "up 64x64 (x3)", 8, 4096, 40),
]
SD21_768 = [  # SD2.1 at 768 px: d = 64, heads = channels / 64
    Shape("sd21", "mid 12x12", 20, 144, 64),
    Shape("sd21", "up 24x24", 20, 576, 64),
    Shape("sd21", "up 48x48", 10, 2304, 64),
    Shape("sd21", "up 96x96", 5, 9216, 64),
]
SMOKE_SHAPES = [Shape("smoke", "tiny", 2, 37, 40), Shape("smoke", "tiny-d80", 2, 20, 80, lk=20)]


def floors(shape: Shape, batch: int, phrases: int, elem_bytes: int = 2) -> dict[str, float]:
    """The least work one fused forward + backward must do (METHOD.md's two numbers), unpadded:
    bytes — forward reads q, writes out, LSE and the phrase maps, reads the masks; backward reads q, dO, LSE, masks,
    phrase maps and writes dQ; k, v, dK, dV (B·H·Lk·d each) once; flops — QKᵀ and PV forward, QKᵀ (recompute),
    dO Vᵀ, dS K, dSᵀ Q, Pᵀ dO backward: 14·B·H·Lq·Lk·d."""
    bhld = batch * shape.heads * shape.lq * shape.head_dim
    rows = batch * shape.heads * shape.lq * 4  # fp32 LSE
    maps = batch * phrases * shape.lq * 4  # fp32 masks or phrase maps
    kv = 4 * batch * shape.heads * shape.lk * shape.head_dim * elem_bytes
    fwd_bytes = 2 * bhld * elem_bytes + rows + 2 * maps
    bwd_bytes = 3 * bhld * elem_bytes + rows + 2 * maps
    flops = 14 * batch * shape.heads * shape.lq * shape.lk * shape.head_dim
    total = fwd_bytes + bwd_bytes + kv
    return {
        "bytes": total,
        "flops": flops,
        "us_bytes": 1e6 * total / H100_BYTES_PER_S,
        "us_flops": 1e6 * flops / H100_BF16_FLOP_PER_S,
    }


def make_inputs(shape: Shape, batch: int, phrases: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Random q/k/v, binary masks and phrases of 1-3 tokens in every sample (like a grounded COCO batch)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, shape.heads, shape.lq, shape.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, shape.heads, shape.lk, shape.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, shape.heads, shape.lk, shape.head_dim, generator=gen).to(device, dtype)
    phrase_masks = (torch.rand(batch, phrases, shape.lq, generator=gen) > 0.7).float().to(device)
    token_phrase = torch.full((batch, shape.lk), -1, dtype=torch.int64)
    for b in range(batch):
        pos = 1
        for p in range(phrases):
            for _ in range(1 + (p + b) % 3):
                if pos < shape.lk:
                    token_phrase[b, pos] = p
                pos += 2
    return q, k, v, phrase_masks, token_phrase.to(device)


def parse_variant(provider: str):
    """``fused[block_d=64,num_warps=4]`` → KernelConfig(block_d=64, num_warps=4); ``fused`` → None (defaults)."""
    from kernels import KernelConfig

    if provider == "fused":
        return None
    if not (provider.startswith("fused[") and provider.endswith("]")):
        raise ValueError(f"unknown provider {provider!r}, expected one of {PROVIDERS} or fused[key=value,...]")
    fields = {}
    for item in filter(None, provider[len("fused[") : -1].split(",")):
        key, _, value = item.partition("=")
        if key not in KernelConfig.__dataclass_fields__ or not value.isdigit():
            raise ValueError(f"{provider!r}: {item!r} is not a KernelConfig field=integer")
        fields[key] = int(value)
    return KernelConfig(**fields)


def make_provider(provider: str, inputs) -> Callable[[], list[torch.Tensor]]:
    """A closure running one forward and returning the outputs that backward differentiates."""
    from kernels import cross_attention_with_grounding
    from tcscale.attention.reference import cross_attention_with_grounding_reference

    q, k, v, phrase_masks, token_phrase = inputs
    if provider == "sdpa":
        return lambda: [F.scaled_dot_product_attention(q, k, v)]
    if provider == "xformers":  # memory_efficient_attention takes (B, L, H, d)
        import xformers.ops as xops

        return lambda: [xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))]
    # validate_values=False: the trainer validates token_phrase once per batch, not once per layer (no host sync)
    if provider == "reference":
        return lambda: list(
            cross_attention_with_grounding_reference(q, k, v, phrase_masks, token_phrase, validate_values=False)
        )
    config = parse_variant(provider)  # "fused" or a "fused[...]" block-size variant (tuning on the GPU)
    return lambda: list(
        cross_attention_with_grounding(q, k, v, phrase_masks, token_phrase, config=config, validate_values=False)
    )


def upstream_grads(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = [torch.randn_like(outputs[0])]
    if len(outputs) == 3:  # λ, γ of docs/DESIGN.md §3 on the two losses
        grads += [torch.full_like(outputs[1], LAMBDA_TOKEN), torch.full_like(outputs[2], GAMMA_PIXEL)]
    return grads


def wallclock_bench(fn: Callable[[], object], reps: int = 3) -> tuple[float, float, float]:
    """CPU smoke timer: median, 20 %, 80 % of a few wall-clock runs in ms."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q20 = times[int(0.2 * (len(times) - 1))]
    q80 = times[math.ceil(0.8 * (len(times) - 1))]
    return statistics.median(times), q20, q80


def gpu_bench(fn: Callable[[], object], inputs_with_grad: list[torch.Tensor], timer: str) -> tuple[float, float, float]:
    import triton.testing

    if timer == "graph":
        median, p20, p80 = triton.testing.do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8])
    else:
        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=inputs_with_grad)
    return median, p20, p80


def measure(provider: str, mode: str, inputs, smoke: bool, timer: str = "eager") -> tuple[float, float, float]:
    q, k, v = inputs[:3]
    forward = make_provider(provider, inputs)
    outputs = forward()
    grads = upstream_grads(outputs)
    if mode == "forward":

        def fn():
            with torch.no_grad():
                forward()

    elif mode == "backward":
        if timer == "graph":
            raise ValueError("--timer graph times forward and full only (see the module docstring)")

        def fn():
            torch.autograd.backward(outputs, grads, retain_graph=True)

    elif timer == "graph":

        def fn():  # gradients returned, not accumulated into .grad: every replay does the same work
            torch.autograd.grad(forward(), [q, k, v], grads)

    else:

        def fn():
            torch.autograd.backward(forward(), grads)

    if smoke:
        return wallclock_bench(fn)
    return gpu_bench(fn, [q, k, v], timer)


def peak_extra_mib(provider: str, inputs) -> float:
    """Peak memory above the inputs during one forward + backward (GPU only)."""
    forward = make_provider(provider, inputs)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outputs = forward()
    torch.autograd.backward(outputs, upstream_grads(outputs))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in inputs[:3]:
        t.grad = None
    return peak / 2**20


def environment_info(smoke: bool) -> dict[str, str]:
    import triton

    gpu = "cpu-interpreter" if smoke else torch.cuda.get_device_name()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
    }


FIELDS = (
    "date gpu torch triton cuda timer dtype model layer batch heads lq lk head_dim phrases provider mode "
    "ms_median ms_p20 ms_p80 peak_mib"
).split()


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def summarize(rows: list[dict], env: dict[str, str], dtype: str, smoke: bool = False, timer: str = "eager") -> str:
    """Markdown table of full-mode ratios against the docs/DESIGN.md §7 targets."""
    full = {(r["model"], r["layer"], r["provider"]): r for r in rows if r["mode"] == "full"}
    lines = [
        f"# Fused grounded attention vs the §7 targets — {env['gpu']}, {dtype}, {timer} timer, {env['date']}",
        *(["SMOKE RUN: CPU interpreter, timings mean nothing (the script ran end to end)."] if smoke else []),
        f"torch {env['torch']}, triton {env['triton']}; full = forward + backward; median ms (peak extra MiB)",
        "",
        "| layer | H | Lq | d | sdpa | reference | fused | fused/sdpa (≤ 1.15) | reference/fused (≥ 3) "
        "| floor ms | fused/floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    layers = sorted({(r["model"], r["layer"], r["heads"], r["lq"], r["head_dim"]) for r in rows}, key=str)
    all_ok = bool(layers)  # nothing measured is not "targets met"
    for model, layer, heads, lq, head_dim in layers:
        cells, ms = [], {}
        for provider in ("sdpa", "reference", "fused"):
            row = full.get((model, layer, provider))
            ms[provider] = float(row["ms_median"]) if row else float("nan")
            mib = row["peak_mib"] if row else ""
            cells.append(f"{ms[provider]:.3f} ({mib})" if row else "-")
        vs_sdpa = ms["fused"] / ms["sdpa"]
        vs_ref = ms["reference"] / ms["fused"]
        ok_sdpa, ok_ref = vs_sdpa <= TARGET_VS_SDPA, vs_ref >= TARGET_VS_REFERENCE
        all_ok &= ok_sdpa and ok_ref
        mark = lambda ok: "ok" if ok else "MISS"
        any_row = next(r for r in rows if (r["model"], r["layer"]) == (model, layer))
        shape = Shape(model, layer, int(heads), int(lq), int(head_dim), int(any_row["lk"]))
        floor = floors(shape, int(any_row["batch"]), int(any_row["phrases"]))
        floor_ms = max(floor["us_bytes"], floor["us_flops"]) / 1e3
        lines.append(
            f"| {model} {layer} | {heads} | {lq} | {head_dim} | {' | '.join(cells)} | "
            f"{vs_sdpa:.2f} {mark(ok_sdpa)} | {vs_ref:.2f} {mark(ok_ref)} | "
            f"{floor_ms:.4f} | {ms['fused'] / floor_ms:.1f} |"
        )
    lines += [
        "",
        f"All targets met: {'yes' if all_ok else 'no'}",
        "floor = max(bytes / 3.0 TB/s, flops / 798 TFLOP/s): the least a fused forward + backward can take on this "
        "workplace's H100 (bench_grounded_attention.floors)",
    ]
    variants = sorted({r["provider"] for r in rows if r["provider"].startswith("fused[")})
    if variants:  # block-size variants against the default blocks, full mode
        lines += ["", "| layer | fused (default) | " + " | ".join(variants) + " |", "|---" * (len(variants) + 2) + "|"]
        for model, layer, *_ in layers:
            base = full.get((model, layer, "fused"))
            cells = []
            for name in variants:
                row = full.get((model, layer, name))
                if row is None:
                    cells.append("-")
                    continue
                ratio = f" (x{float(row['ms_median']) / float(base['ms_median']):.2f})" if base else ""
                cells.append(f"{float(row['ms_median']):.3f}{ratio}")
            lines.append(f"| {model} {layer} | {base['ms_median'] if base else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({(r["model"], r["layer"]) for r in rows}, key=str)
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 0.6 * len(layers) + 2.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = []
            for model, layer in layers:
                match = [
                    r
                    for r in rows
                    if (r["model"], r["layer"], r["provider"], r["mode"]) == (model, layer, provider, mode)
                ]
                values.append(float(match[0]["ms_median"]) if match else float("nan"))
            ax.barh([y + i * width for y in range(len(layers))], values, height=width, label=provider)
        ax.set_yticks([y + 0.4 - width / 2 for y in range(len(layers))])
        ax.set_yticklabels([f"{m} {layer}" for m, layer in layers], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("ms (median, log scale)")
        ax.set_title(mode)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in the Triton interpreter")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--phrases", type=int, default=8, help="phrases per sample (1-3 tokens each)")
    parser.add_argument("--models", default="sd14,sd21", help="comma list of sd14, sd21")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="also fused[block_d=64,...] variants")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--timer", default="eager", choices=("eager", "graph"), help="see the module docstring")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the CSV, plot and summary go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before kernels are imported (decoration time)
        args.batch, args.phrases = 2, 3
        args.dtype = "fp32" if args.dtype == "bf16" else args.dtype  # no bf16 dot in the interpreter
        if args.out_dir == RESULTS_DIR:  # smoke timings never go into the committed results
            args.out_dir = Path(tempfile.mkdtemp(prefix="bench_grounded_attention_smoke_"))
        shapes = SMOKE_SHAPES
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        if not torch.cuda.is_available():
            print(
                "bench_grounded_attention.py needs a CUDA GPU (timings on the CPU interpreter mean nothing); "
                "run with --smoke to check that the script executes on CPU.",
                file=sys.stderr,
            )
            return 2
        models = {"sd14": SD14_512, "sd21": SD21_768}
        shapes = [s for m in args.models.split(",") for s in models[m]]
        device = "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    providers = re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args.providers)  # commas inside fused[...] stay
    for provider in list(providers):
        if provider in OPTIONAL_PROVIDERS:
            reason = xformers_unavailable()
            if reason:
                print(f"provider {provider} skipped: it needs {reason}", file=sys.stderr)
                providers.remove(provider)
        elif provider not in PROVIDERS:
            parse_variant(provider)  # a bad variant fails before any timing
    modes = args.modes.split(",")
    if args.timer == "graph" and "backward" in modes and not args.smoke:
        modes.remove("backward")
        print("--timer graph: backward alone is not timed (forward and full are)", file=sys.stderr)
    env = environment_info(args.smoke)
    started = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.out_dir / "grounded_attention.csv"

    rows, failures = [], []
    for shape in shapes:
        shape_rows = []
        inputs = make_inputs(shape, args.batch, args.phrases, dtype, device)
        for t in inputs[:3]:
            t.requires_grad_(True)
        for provider in providers:
            try:
                mib = float("nan") if args.smoke else peak_extra_mib(provider, inputs)
                for mode in modes:
                    median, p20, p80 = measure(provider, mode, inputs, args.smoke, args.timer)
                    shape_rows.append(
                        dict(
                            env, timer=args.timer, dtype=args.dtype, model=shape.model, layer=shape.layer,
                            batch=args.batch, heads=shape.heads, lq=shape.lq, lk=shape.lk, head_dim=shape.head_dim,
                            phrases=args.phrases, provider=provider, mode=mode, ms_median=f"{median:.4f}",
                            ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}", peak_mib=f"{mib:.1f}",
                        )
                    )  # fmt: skip
                    print(f"{shape.name:42s} {provider:9s} {mode:8s} {median:9.3f} ms  [{p20:.3f}, {p80:.3f}]  "
                          f"peak {mib:.1f} MiB", flush=True)  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                print(f"{shape.name:42s} {provider:9s} out of memory", flush=True)
                torch.cuda.empty_cache()
            except Exception as exc:  # one failing provider must not cost the rest of a scarce GPU session
                failures.append(f"{shape.name} {provider}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                print(f"{shape.name:42s} {provider:9s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            finally:
                for t in inputs[:3]:
                    t.grad = None
        append_rows(csv_path, shape_rows)  # per shape: a run killed at its time limit keeps what it measured
        rows += shape_rows

    gpu_tag = "".join(c if c.isalnum() else "_" for c in env["gpu"]).strip("_")
    summary = summarize(rows, env, args.dtype, smoke=args.smoke, timer=args.timer)
    tag = f"{gpu_tag}_{args.dtype}_{args.timer}"
    (args.out_dir / f"grounded_attention_summary_{tag}.md").write_text(summary)
    title = f"grounded attention, {env['gpu']}, {args.dtype}, {args.timer} timer"
    if rows:
        plot(rows, args.out_dir / f"grounded_attention_{tag}.png", title)
    print()
    print(summary)
    print(f"wrote {csv_path}, plot and summary in {args.out_dir} ({time.perf_counter() - started:.1f} s)")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
