"""Pretrain the demo's shipped base model (make demo-base): a tiny text-to-image model that draws the shapes world.

    python launchers/demo_base.py                 # pretrain (configs/demo_base_cfg_text_wide_snr.yaml), validate, ship
    python launchers/demo_base.py --no-ship       # train and validate only (runs/demo_base/)
    python launchers/demo_base.py --shapes-figure docs/demo_base_shapes.png   # the shipped base, every shape

1. writes the pretraining world as WebDataset shards, built the way web data fails composition: mostly one object
   per caption (seed 2001, `SINGLE` samples), few captions of two or three objects (seed 2002, `MULTI` samples),
   and the world's six held-out colour/shape combinations never shown;
2. trains with the LDM loss alone through the real launcher
   (`deepspeed --num_gpus 1 launchers/train.py --config configs/demo_base_cfg_text_wide_snr.yaml`, or `--config`'s), a
   checkpoint every 500 steps;
3. evaluates every checkpoint on the **validation split** (`configs/eval/demo_base_val.yaml`: prompts of training
   combinations only, eval seed 7; one- and two-object prompts; a recipe with an EMA: each checkpoint's EMA weights
   and the last one's trained weights) and records the scores; the last checkpoint (its EMA, if any) is shipped
   (the scorer's ranking of noisy early checkpoints is not a quality ranking: see the model card). The held-out
   prompts `make demo` scores are never looked at here;
4. ships those weights into tcscale/demo_base/ (fp16 safetensors, no tokenizer: `tcscale.models.demo_base`
   rebuilds the full fp32 pipeline from it) with a model card holding the validation numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "launchers":  # launchers/dataprep.py would shadow dataprep/
    sys.path[0] = str(REPO)
OUT = REPO / "runs" / "demo_base"
SINGLE = {"seed": 2001, "num": 8500, "min_objects": 1, "max_objects": 1}
MULTI = {"seed": 2002, "num": 1500, "min_objects": 2, "max_objects": 3}


def say(message: str) -> None:
    print(f"[demo-base {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_world(out: Path) -> str:
    """The pretraining shards; returns the `data.shards` value (both worlds, '::'-joined)."""
    from dataprep.synthetic_shards import write_synthetic_shards

    parts = []
    for prefix, world in (("single", SINGLE), ("multi", MULTI)):
        info = write_synthetic_shards(
            str(out), world["num"], 32, 32, seed=world["seed"], min_objects=world["min_objects"],
            max_objects=world["max_objects"], samples_per_shard=500, prefix=prefix, progress=False,
        )  # fmt: skip
        parts.append(str(out / info["shards"]))
    return "::".join(parts)


def export_ema(run: Path, tag: str) -> Path:
    """Checkpoint `tag`'s EMA weights as an fp32 pipeline directory (what `make demo` would load after shipping)."""
    from tcscale.models.sd import save_pipeline_dir
    from tcscale.train.export import load_trained_components

    out = run / "ema_export" / tag
    if not (out / "model_index.json").is_file():
        save_pipeline_dir(load_trained_components(run, tag, ema=True), out)
    return out


def validate(
    run: Path, tags: list[str], raw: list[str], ema: bool, guidance: tuple[float, ...] = (1.0,)
) -> dict[str, dict[str, float]]:
    """Every checkpoint in `tags` scored on the validation split with its EMA weights (key `<tag>`), and those in
    `raw` with the trained weights too (key `<tag>_raw`), sampled at each classifier-free guidance scale of
    `guidance` (keys of scales other than the first get `_g<scale>`); two evaluations at a time (one core each)."""
    from launchers.demo import run_jobs

    jobs = {}
    for tag in tags:
        if ema:
            model = [f"model.pretrained={export_ema(run, tag)}", "model.run_dir=null"]
        else:
            model = [f"model.run_dir={run}", f"model.tag={tag}"]
        for scale in guidance:
            name = tag + guidance_suffix(scale, guidance)
            jobs[name] = _val_job(run, name, model, scale)
    for tag in raw if ema else []:
        for scale in guidance:
            name = f"{tag}_raw" + guidance_suffix(scale, guidance)
            jobs[name] = _val_job(run, name, [f"model.run_dir={run}", f"model.tag={tag}"], scale)
    run_jobs(jobs, None)
    return {name: json.loads((run / "val" / name / "results.json").read_text())["metrics"] for name in jobs}


