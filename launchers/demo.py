"""The CPU demo: TokenCompose against LDM-only on the synthetic shapes world, 3 seeds, in minutes (make demo).

    python launchers/demo.py              # 3 seeds x 500 steps (~10 min on 2 cores)
    DEMO_FAST=1 python launchers/demo.py  # 1 seed x 150 steps, a smaller world: checks the pipeline (CI)

1. writes the training world as grounded WebDataset shards (dataprep.synthetic_shards);
2. per seed, trains both models side by side, one core each, through the real launcher
   (`deepspeed --num_gpus 1 launchers/train.py --config configs/demo_cpu.yaml objective.name=ldm|tokencompose`),
   with a progress bar per model;
3. evaluates each with `launchers/eval.py --config configs/eval/demo_cpu.yaml` (held-out grounding mIoU and the
   synthetic scorer's all-objects rate on held-out prompts), nested under its training run in MLflow;
4. writes runs/demo/results.json, a figure (a held-out prompt: image and per-phrase attention of both models) and
   prints the table and the `mlflow ui` command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "launchers":  # launchers/dataprep.py would shadow dataprep/
    sys.path[0] = str(REPO)
OUT = REPO / "runs" / "demo"
MODELS = ("ldm", "tokencompose")
FULL = {"seeds": [0, 1, 2], "steps": 500, "world": 4000, "grounding_samples": 128, "prompts": 16, "rounds": 4}
FAST = {"seeds": [0], "steps": 150, "world": 1200, "grounding_samples": 64, "prompts": 4, "rounds": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_deepspeed_op() -> None:
    """DeepSpeed compiles its CPU communication op on first use (once per machine, into ~/.cache)."""
    say("building DeepSpeed's CPU communication op (once per machine, ~1 min; silent while it compiles) ...")
    code = (
        "from deepspeed.accelerator import get_accelerator\n"
        "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
        "b.load() if b is not None else None\n"
    )
    subprocess.run([sys.executable, "-c", code], env=child_env(), check=True, capture_output=True, cwd=REPO)


def run_pair(commands: dict[str, list[str]], logs: dict[str, Path], total: int | None, what: str) -> None:
    """Run two commands side by side; a progress bar per model from the 'step N/M' lines of its log."""
    from tqdm import tqdm

    procs, bars = {}, {}
    for i, (name, cmd) in enumerate(commands.items()):
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        f = open(logs[name], "w")  # noqa: SIM115 - closed below
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=f, stderr=subprocess.STDOUT), f)
        if total:
            bars[name] = tqdm(total=total, desc=f"{what} {name:12s}", position=i, leave=True, file=sys.stdout)
    step_re = re.compile(r"^step (\d+)/")
    while any(p.poll() is None for p, _ in procs.values()):
        time.sleep(1.0)
        for name, bar in bars.items():
            steps = [int(m.group(1)) for line in logs[name].read_text().splitlines() if (m := step_re.match(line))]
            if steps and steps[-1] > bar.n:
                bar.update(steps[-1] - bar.n)
    for bar in bars.values():
        bar.close()
    for name, (p, f) in procs.items():
        f.close()
        if p.returncode != 0:
            tail = "\n".join(logs[name].read_text().splitlines()[-25:])
            raise SystemExit(f"demo: {what} of {name} failed (exit {p.returncode}); {logs[name]}:\n{tail}")


def held_out_maps(pipelines: dict[str, Path], path: Path) -> None:
    """A held-out training-style image (one object a combination never trained on), its true masks, and each
    model's per-phrase attention from one forward at t=100 (what the grounding mIoU scores), one row per model."""
    import torch
    from PIL import Image

    from tcscale.attention.plan import GroundingPlan, vae_scale_factor
    from tcscale.attention.processors import observe
    from tcscale.attention.recorders import MapCapture
    from tcscale.eval.attention_maps import render_attention
    from tcscale.eval.config import EvalModelConfig, SamplerConfig
    from tcscale.eval.generation import load_pipeline
    from tcscale.eval.grounding_maps import grounding_batches, phrase_layer_maps

    rows = []
    for i, (name, export) in enumerate(pipelines.items()):
        pipe = load_pipeline(str(export), EvalModelConfig(pretrained=str(export)), SamplerConfig("ddim"), "cpu")
        plan = GroundingPlan.build(pipe.unet, blocks=["up"], resolutions=[16], image_resolution=32,
                                   scale_factor=vae_scale_factor(pipe.vae))  # fmt: skip
        batch = next(grounding_batches("synthetic", pipe.tokenizer, resolution=32, num_samples=4, batch_size=4,
                                       synthetic_seed=11233, min_objects=2))  # fmt: skip
        b = 0
        observe(pipe.unet, plan)
        with torch.no_grad():
            lat = pipe.vae.encode(batch["pixel_values"]).latent_dist.mode() * pipe.vae.config.scaling_factor
            t = torch.full((lat.shape[0],), 100)
            noisy = pipe.scheduler.add_noise(lat, torch.randn(lat.shape, generator=torch.Generator().manual_seed(0)), t)
            with MapCapture(tuple(lat.shape[-2:])) as cap:
                pipe.unet(noisy, t, pipe.text_encoder(batch["input_ids"])[0], cross_attention_kwargs=cap.kwargs)
        slots, layers = phrase_layer_maps({k: v.float() for k, v in cap.maps.items()}, batch["token_phrase"],
                                          tuple(lat.shape[-2:]))[b]  # fmt: skip
        words = batch["captions"][b].replace(",", "").split()
        image = Image.fromarray(((batch["pixel_values"][b].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255)
                                .astype("uint8"))  # fmt: skip
        heats = []
        for j, p in enumerate(slots):
            up = [torch.nn.functional.interpolate(m[j][None, None], size=(32, 32), mode="bilinear")[0, 0]
                  for m in layers.values()]  # fmt: skip
            pos = [k for k in range(77) if int(batch["token_phrase"][b][k]) == p]
            label = " ".join(words[k - 1] for k in pos if 0 < k <= len(words))
            heats.append((label, torch.stack(up).mean(0)))
        if i == 0:  # the true masks once, as the first row
            masks = [(f"mask: {text}", batch["phrase_masks"][b][p]) for (text, _), p in zip(heats, slots)]
            rows += [_label(f"held-out image: {batch['captions'][b]!r}", 192 * (1 + len(masks))),
                     render_attention(image, masks, tile=192)]  # fmt: skip
        rows += [_label(f"{name}: attention at t=100 (16x16 up-block layers)", 192 * (1 + len(heats))),
                 render_attention(image, heats, tile=192)]  # fmt: skip
    _stack(rows).save(path)


def _label(text: str, width: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, 28), "white")
    ImageDraw.Draw(im).text((6, 6), text, fill="black")
    return im


