"""Measured against planned: each process's peak memory per phase of a real DeepSpeed engine on this CPU.

A U-Net built from a ``UNet2DConditionModel`` config (SD1.x's layout at 160..640 channels, 215 M trained parameters)
is trained for one step by ``deepspeed.initialize`` on 1 and 2 ranks (torchrun, gloo), ZeRO 0/1/2/3, fp32 and bf16,
torch AdamW and DeepSpeed's Adam. Each rank measures four phases: the engine build (``deepspeed.initialize``, the
model already built), the first micro-step's forward + backward, the first optimizer step (``engine.step``) and the
next micro-step's forward + backward. The planner's figure for each phase (``tcscale.memory.static.engine_phase_bytes``
+ the counted activations) is written beside it.

    python benchmarks/memory_engines.py                          # the full matrix (heavy: run under flock)
    python benchmarks/memory_engines.py --ranks 1 --stage 2 --dtype bf16 --optimizer torch_adamw

How it measures (docs/MEMORY.md "Checked against real engines"): torch's CPU allocator reports every allocation and
free to the profiler when ``profile_memory=True``, each event carrying the running total of bytes allocated since the
profiler started ("Total Allocated"). The profiler starts before the model is built, and every thread's allocations
and frees are counted in that total (``_count_every_thread``; torch's default counts the profiled thread's only and
drifts up whenever another thread frees a tensor), so the total is every tensor byte this process holds; a phase's
peak is the largest total among the events inside it. This is the quantity a GPU's allocator must find room for,
which is what the plan predicts. The resident-set peak (``VmHWM``, reset per phase through ``/proc/self/clear_refs``)
is written beside it for reference: it differs by pages never written (an ``torch.empty`` bucket larger than the
model is allocated on a GPU but only partly resident on a CPU) and by the libraries' own memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("build", "backward", "step", "backward2")
STAGES = (0, 1, 2, 3)
DTYPES = ("fp32", "bf16")
OPTIMIZERS = ("torch_adamw", "ds_adam")
# SD1.x's U-Net layout at half its channels: 215 M parameters, large enough that the static terms dominate
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(160, 320, 640, 640),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
LATENT = 8  # 8x8 latents (64 px images): activations stay small beside the static bytes
TOLERANCE = 0.10


def ds_config(stage: int, dtype: str, optimizer: str, world_size: int) -> dict:
    """The DeepSpeed config of one measured engine: the flagship configs' ZeRO and optimizer sections."""
    return {
        "train_batch_size": world_size,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True},
        "bf16": {"enabled": dtype == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": 1e-5,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": 0.01,
                "torch_adam": optimizer == "torch_adamw",
            },
        },  # fmt: skip
    }


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def inputs(dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, LATENT, LATENT), generator=g).to(dtype)
    t = torch.tensor([500])
    text = torch.randn((1, 77, UNET_CONFIG["cross_attention_dim"]), generator=g).to(dtype)
    return x, t, text


# -- one rank (run by torchrun) --------------------------------------------------------------------------------------
def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def _count_every_thread() -> None:
    """Make torch's CPU allocator count the allocations and frees of every thread in its running total.

    By default it counts only on the profiled thread, so a tensor made there and freed on another (a gloo worker's
    completed collective drops its last reference to its tensors there) stays in "Total Allocated" for the rest of
    the run: the total drifts up by every such tensor. With c10's ``caffe2_report_cpu_memory_usage`` flag set the
    total is the process's, whichever thread allocates or frees; the events still come from the profiled thread
    only. c10 exports the flag as a plain ``bool`` symbol, which is what is set here (there is no Python setter)."""
    import ctypes

    import torch

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True