def guidance_suffix(scale: float, guidance: tuple[float, ...]) -> str:
    """'' for the first (default) guidance scale, else '_g<scale>' (e.g. '_g3', '_g2.5')."""
    return "" if scale == guidance[0] else f"_g{scale:g}"


def _val_job(run: Path, name: str, model: list[str], guidance: float = 1.0) -> tuple[list[str], Path]:
    cmd = [sys.executable, "launchers/eval.py", "--config", "configs/eval/demo_base_val.yaml", f"name=val_{name}",
           *model, f"output_dir={run / 'val' / name}", f"sampler.guidance_scale={guidance}"]  # fmt: skip
    return cmd, run / f"val_{name}.log"


def choose_guidance(scores: dict[str, dict[str, float]], tag: str, guidance: tuple[float, ...]) -> float:
    """The guidance scale at which checkpoint `tag` scores best on the validation split: the most one-object prompts
    drawn (colour and shape), then the most two-object prompts with both drawn; ties go to the smaller scale."""

    def score(scale: float) -> tuple[float, float, float]:
        metrics = scores[tag + guidance_suffix(scale, guidance)]
        return metrics["synthetic/k1/all_objects"], metrics["synthetic/k2/all_objects"], -scale

    return max(guidance, key=score)


def validation_figure(
    run: Path, names: list[str], path: Path, per_row: int = 10, ema: bool = True, guidance: tuple[float, ...] = (1.0,)
) -> None:
    """The first `per_row` one-object validation prompts (round 0: the same prompt and initial noise in every row),
    one row per evaluation in `names` (read from run/val/<name>); a green frame where the scorer found the object
    with its colour and shape, red where it did not."""
    from PIL import Image, ImageDraw

    from launchers.demo import paste_scored

    tile, pad, head, left = 96, 6, 40, 150
    items = [json.loads(line) for line in (run / "val" / names[0] / "synthetic_k1" / "items.jsonl").open()]
    items = [it for it in items if it["round"] == 0][:per_row]
    canvas = Image.new("RGB", (left + len(items) * (tile + pad), head + len(names) * (tile + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, it in enumerate(items):
        draw.text((left + j * (tile + pad), 6), "\n".join(it["objects"][0].split()), fill="black")
    for i, name in enumerate(names):
        y, folder = head + i * (tile + pad), run / "val" / name / "synthetic_k1"
        tag, _, scale = name.partition("_g")
        label = tag.replace("_raw", " (trained)") + (" (EMA)" if ema and "_raw" not in tag else "")
        label += f"\nguidance {scale or f'{guidance[0]:g}'}" if len(guidance) > 1 else ""
        draw.text((6, y + tile // 2 - 6), label, fill="black")
        for j, it in enumerate(items):
            found = json.loads((folder / "detections" / f"{it['key']}.json").read_text())["labels"]
            x = left + j * (tile + pad)
            ok = all(o in found for o in it["objects"])
            paste_scored(canvas, Image.open(folder / "images" / f"{it['key']}.png").convert("RGB"), x, y, tile, ok)
    canvas.save(path)


def shapes_figure(
    pipeline: Path, path: Path, colours_per_shape: int = 2, columns: int = 4, steps: int = 20
) -> tuple[int, int]:
    """One-object images of every shape: `colours_per_shape` training colours each (held-out combinations never
    drawn), `columns` initial noises per prompt, the demo's guidance scale; a green frame where the scorer finds the
    object with its colour and shape, red where it does not. Returns (objects the scorer found, images drawn)."""
    import torch
    from PIL import Image, ImageDraw

    from launchers.demo import eval_guidance, figure_pipeline, paste_scored
    from tcscale.data.synthetic import SHAPES, compose_caption, synthetic_combos
    from tcscale.eval.synthetic_scorer import all_objects_present

    train, _ = synthetic_combos()
    rows = [(c, s) for s in SHAPES for c in [c for c, t in train if t == s][:colours_per_shape]]
    pipe, guidance = figure_pipeline(str(pipeline)), eval_guidance()
    tile, pad, left = 96, 6, 110
    canvas = Image.new("RGB", (left + columns * (tile + pad), len(rows) * (tile + pad) + pad), "white")
    draw, found = ImageDraw.Draw(canvas), 0
    for i, (colour, shape) in enumerate(rows):
        y = pad + i * (tile + pad)
        draw.text((6, y + tile // 2 - 6), f"{colour} {shape}", fill="black")
        for j in range(columns):
            noise = torch.Generator().manual_seed(2000 + 10 * i + j)
            image = pipe(compose_caption([(colour, shape)]), height=32, width=32, num_inference_steps=steps,
                         guidance_scale=guidance, generator=noise).images[0]  # fmt: skip
            ok = all_objects_present(image, [(colour, shape)])
            found += ok
            x = left + j * (tile + pad)
            paste_scored(canvas, image, x, y, tile, ok)
    canvas.save(path)
    return found, len(rows) * columns


def pretrain(
    out: Path, run: Path, env: dict[str, str], steps: int | None, config: str, cosine: bool, resume: bool = False
) -> None:
    from launchers.demo import free_port

    say("writing the pretraining world (mostly single objects) ...")
    shards = write_world(out / "shards")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
           "launchers/train.py", "--config", config, f"output_dir={run}", f"data.shards={shards}",
           f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]  # fmt: skip
    if steps is not None:
        cmd += [f"max_steps={steps}"]
        if cosine:  # the cosine schedule decays over exactly the steps trained
            cmd += [f"deepspeed.scheduler.params.total_num_steps={steps}"]
    if resume:  # the run's latest checkpoint: model, optimizer, scheduler, EMA and the loader's position
        cmd += ["resume=latest"]
    say(f"{'resuming' if resume else 'pretraining'} with the LDM loss (log: {run / 'train.log'}) ...")
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "train.log", "a" if resume else "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join((run / "train.log").read_text().splitlines()[-25:])
        raise SystemExit(f"demo-base: pretraining failed (exit {rc}); {run / 'train.log'}:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-ship", action="store_true", help="train and validate only; leave tcscale/demo_base alone")
    ap.add_argument(
        "--config",
        default="configs/demo_base_cfg_text_wide_snr.yaml",
        help="the pretraining recipe (default: the one that made the shipped weights, tcscale/demo_base/README.md; "
        "configs/demo_base.yaml, demo_base_cosine_ema.yaml and demo_base_cfg*.yaml are the recipes tried before it)",
    )
    ap.add_argument("--steps", type=int, default=None, help="override max_steps (default: the config's)")
    ap.add_argument(
        "--validate-only",
        action="store_true",
        help="skip pretraining: validate (and ship) the checkpoints runs/demo_base/run already holds",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (after a preemption or a kill; pass the same "
        "--config and --steps as the first time), then validate and ship as usual",
    )
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of the pretraining process (default 1)")
    ap.add_argument(
        "--shapes-figure",
        type=Path,
        default=None,
        metavar="PNG",
        help="only draw the shipped base's one-object images of every shape (training colours) into PNG, then exit",
    )
    ap.add_argument(
        "--last-only",
        action="store_true",
        help="validate only the last checkpoint (what is shipped; every checkpoint is validated by default)",
    )
    ap.add_argument(
        "--out", default=str(OUT), help="folder of the shards, the run and its validation (default runs/demo_base)"
    )
    ap.add_argument(
        "--guidance",
        default=None,
        help="comma-separated classifier-free guidance scales to validate at (default: 1, and 1,3,5 for a recipe "
        "with data.caption_dropout > 0); the first one is also the figure's",
    )
    args = ap.parse_args(argv)
    if args.shapes_figure is not None:
        import tempfile

        import torch

        from tcscale.models.demo_base import materialise_demo_base

        torch.set_num_threads(args.threads)
        args.shapes_figure.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            found, drawn = shapes_figure(materialise_demo_base(Path(tmp) / "base"), args.shapes_figure)
        say(f"{args.shapes_figure}: the scorer found {found} of {drawn} objects (colour and shape)")
        return 0
    from launchers.demo import build_deepspeed_op, child_env

    t0 = time.perf_counter()
    env = child_env() | {"OMP_NUM_THREADS": str(args.threads)}
    build_deepspeed_op()
    from tcscale.config import load_config

    recipe = load_config(REPO / args.config)
    ema, cosine = recipe.ema.enabled, recipe.deepspeed["scheduler"]["type"] == "WarmupCosineLR"
    if args.guidance is not None:
        guidance = tuple(float(v) for v in args.guidance.split(","))
    else:
        guidance = (1.0, 3.0, 5.0) if recipe.data.caption_dropout > 0 else (1.0,)
    out = Path(args.out).resolve()
    run = out / "run"
    if not args.validate_only:
        pretrain(out, run, env, args.steps, args.config, cosine, resume=args.resume)
    tags = [p.name for p in (run / "checkpoints").glob("step*") if p.name[4:].isdigit()]
    tags.sort(key=lambda t: int(t[4:]))
    if not tags:
        raise SystemExit(f"demo-base: {run / 'checkpoints'} holds no checkpoint to validate")
    if args.last_only:
        tags = tags[-1:]
    say(f"validating {len(tags)} checkpoint(s) on the validation split at guidance {', '.join(map(str, guidance))} ...")
    scores = validate(run, tags, raw=tags[-1:], ema=ema, guidance=guidance)
    for name, metrics in scores.items():
        say(
            f"validation {name}{' (EMA)' if ema and '_raw' not in name else ''}: one object drawn "
            f"{metrics['synthetic/k1/all_objects']:.3f}, two objects {metrics['synthetic/k2/all_objects']:.3f}"
        )
    # The last checkpoint is shipped; the validation scores are reported, not used to choose: the synthetic scorer
    # accepts noise as objects (step 500's noisy images scored 0.27 against 0.10 for step 2,500's clean ones;
    # tcscale/demo_base/README.md), so its ranking of under-trained checkpoints is not a quality ranking.
    # The sampler's guidance scale is chosen on the validation split (the last checkpoint's scores); the demo's
    # evaluation (configs/eval/demo_cpu.yaml sampler.guidance_scale) must use the same value.
    best = tags[-1]
    scale = choose_guidance(scores, best, guidance)
    summary = {"chosen": best, "weights": "ema" if ema else "trained", "config": args.config, "validation": scores,
               "guidance_scale": scale, "guidance_scales_validated": list(guidance),
               "wall_s": round(time.perf_counter() - t0, 1), "single": SINGLE, "multi": MULTI}  # fmt: skip
    (out / "validation.json").write_text(json.dumps(summary, indent=1))
    suffix = guidance_suffix(scale, guidance)  # rows at the chosen scale, then the last checkpoint at the others
    shown = [tags[0], tags[len(tags) // 2], tags[-1], *([f"{tags[-1]}_raw"] if ema else [])]
    shown = [name + suffix for name in dict.fromkeys(shown)]
    shown += [tags[-1] + guidance_suffix(g, guidance) for g in guidance if g != scale]
    validation_figure(run, shown, out / "validation.png", ema=ema, guidance=guidance)
    say(f"validation images: {out / 'validation.png'} (guidance {scale:g}, the last rows: the other scales)")
    say(f"shipping the last checkpoint's {'EMA' if ema else 'trained'} weights, {best}, to sample at guidance "
        f"{scale:g} (validation scores above, in validation.json)")  # fmt: skip
    if not args.no_ship:
        from tcscale.models.demo_base import SHIPPED, ship_demo_base

        ship_demo_base(run, best, summary, ema=ema)
        say(f"shipped {best} into {SHIPPED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
