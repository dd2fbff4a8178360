"""Training-step time with cached latents (`data.latents: cached`) against encoding the images each step.

Three measurements, in one process, side by side:

1. trainer (SD1.4): `configs/sd14_tokencompose.yaml` at the released SD1.4 shapes with random weights (saved as a
   pipeline directory), LoRA rank 8, fp32 on CPU, batch 1, reduced resolution. Synthetic shards are written, the
   latent cache stage (`dataprep/stages/latents.py`) adds the latents, then the real `Trainer` runs `--steps`
   optimizer steps (after one warm-up step) from the plain shards and from the cached ones.
2. objective (SD1.4 and, with `--sdxl`, SDXL): the TokenCompose objective's micro-step (forward, losses, backward of
   a LoRA-adapted U-Net; no optimizer, no DeepSpeed) on one image batch and on the same batch's cached posterior,
   alternated `--reps` times.
3. planned for a GPU from FLOP counts (torch.utils.flop_counter on the meta device, at the native resolution and at
   the run's): VAE encoder forward, text encoder(s) forward, U-Net forward + backward (LoRA: activation gradients
   only; full: every weight's too). Planned ratio = (text + U-Net) / (VAE + text + U-Net), i.e. assuming each part
   runs at the same achieved FLOP/s; the GPU's real ratio is "not measured" here.

    OMP_NUM_THREADS=2 python benchmarks/bench_latent_cache.py --resolution 256 --steps 3 --reps 3 [--sdxl]

Writes benchmarks/results/latent_cache_cpu.json (device, versions, date, every timing).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = Path(__file__).resolve().parent / "results" / "latent_cache_cpu.json"


def flop_plan(arch: str, resolution: int) -> dict:
    """GFLOPs of one sample's VAE encode, text encode and U-Net forward + backward (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tcscale.models.architectures import build_random_components

    c = build_random_components(arch, resolution, device="meta")
    x = torch.empty(1, 3, resolution, resolution, device="meta")
    with FlopCounterMode(display=False) as f:
        c.vae.encode(x)
    vae = f.get_total_flops()
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as f:
        for tower in c.text_towers:
            tower(ids, output_hidden_states=True)
    text = f.get_total_flops()
    side = resolution // 8
    width = c.unet.config.cross_attention_dim
    added = None
    if c.unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.empty(1, 1280, device="meta"), "time_ids": torch.empty(1, 6, device="meta")}
    unet = {}
    for mode in ("lora", "full"):
        c.unet.requires_grad_(mode == "full")
        lat = torch.empty(1, 4, side, side, device="meta", requires_grad=True)
        with FlopCounterMode(display=False) as f:
            out = c.unet(lat, torch.tensor([10], device="meta"), torch.empty(1, 77, width, device="meta"),
                         added_cond_kwargs=added).sample  # fmt: skip
            fwd = f.get_total_flops()
            out.sum().backward()
        unet[mode] = (fwd, f.get_total_flops())
    g = 1e9
    row = {"arch": arch, "resolution": resolution, "vae_encode_gflop": vae / g, "text_gflop": text / g}
    for mode, (fwd, total) in unet.items():
        row["unet_fwd_gflop"] = fwd / g
        row[f"unet_fwd_bwd_{mode}_gflop"] = total / g
        row[f"planned_step_ratio_{mode}"] = (text + total) / (vae + text + total)  # cached / images
        row[f"planned_vae_share_{mode}"] = vae / (vae + text + total)
    return row


def _stop(trainer) -> None:
    trainer.loader.close()
    trainer.tracker.end("FINISHED")
    trainer.release()