def _stack(rows):
    from PIL import Image

    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    return canvas


def figure(pipelines: dict[str, Path], path: Path) -> None:
    """One held-out prompt: the image and per-phrase attention of each model, one row per model."""
    import torch

    from tcscale.attention.plan import GroundingPlan, vae_scale_factor
    from tcscale.data.synthetic import synthetic_eval_prompts
    from tcscale.eval.attention_maps import generate_with_maps, phrase_heat, phrase_tokens, render_attention
    from tcscale.eval.config import EvalModelConfig, SamplerConfig
    from tcscale.eval.generation import load_pipeline

    prompt = synthetic_eval_prompts(2, "held_out", 1, seed=0)[0]["prompt"]
    rows = []
    for name, export in pipelines.items():
        pipe = load_pipeline(str(export), EvalModelConfig(pretrained=str(export)), SamplerConfig("ddim"), "cpu")
        plan = GroundingPlan.build(pipe.unet, blocks=["up"], resolutions=[16], image_resolution=32,
                                   scale_factor=vae_scale_factor(pipe.vae))  # fmt: skip
        image, maps = generate_with_maps(pipe, prompt, plan, resolution=32, num_inference_steps=20, guidance_scale=1.0,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
        heats = [(text, phrase_heat(maps, pos, (32, 32))) for text, pos in phrase_tokens(pipe.tokenizer, prompt)]
        tile = render_attention(image, heats, tile=192)
        rows += [_label(f"{name}: generated for {prompt!r} (20 DDIM steps)", tile.width), tile]
    _stack(rows).save(path)


def parse_args(argv: list[str] | None = None, description: str | None = __doc__):
    """The demos' command line (this one's and launchers/demo_finetune.py's, with its own description)."""
    import argparse

    from tcscale.logs import add_log_level_argument

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="the 1-seed pipeline check (same as DEMO_FAST=1)")
    add_log_level_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # --help prints and exits here, before anything is written or started
    from tcscale.logs import setup_logging

    setup_logging(args.log_level)
    fast = args.fast or os.environ.get("DEMO_FAST", "") not in ("", "0")
    plan = FAST if fast else FULL
    t0 = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    say(f"{'fast path: ' if fast else ''}{len(plan['seeds'])} seed(s) x {{LDM-only, TokenCompose}}, "
        f"{plan['steps']} steps each, two trainings side by side (one core each)")  # fmt: skip
    build_deepspeed_op()

    say(f"writing the training world: {plan['world']} grounded samples as WebDataset shards ...")
    from dataprep.synthetic_shards import write_synthetic_shards

    info = write_synthetic_shards(str(OUT / "shards"), plan["world"], 32, 32, samples_per_shard=500, progress=False)
    shards = str(OUT / "shards" / info["shards"])
    uri = f"sqlite:///{OUT / 'mlflow.db'}"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)  # created once here, not by two trainings at the same moment
    if client.get_experiment_by_name("tcscale-demo") is None:
        client.create_experiment("tcscale-demo", artifact_location=(OUT / "mlartifacts").as_uri())

    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    results = {m: {"grounding_miou": [], "all_objects": []} for m in MODELS}
    runs = {}
    for seed in plan["seeds"]:
        runs = {m: OUT / f"{m}_s{seed}" for m in MODELS}
        train = {
            m: [deepspeed, "--num_gpus", "1", "--master_port", str(free_port()), "launchers/train.py",
                "--config", "configs/demo_cpu.yaml", f"objective.name={m}", f"run_name={m}_s{seed}",
                f"output_dir={runs[m]}", f"seed={seed}", f"model.tiny.seed={seed}", f"max_steps={plan['steps']}",
                f"validation.every_steps={plan['steps']}", f"data.shards={shards}", f"tracking.uri={uri}",
                f"--log-level={args.log_level}"]
            for m in MODELS
        }  # fmt: skip
        say(f"seed {seed}: training both models ({plan['steps']} steps) ...")
        run_pair(train, {m: runs[m] / "train.log" for m in MODELS}, plan["steps"], f"seed {seed}")
        evals = {
            m: [sys.executable, "launchers/eval.py", "--config", "configs/eval/demo_cpu.yaml", f"name={m}_s{seed}",
                f"model.run_dir={runs[m]}", f"output_dir={runs[m] / 'eval'}",
                f"grounding.num_samples={plan['grounding_samples']}", f"synthetic.num_prompts={plan['prompts']}",
                f"synthetic.rounds={plan['rounds']}", f"--log-level={args.log_level}"]
            for m in MODELS
        }  # fmt: skip
        say(f"seed {seed}: evaluating both (held-out grounding mIoU, all objects present on held-out prompts) ...")
        run_pair(evals, {m: runs[m] / "eval.log" for m in MODELS}, None, f"seed {seed} eval")
        for m in MODELS:
            metrics = json.loads((runs[m] / "eval" / "results.json").read_text())["metrics"]
            results[m]["grounding_miou"].append(metrics["grounding/miou"])
            results[m]["all_objects"].append(metrics["synthetic/k2/all_objects"])
        say("seed {}: grounding mIoU LDM-only {:.3f} / TokenCompose {:.3f}".format(
            seed, results["ldm"]["grounding_miou"][-1], results["tokencompose"]["grounding_miou"][-1]))  # fmt: skip

    say("figure: a held-out prompt, image and per-phrase attention of both models ...")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    exports = {m: sorted((run / "export").iterdir())[-1] for m, run in runs.items()}
    figure(exports, OUT / "figure.png")
    held_out_maps(exports, OUT / "figure_heldout_maps.png")
    wall = time.perf_counter() - t0
    out = {"seeds": plan["seeds"], "models": results, "wall_s": round(wall, 1), "fast": fast,
           "steps": plan["steps"]}  # fmt: skip
    tmp = OUT / "results.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(OUT / "results.json")

    def fmt(values: list[float]) -> str:
        spread = f" ± {statistics.pstdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.3f}{spread}  ({', '.join(f'{v:.3f}' for v in values)})"

    print()
    print(f"| model (seeds {plan['seeds']}) | held-out grounding mIoU | all objects present (held-out prompts) |")
    print("|---|---|---|")
    for m, label in (("ldm", "LDM-only"), ("tokencompose", "TokenCompose")):
        print(f"| {label} | {fmt(results[m]['grounding_miou'])} | {fmt(results[m]['all_objects'])} |")
    gaps = [t - b for t, b in zip(results["tokencompose"]["grounding_miou"], results["ldm"]["grounding_miou"])]
    print(f"\nTokenCompose - LDM-only, grounding mIoU per seed: {', '.join(f'{g:+.3f}' for g in gaps)}")
    print(f"results: {OUT / 'results.json'}   figure: {OUT / 'figure.png'}   wall: {wall / 60:.1f} min")
    print(f"MLflow:  {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