def _phase_peaks(trace: dict, names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """For each marked phase: the running allocated total when it starts, its largest value inside the phase, and
    its value at the phase's end (from the profiler's [memory] events)."""
    marks = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"] if e.get("name") in names}
    mem = sorted(
        (e["ts"], int(e["args"]["Total Allocated"]))
        for e in trace["traceEvents"]
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    )
    out = {}
    for name in names:
        t0, t1 = marks[name]
        before = [v for ts, v in mem if ts < t0]
        inside = [v for ts, v in mem if t0 <= ts <= t1]
        start = before[-1] if before else 0
        end = inside[-1] if inside else start
        out[name] = {"start": start, "peak": max([start, *inside]), "end": end}
    return out


def worker(args) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hwm = {}
    if args.every_thread:
        _count_every_thread()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    prof.start()
    with record_function("phase:model"):
        torch.manual_seed(0)
        unet = build_unet()
        unet.train()
    largest = max(p.numel() for p in unet.parameters())
    import logging

    from tcscale.train.engine import build_engine  # the trainer's deepspeed.initialize (tcscale/train owns DeepSpeed)

    logging.getLogger("DeepSpeed").setLevel("WARNING")
    cfg = ds_config(args.stage, args.dtype, args.optimizer, world)
    _reset_hwm()
    with record_function("phase:build"):
        engine = build_engine(unet, list(unet.parameters()), cfg)
    hwm["build"] = _vm_hwm()
    x, t, text = inputs(dtype)
    _reset_hwm()
    with record_function("phase:backward"):
        loss = engine(x, t, text).sample.float().pow(2).mean()
        engine.backward(loss)
    hwm["backward"] = _vm_hwm()
    del loss
    _reset_hwm()
    with record_function("phase:step"):
        engine.step()
    hwm["step"] = _vm_hwm()
    _reset_hwm()
    with record_function("phase:backward2"):  # the next micro-step: the optimizer states now exist
        loss = engine(x, t, text).sample.float().pow(2).mean()
        engine.backward(loss)
    hwm["backward2"] = _vm_hwm()
    prof.stop()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "trace.json")
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    peaks = _phase_peaks(trace, ("phase:model", *(f"phase:{p}" for p in PHASES)))
    trained = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in unet.parameters())
    record = {
        "rank": rank,
        "world_size": world,
        "stage": args.stage,
        "dtype": args.dtype,
        "optimizer": args.optimizer,
        "basic_optimizer": type(engine.basic_optimizer).__name__,
        "engine_optimizer": type(engine.optimizer).__name__,
        "trained_params": trained,
        "model_bytes": peaks["phase:model"]["end"],
        "largest_param": largest,
        "allocated": {p: peaks[f"phase:{p}"] for p in PHASES},
        "vm_hwm": hwm,
        "every_thread": args.every_thread,  # how the allocator total was counted (_count_every_thread)
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))