def trainer_run(args, tmp: Path) -> dict:
    """Measurement 1: the real trainer from plain and from cached shards (see the module docstring)."""
    from dataprep.stages import latents as stage
    from dataprep.synthetic_shards import write_synthetic_shards
    from tcscale.config import load_config
    from tcscale.models.architectures import build_random_components
    from tcscale.models.sd import save_pipeline_dir
    from tcscale.models.tokenizer import sd_clip_tokenizer
    from tcscale.train.trainer import Trainer

    res = args.resolution
    t0 = time.perf_counter()
    comps = build_random_components("sd14", res, device="cpu", seed=0, tokenizer=sd_clip_tokenizer())
    save_pipeline_dir(comps, tmp / "sd14")
    del comps
    gc.collect()
    print(f"sd14 random-weight pipeline written in {time.perf_counter() - t0:.0f} s", flush=True)
    n = 4 * (args.steps + 1)
    write_synthetic_shards(str(tmp / "images"), n, res, res * 3 // 2, samples_per_shard=n // 2, progress=False)
    shards = "synthetic-{000000..000001}.tar"
    common = [
        f"model.pretrained={tmp / 'sd14'}", f"data.resolution={res}", "device=cpu", "deepspeed.bf16.enabled=false",
        "model.lora.rank=8", "validation.every_steps=0", "tracking.enabled=false", "data.num_workers=0",
        "data.shuffle_buffer=1", "checkpoint.every_steps=0", "checkpoint.save_final=false", "batch.global_size=1",
        f"max_steps={args.steps + 1}", "log_to_stdout_every=1",
    ]  # fmt: skip
    config = REPO / "configs" / "sd14_tokencompose.yaml"
    cfg = load_config(config, [*common, f"data.shards={tmp / 'images' / shards}", f"output_dir={tmp / 'run_a'}"])
    t0 = time.perf_counter()
    summary = stage.run(cfg, tmp / "cached", progress=False)
    cache_s = time.perf_counter() - t0
    print(f"cache stage: {summary['counts']} in {cache_s:.1f} s", flush=True)
    out: dict = {"cache_stage_s": cache_s, "cache_stage_samples": summary["counts"].get("cached", 0)}
    for mode, shard_dir in (("images", tmp / "images"), ("cached", tmp / "cached")):
        run = [f"data.shards={shard_dir / shards}", f"data.latents={mode}", f"output_dir={tmp / ('run_' + mode)}"]
        cfg = load_config(config, [*common, *run])
        trainer = Trainer(cfg)
        try:
            vae_params = sum(p.numel() for p in trainer.comps.vae.parameters() if p.device.type != "meta")
            times = []
            for step in range(args.steps + 1):
                t = time.perf_counter()
                metrics = trainer.train_step()
                times.append(time.perf_counter() - t)
                print(f"trainer {mode} step {step}: {times[-1]:.2f} s loss/ldm={metrics['loss/ldm']:.4f}", flush=True)
        finally:
            _stop(trainer)
        del trainer
        gc.collect()
        out[mode] = {"step_s": times[1:], "warmup_s": times[0], "median_s": statistics.median(times[1:]),
                     "vae_params_in_memory": vae_params}  # fmt: skip
    out["ratio_cached_over_images"] = out["cached"]["median_s"] / out["images"]["median_s"]
    return out


def objective_run(arch: str, args) -> dict:
    """Measurement 2: the TokenCompose micro-step on images and on their cached posterior, alternated."""
    from tcscale.config import load_config
    from tcscale.data.latent_cache import sample_latents  # noqa: F401 - the path the cached batch takes
    from tcscale.models.architectures import build_random_components
    from tcscale.models.lora import apply_lora
    from tcscale.models.tokenizer import sd_clip_tokenizer
    from tcscale.objectives import OBJECTIVES, BuildContext

    res = args.resolution
    config = {"sd14": "sd14_tokencompose.yaml", "sdxl": "sdxl_tokencompose.yaml"}[arch]
    overrides = [f"data.resolution={res}", "model.lora.rank=8", "device=cpu", "deepspeed.bf16.enabled=false"]
    cfg = load_config(REPO / "configs" / config, [*overrides, "validation.every_steps=0"])
    comps = build_random_components(arch, res, device="cpu", seed=0, tokenizer=sd_clip_tokenizer())
    comps.vae.requires_grad_(False).eval()
    for tower in comps.text_towers:
        tower.requires_grad_(False).eval()
    spec = OBJECTIVES["tokencompose"]
    objective = spec.build(cfg.objective.tokencompose, BuildContext(cfg, comps, torch.float32, torch.device("cpu"), 1))
    apply_lora(objective, cfg)
    images = objective.synthetic_batch(1, phrases=3)
    with torch.no_grad():
        dist = comps.vae.encode(images["pixel_values"]).latent_dist
    cached = {k: v for k, v in images.items() if k != "pixel_values"}
    cached["latent_mean"], cached["latent_logvar"] = dist.mean, dist.logvar
    cached["target_sizes"] = torch.tensor([[res, res]])
    if arch == "sdxl":  # micro-conditioning of a square, uncropped sample
        for b in (images, cached):
            b["original_sizes"], b["crop_top_lefts"] = torch.tensor([[res, res]]), torch.tensor([[0, 0]])
    unet = objective.module
    times: dict[str, list[float]] = {"images": [], "cached": []}
    for rep in range(args.reps + 1):
        for mode, batch in (("images", images), ("cached", cached)):
            unet.zero_grad(set_to_none=True)
            t = time.perf_counter()
            out = objective(unet, batch, torch.Generator().manual_seed(rep))
            out.loss.backward()
            dt = time.perf_counter() - t
            print(f"objective {arch} {mode} rep {rep}: {dt:.2f} s", flush=True)
            if rep:
                times[mode].append(dt)
    t = time.perf_counter()
    with torch.no_grad():
        comps.vae.encode(images["pixel_values"])
    vae_s = time.perf_counter() - t
    del comps, objective
    gc.collect()
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"arch": arch, "resolution": res, "micro_step_s": times, "median_s": med, "vae_encode_s": vae_s,
            "ratio_cached_over_images": med["cached"] / med["images"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed trainer steps per mode (after one warm-up)")
    ap.add_argument("--reps", type=int, default=3, help="timed objective micro-steps per mode (after one warm-up)")
    ap.add_argument("--sdxl", action="store_true", help="also the SDXL objective step (~14 GiB of fp32 weights)")
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    from importlib.metadata import version

    import diffusers

    row: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "load_average": os.getloadavg(),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "deepspeed": version("deepspeed"),
        },
        "command": "python benchmarks/bench_latent_cache.py " + " ".join(sys.argv[1:]),
        "flops": [flop_plan(a, r) for a in ("sd14", "sdxl") for r in (args.resolution, {"sd14": 512, "sdxl": 1024}[a])],
    }
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="bench_latent_cache-") as tmp:
        if not args.skip_trainer:
            row["trainer_sd14"] = trainer_run(args, Path(tmp))
            out.write_text(json.dumps(row, indent=1) + "\n")  # written after each part (SDXL may run out of memory)
    row["objective"] = []
    for arch in ["sd14"] + (["sdxl"] if args.sdxl else []):
        row["objective"].append(objective_run(arch, args))
        out.write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "flops"}, indent=1))
    for f in row["flops"]:
        print(f"planned {f['arch']} {f['resolution']} px: cached/images step = {f['planned_step_ratio_lora']:.3f} "
              f"(LoRA), {f['planned_step_ratio_full']:.3f} (full)")  # fmt: skip


if __name__ == "__main__":
    main()