# -- the matrix (this process) ---------------------------------------------------------------------------------------
def measure(
    ranks: int, stage: int, dtype: str, optimizer: str, every_thread: bool = True, timeout: float = 900
) -> list[dict]:
    """Launch one engine on `ranks` CPU processes (torchrun, gloo); each rank's record."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            str(Path(__file__).resolve()), "--worker", "--out", out, "--stage", str(stage), "--dtype", dtype,
            "--optimizer", optimizer, *([] if every_thread else ["--profiled-thread-only"]),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"engine run failed ({ranks} ranks, ZeRO-{stage}, {dtype}, {optimizer}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")  # fmt: skip
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def activations(dtype: str) -> tuple[int, int]:
    """(kept, transient) bytes of one micro-step of the measured U-Net, counted on the meta device by the planner's
    saved-tensor counter (the largest single saved tensor gives the backward transient, as the planner does)."""
    import torch

    from tcscale.memory.activations import SavedTensorCounter, flash_sdpa

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    with torch.device("meta"):
        unet = build_unet().to(dt)
    x, t, text = (v.to("meta") for v in inputs(dt))
    counter = SavedTensorCounter(exclude=list(unet.parameters()))
    with flash_sdpa():
        with counter:
            loss = unet(x, t, text).sample.float().pow(2).mean()
        loss.backward()
    return counter.total, 2 * counter.largest


def plan_phases(record: dict, acts: tuple[int, int]) -> dict[str, int]:
    """The planner's bytes per phase for one measured rank (the model's own parameters included, no workspace: a
    CPU process has no CUDA context)."""
    import torch

    from tcscale.memory.static import OptimizerSpec, ZeroSettings, engine_phase_bytes

    cfg = ds_config(record["stage"], record["dtype"], record["optimizer"], record["world_size"])
    phases = engine_phase_bytes(
        record["trained_params"], 0,
        dtype=torch.bfloat16 if record["dtype"] == "bf16" else torch.float32,
        world_size=record["world_size"], zero=ZeroSettings.from_config(cfg),
        optimizer=OptimizerSpec.from_config(cfg, device_type="cpu"), largest_param=record["largest_param"],
        initial_param_bytes=record["model_bytes"], backend="gloo",
    )  # fmt: skip
    kept, transient = acts
    out = {name: phase.total for name, phase in phases.items()}
    for name in ("backward", "backward2"):
        out[name] += kept + transient
    return out


def compare(records: list[dict], acts: dict[str, tuple[int, int]]) -> list[dict]:
    rows = []
    for rec in records:
        plan = plan_phases(rec, acts[rec["dtype"]])
        row = {k: rec[k] for k in ("world_size", "rank", "stage", "dtype", "optimizer", "engine_optimizer",
                                   "basic_optimizer", "trained_params")}  # fmt: skip
        measured_phases = [p for p in PHASES if p in rec["allocated"]]  # the first records had no backward2
        for phase in measured_phases:
            measured = rec["allocated"][phase]["peak"]
            row[f"{phase}_measured"] = measured
            row[f"{phase}_planned"] = plan[phase]
            row[f"{phase}_error"] = round((plan[phase] - measured) / measured, 4)
            row[f"{phase}_vm_hwm"] = rec["vm_hwm"][phase]
        row["within_tolerance"] = all(abs(row[f"{p}_error"]) <= TOLERANCE for p in measured_phases)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    gib = 2**30
    lines = [
        "| ranks | ZeRO | dtype | optimizer | build measured / planned | backward | first step "
        "| next backward | worst error |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["world_size"], r["stage"], r["dtype"], r["optimizer"])):
        if r["rank"] != 0:
            continue
        cells = [f"{r[f'{p}_measured'] / gib:.2f} / {r[f'{p}_planned'] / gib:.2f}" if f"{p}_measured" in r else "—"
                 for p in PHASES]  # fmt: skip
        worst = max((r[f"{p}_error"] for p in PHASES if f"{p}_error" in r), key=abs)
        lines.append(f"| {r['world_size']} | {r['stage']} | {r['dtype']} | {r['optimizer']} | "
                     + " | ".join(cells) + f" | {worst:+.1%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory_engines.json"))
    parser.add_argument("--ranks", type=int, action="append", choices=(1, 2), default=None)
    parser.add_argument("--stage", type=int, action="append", choices=STAGES, default=None)
    parser.add_argument("--dtype", action="append", choices=DTYPES, default=None)
    parser.add_argument("--optimizer", action="append", choices=OPTIMIZERS, default=None)
    parser.add_argument(
        "--raw",
        default=str(REPO / "benchmarks" / "results" / "memory_engines_raw.json"),
        help="the engines' records (kept as measured; a rerun measures only what is missing)",
    )
    parser.add_argument(
        "--profiled-thread-only", dest="every_thread", action="store_false",
        help="count only the profiled thread's allocations and frees (torch's default; drifts up under ZeRO-3/gloo)",
    )  # fmt: skip
    parser.add_argument("--remeasure", action="store_true", help="measure again what --raw holds")
    parser.add_argument("--measure-only", action="store_true", help="keep the records, plan nothing")
    parser.add_argument("--plan-only", action="store_true", help="plan the records --raw holds, measure nothing")
    args = parser.parse_args(argv)
    if args.worker:
        args.stage, args.dtype, args.optimizer = args.stage[0], args.dtype[0], args.optimizer[0]
        worker(args)
        return 0
    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()
    # the flagship configs' optimizer and dtype first, each on 1 and 2 ranks
    combos = [(r, st, d, o) for o, d, st, r in itertools.product(args.optimizer or OPTIMIZERS,
              args.dtype or DTYPES[::-1], args.stage or STAGES, args.ranks or (1, 2))]  # fmt: skip
    # each engine's records are kept as they come: a long matrix resumes where it stopped, a rerun only re-plans
    raw_path = Path(args.raw)
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {}
    for ranks, stage, dtype, opt in combos:
        key = f"{ranks}-{stage}-{dtype}-{opt}"
        if (key in raw and not args.remeasure) or args.plan_only:
            continue
        t0 = time.perf_counter()
        raw[key] = measure(ranks, stage, dtype, opt, args.every_thread)
        raw_path.with_suffix(".tmp").write_text(json.dumps(raw, indent=1) + "\n")
        raw_path.with_suffix(".tmp").replace(raw_path)
        print(f"measured {key} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if args.measure_only:
        return 0
    records = [rec for r, st, d, o in combos for rec in raw.get(f"{r}-{st}-{d}-{o}", [])]
    acts = {d: activations(d) for d in {c[2] for c in combos}}
    rows = compare(records, acts)
    from importlib.metadata import version

    meta = {
        "kind": "real DeepSpeed engines on this CPU: torch CPU allocator peaks per phase against the planner",
        "counting": sorted({"every thread" if r.get("every_thread") else "the profiled thread only" for r in records}),
        "unet": UNET_CONFIG,
        "latent": LATENT,
        "tolerance": TOLERANCE,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": version("deepspeed"),
            "diffusers": diffusers.__version__,
        },  # fmt: skip
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(args.out)
    print(markdown(rows))
    return 0 if all(r["within_tolerance"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
