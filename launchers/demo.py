"""The CPU demo (make demo): a shipped base model finetuned with LDM-only, TokenCompose and SepEn, composition per
method on held-out prompts, 3 seeds, in minutes.

    python launchers/demo.py              # 3 seeds x 3 methods, then the base and every finetune evaluated
    DEMO_FAST=1 python launchers/demo.py  # 1 seed, a few steps, a small evaluation: checks the pipeline (CI)
    DEMO_SEEDS=0 python launchers/demo.py # the full budget for the listed seeds only (comma-separated)

1. materialises the shipped base (tcscale/demo_base, made by `make demo-base`) as an fp32 pipeline in runs/demo;
2. writes the finetuning world as grounded WebDataset shards (dataprep.synthetic_shards: 1-3 objects per image);
3. finetunes the base per seed and method through the real launcher (`deepspeed --num_gpus 1 launchers/train.py
   --config configs/demo_cpu.yaml objective.name=ldm|tokencompose|sepen model.pretrained=<base>`), two runs at a
   time (one core each), a progress bar per run;
4. evaluates the base and every finetune with `launchers/eval.py --config configs/eval/demo_cpu.yaml seed=<seed>`
   (MG2 / MG3: every object of a held-out 2- / 3-object prompt found by the synthetic scorer; held-out grounding
   mIoU), the finetunes' nested under their training runs in MLflow;
5. writes runs/demo/results.json and the figures (generated images per model for the same prompts and noise,
   per-phrase attention) and prints the table and the `mlflow ui` command.
"""

from __future__ import annotations

import functools
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
MODELS = ("ldm", "tokencompose", "sepen")  # the finetunes of the shipped base
LABELS = {"base": "base (shipped)", "ldm": "LDM-only", "tokencompose": "TokenCompose", "sepen": "SepEn"}
# SepEn is data-free (its prompts come from the concept list): the config's caption dropout, which the objectives that
# read captions apply, does not concern it, and the trainer refuses the key for it. `--set` overrides come after.
METHOD_SETTINGS = {"sepen": ["data.caption_dropout=0"]}
GROUNDING_SEED = 11233  # + the seed: the held-out grounding world of each seed's evaluation (never trained on)
VALIDATION_SEED = 7000  # + the seed (and + GROUNDING_SEED): the validation split's prompts, noise and grounding world
FULL = {"seeds": [0, 1, 2], "steps": 200, "world": 4000, "grounding_samples": 128, "prompts": 12, "rounds": 2}
FAST = {"seeds": [0], "steps": 40, "world": 1200, "grounding_samples": 64, "prompts": 4, "rounds": 2}


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


def run_jobs(
    jobs: dict[str, tuple[list[str], Path]],
    total: int | None,
    slots: int = 2,
    after: dict[str, str] | None = None,
    bars_for: list[str] | None = None,
) -> None:
    """Run the commands `slots` at a time (one core each), a progress bar per job of `bars_for` (default: every job,
    when `total` is given) from the 'step N/M' lines of its log; a failed job stops the demo with its log's tail.
    `after` maps a job to the one it needs finished first; the first ready job in `jobs`' order starts when a slot
    frees, so no core idles while work it could do waits behind a long job."""
    from tqdm import tqdm

    after = after or {}
    unknown = sorted(set(after.values()) - set(jobs))
    if unknown:
        raise ValueError(f"run_jobs: after names jobs that are not given: {unknown}")
    pending, running, bars, done, rest = list(jobs), {}, {}, set(), None
    if total:
        named = list(jobs) if bars_for is None else bars_for
        bars = {name: tqdm(total=total, desc=f"{name:16s}", position=i, leave=True, file=sys.stdout)
                for i, name in enumerate(named)}  # fmt: skip
        others = [n for n in jobs if n not in bars]
        if others:  # jobs without step lines (the evaluations): one bar counting those finished
            rest = tqdm(total=len(others), desc=f"{'evaluations':16s}", position=len(bars), leave=True, file=sys.stdout)
    step_re = re.compile(r"^step (\d+)/")
    failed = None
    while (pending or running) and failed is None:
        while len(running) < slots:
            ready = [n for n in pending if after.get(n) is None or after[n] in done]
            if not ready:
                break
            name = ready[0]
            pending.remove(name)
            cmd, log = jobs[name]
            log.parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "w")  # noqa: SIM115 - closed when the job ends
            running[name] = (subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=f, stderr=subprocess.STDOUT), f)
        time.sleep(1.0)
        for name in list(running):
            proc, f = running[name]
            if name in bars:
                text = jobs[name][1].read_text()
                steps = [int(m.group(1)) for line in text.splitlines() if (m := step_re.match(line))]
                if steps and steps[-1] > bars[name].n:
                    bars[name].update(steps[-1] - bars[name].n)
            if proc.poll() is not None:
                f.close()
                del running[name]
                if proc.returncode != 0:
                    failed = (name, proc.returncode)
                else:
                    done.add(name)
                    if rest is not None and name not in bars:
                        rest.update(1)
    for proc, f in running.values():  # only after a failure: stop the others
        proc.terminate()
        proc.wait()
        f.close()
    for bar in [*bars.values(), *([rest] if rest is not None else [])]:
        bar.close()
    if failed is not None:
        name, rc = failed
        log = jobs[name][1]
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"demo: {name} failed (exit {rc}); {log}:\n{tail}")


@functools.lru_cache(maxsize=8)
def figure_pipeline(export: str):
    """A model's DDIM pipeline for the figures, loaded once for all three (loading costs more than drawing)."""
    from tcscale.eval.config import EvalModelConfig, SamplerConfig
    from tcscale.eval.generation import load_pipeline

    return load_pipeline(export, EvalModelConfig(pretrained=export), SamplerConfig("ddim"), "cpu")


def held_out_maps(pipelines: dict[str, Path], path: Path) -> None:
    """A held-out training-style image (one object a combination never trained on), its true masks, and each
    model's per-phrase attention from one forward at t=100 (what the grounding mIoU scores), one row per model."""
    import torch
    from PIL import Image

    from tcscale.attention.plan import GroundingPlan, vae_scale_factor
    from tcscale.attention.processors import observe
    from tcscale.attention.recorders import MapCapture
    from tcscale.eval.attention_maps import render_attention
    from tcscale.eval.grounding_maps import grounding_batches, phrase_layer_maps

    rows = []
    for i, (name, export) in enumerate(pipelines.items()):
        pipe = figure_pipeline(str(export))
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


def paste_scored(canvas, image, x: int, y: int, tile: int, ok: bool) -> None:
    """Paste `image` as a `tile`-pixel square at (x, y) in a frame: green where the scorer found every object the
    prompt names, red where it did not (the demo's and the demo base's figures)."""
    from PIL import Image, ImageDraw

    frame = (40, 170, 60) if ok else (220, 40, 40)
    ImageDraw.Draw(canvas).rectangle([x - 3, y - 3, x + tile + 2, y + tile + 2], fill=frame)
    canvas.paste(image.resize((tile, tile), Image.NEAREST), (x, y))


def eval_guidance() -> float:
    """The classifier-free guidance scale of the demo's evaluation (configs/eval/demo_cpu.yaml, chosen for the shipped
    base on its validation split: tcscale/demo_base/provenance.json); the figures sample with it too."""
    import yaml

    return float(yaml.safe_load((REPO / "configs/eval/demo_cpu.yaml").read_text())["sampler"]["guidance_scale"])


def figure(pipelines: dict[str, Path], path: Path) -> None:
    """One held-out prompt: the image and per-phrase attention of each model, one row per model."""
    import torch

    from tcscale.attention.plan import GroundingPlan, vae_scale_factor
    from tcscale.data.synthetic import synthetic_eval_prompts
    from tcscale.eval.attention_maps import generate_with_maps, phrase_heat, phrase_tokens, render_attention

    prompt = synthetic_eval_prompts(2, "held_out", 1, seed=0)[0]["prompt"]
    guidance = eval_guidance()
    rows = []
    for name, export in pipelines.items():
        pipe = figure_pipeline(str(export))
        plan = GroundingPlan.build(pipe.unet, blocks=["up"], resolutions=[16], image_resolution=32,
                                   scale_factor=vae_scale_factor(pipe.vae))  # fmt: skip
        image, maps = generate_with_maps(pipe, prompt, plan, resolution=32, num_inference_steps=20,
                                         guidance_scale=guidance,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
        heats = [(text, phrase_heat(maps, pos, (32, 32))) for text, pos in phrase_tokens(pipe.tokenizer, prompt)]
        tile = render_attention(image, heats, tile=192)
        rows += [_label(f"{name}: generated for {prompt!r} (20 DDIM steps, guidance {guidance:g})", tile.width), tile]
    _stack(rows).save(path)


def generated_grid(pipelines: dict[str, Path], path: Path, per_k: int = 4, seed: int = 0) -> None:
    """Images generated by every model for the same held-out prompts and the same initial noise: one row per model,
    `per_k` two-object then `per_k` three-object prompts; a green frame where the synthetic scorer finds every
    object the prompt names (colour and shape), red where it does not."""
    import torch
    from PIL import Image, ImageDraw

    from tcscale.data.synthetic import synthetic_eval_prompts
    from tcscale.eval.synthetic_scorer import all_objects_present

    prompts = [p for k in (2, 3) for p in synthetic_eval_prompts(k, "held_out", per_k, seed=seed)]
    guidance = eval_guidance()
    tile, pad, head, left = 128, 6, 64, 120
    canvas = Image.new("RGB", (left + len(prompts) * (tile + pad), head + len(pipelines) * (tile + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, p in enumerate(prompts):
        words = ", ".join(" ".join(o) for o in p["objects"]).split(", ")
        draw.text((left + j * (tile + pad), 6), "\n".join(words), fill="black")
    for i, (name, export) in enumerate(pipelines.items()):
        pipe = figure_pipeline(str(export))
        y = head + i * (tile + pad)
        draw.text((6, y + tile // 2 - 6), name, fill="black")
        for j, p in enumerate(prompts):
            image = pipe(p["prompt"], height=32, width=32, num_inference_steps=20, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(1000 + j)).images[0]  # fmt: skip
            ok = all_objects_present(image, p["objects"])
            x = left + j * (tile + pad)
            paste_scored(canvas, image, x, y, tile, ok)
    canvas.save(path)


def parse_args(argv: list[str] | None = None):
    """The demo's command line; the options past --fast are for choosing its settings (docs/DEMO.md)."""
    import argparse

    from tcscale.logs import add_log_level_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="the 1-seed pipeline check (same as DEMO_FAST=1)")
    parser.add_argument("--validation", action="store_true",
                        help="score on the validation split (training combinations, other seeds), no figures: "
                             "how the settings are chosen; the held-out prompts are never looked at")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT.relative_to(REPO)})")
    parser.add_argument("--methods", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="finetuning steps (default: the plan's)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="held-out (or validation) prompts per object count in each evaluation, 2 images each "
                             "(default: the plan's 12; more tells methods apart better and costs time)")  # fmt: skip
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="a training config override, for every method or for METHOD only (repeatable)",
    )
    parser.add_argument("--base", type=Path, default=None,
                        help="a base in the shipped format (default: tcscale/demo_base)")  # fmt: skip
    add_log_level_argument(parser)
    args = parser.parse_args(argv)
    methods = tuple(args.methods.split(","))
    if not methods or any(m not in MODELS for m in methods):
        parser.error(f"--methods {args.methods!r}: each must be one of {', '.join(MODELS)}")
    args.methods = methods
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: must be at least 1")
    if args.prompts is not None and args.prompts < 1:
        parser.error(f"--prompts {args.prompts}: must be at least 1")
    out = args.out.resolve()
    earlier_demo = (out / "base_model").exists() or (out / "results.json").exists()  # this demo's or the old one's
    if out.exists() and any(out.iterdir()) and not earlier_demo:  # the demo empties --out first
        parser.error(
            f"--out {args.out}: exists and is not an earlier demo's output (no base_model/ or results.json); "
            "not emptying it"
        )
    for o in args.overrides:
        if "=" not in o or (":" in o.split("=", 1)[0] and o.split(":", 1)[0] not in MODELS):
            parser.error(f"--set {o!r}: expected [METHOD:]KEY=VALUE, METHOD one of {', '.join(MODELS)}")
    return args


def overrides_for(method: str, overrides: list[str]) -> list[str]:
    """The `--set` overrides that apply to `method`: unprefixed ones and those prefixed `method:`."""
    out = []
    for o in overrides:
        head, sep, rest = o.partition(":")
        if sep and "=" not in head:
            if head == method:
                out.append(rest)
        else:
            out.append(o)
    return out


def metric_rows(metrics: dict[str, float]) -> dict[str, float]:
    """The demo's four numbers from an evaluation's metrics (launchers/eval.py results.json)."""
    return {
        "grounding_miou": metrics["grounding/miou"],
        "all_objects": metrics["synthetic/k2/all_objects"],  # the key earlier demos wrote: two-object prompts
        "mg2": metrics["synthetic/k2/all_objects"],
        "mg3": metrics["synthetic/k3/all_objects"],
        # speckle of the generated images (tcscale.eval.synthetic_scorer.pixel_noise), both prompt sets together
        "pixel_noise": (metrics["synthetic/k2/pixel_noise"] + metrics["synthetic/k3/pixel_noise"]) / 2,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # --help prints and exits here, before anything is written or started
    from tcscale.logs import setup_logging

    setup_logging(args.log_level)
    fast = args.fast or os.environ.get("DEMO_FAST", "") not in ("", "0")
    plan = dict(FAST if fast else FULL)
    if os.environ.get("DEMO_SEEDS"):  # e.g. DEMO_SEEDS=0: one seed of the full budget
        plan["seeds"] = [int(s) for s in os.environ["DEMO_SEEDS"].split(",")]
    if args.steps is not None:
        plan["steps"] = args.steps
    if args.prompts is not None:
        plan["prompts"] = args.prompts
    models, rows, out_dir = args.methods, ("base", *args.methods), args.out.resolve()
    t0 = time.perf_counter()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    say(f"{'fast path: ' if fast else ''}finetuning the shipped base with {', '.join(LABELS[m] for m in models)}, "
        f"{len(plan['seeds'])} seed(s) x {plan['steps']} steps, two runs at a time (one core each)"
        + (" -- scored on the validation split" if args.validation else ""))  # fmt: skip
    build_deepspeed_op()

    from tcscale.models.demo_base import materialise_demo_base

    base = materialise_demo_base(out_dir / "base_model", **({"src": args.base} if args.base else {}))
    say(f"the base ({args.base or 'tcscale/demo_base, its README.md says how it was made'}) -> {base}")
    say(f"writing the finetuning world: {plan['world']} grounded samples (1-3 objects) as WebDataset shards ...")
    from dataprep.synthetic_shards import write_synthetic_shards

    info = write_synthetic_shards(str(out_dir / "shards"), plan["world"], 32, 32, samples_per_shard=500, progress=False)
    shards = str(out_dir / "shards" / info["shards"])
    uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)  # created once here, not by two trainings at the same moment
    if client.get_experiment_by_name("tcscale-demo") is None:
        client.create_experiment("tcscale-demo", artifact_location=(out_dir / "mlartifacts").as_uri())

    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    runs = {(m, s): out_dir / f"{m}_s{s}" for s in plan["seeds"] for m in models}
    train = {
        f"{m} seed {s}": ([deepspeed, "--num_gpus", "1", "--master_port", str(free_port()), "launchers/train.py",
                           "--config", "configs/demo_cpu.yaml", f"objective.name={m}", f"run_name={m}_s{s}",
                           f"output_dir={run}", f"model.pretrained={base}", f"seed={s}", f"max_steps={plan['steps']}",
                           f"validation.every_steps={plan['steps']}", f"data.shards={shards}", f"tracking.uri={uri}",
                           *METHOD_SETTINGS.get(m, []), *overrides_for(m, args.overrides)],
                          run / "train.log")
        for (m, s), run in runs.items()
    }  # fmt: skip

    def eval_cmd(name: str, seed: int, model: list[str], out: Path) -> tuple[list[str], Path]:
        config = "configs/eval/demo_cpu.yaml"
        cmd = [sys.executable, "launchers/eval.py", "--config", config, f"name={name}", *model,
               f"output_dir={out}", f"seed={seed}", f"grounding.synthetic_seed={GROUNDING_SEED + seed}",
               f"grounding.num_samples={plan['grounding_samples']}", f"synthetic.num_prompts={plan['prompts']}",
               f"synthetic.rounds={plan['rounds']}"]  # fmt: skip
        if args.validation:  # training combinations, prompts / noise / grounding images of other seeds
            cmd[cmd.index(f"seed={seed}")] = f"seed={VALIDATION_SEED + seed}"
            cmd[cmd.index(f"grounding.synthetic_seed={GROUNDING_SEED + seed}")] = (
                f"grounding.synthetic_seed={VALIDATION_SEED + GROUNDING_SEED + seed}"
            )
            cmd += ["synthetic.split=train", "grounding.synthetic_split=train"]
        return cmd, out.parent / f"{out.name}.log"

    base_model = [f"model.pretrained={base}", "model.run_dir=null"]  # the eval config names a run
    evals = {
        f"eval base seed {s}": eval_cmd(f"base_s{s}", s, base_model, out_dir / f"base_eval_s{s}") for s in plan["seeds"]
    }
    evals.update({f"eval {m} seed {s}": eval_cmd(f"{m}_s{s}", s, [f"model.run_dir={run}"], run / "eval")
                  for (m, s), run in runs.items()})  # fmt: skip
    where = "validation" if args.validation else "held-out"
    say(f"finetuning: {len(train)} runs of {plan['steps']} steps; the base and each finetune evaluated on {where} "
        f"prompts as soon as it can be ({len(evals)} evaluations), two jobs at a time ...")  # fmt: skip
    run_jobs(train | evals, plan["steps"], after={f"eval {m} seed {s}": f"{m} seed {s}" for m, s in runs},
             bars_for=list(train))  # fmt: skip
    results = {m: {k: [] for k in ("grounding_miou", "all_objects", "mg2", "mg3", "pixel_noise")} for m in rows}
    for s in plan["seeds"]:
        outs = {"base": out_dir / f"base_eval_s{s}"} | {m: runs[(m, s)] / "eval" for m in models}
        for m, out in outs.items():
            for key, value in metric_rows(json.loads((out / "results.json").read_text())["metrics"]).items():
                results[m][key].append(value)

    if not args.validation:  # the figures show held-out prompts: never drawn while choosing settings
        say("figures: generated images per model for the same prompts and noise; per-phrase attention ...")
        import diffusers
        import torch

        torch.set_num_threads(1)  # as the runs (child_env): two threads on shared cores drew the figures 12x slower
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        s0 = plan["seeds"][0]
        pipelines = {"base": base} | {m: sorted((runs[(m, s0)] / "export").iterdir())[-1] for m in models}
        generated_grid(pipelines, out_dir / "figure_generated.png", per_k=2 if fast else 4)
        figure(pipelines, out_dir / "figure.png")
        held_out_maps(pipelines, out_dir / "figure_heldout_maps.png")
    wall = time.perf_counter() - t0
    split = "validation" if args.validation else "held_out"
    out = {"seeds": plan["seeds"], "models": results, "wall_s": round(wall, 1), "fast": fast,
           "steps": plan["steps"], "prompts": plan["prompts"], "rounds": plan["rounds"], "split": split,
           "overrides": args.overrides}  # fmt: skip
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(out_dir / "results.json")

    def fmt(values: list[float]) -> str:
        spread = f" ± {statistics.pstdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.3f}{spread}"

    print()
    print(f"| model (seeds {plan['seeds']}) | MG2 (2 objects, {where}) | MG3 (3 objects, {where}) "
          f"| {where} grounding mIoU | pixel noise |")  # fmt: skip
    print("|---|---|---|---|---|")
    for m in rows:
        r = results[m]
        print(f"| {LABELS[m]} | {fmt(r['mg2'])} | {fmt(r['mg3'])} | {fmt(r['grounding_miou'])} "
              f"| {fmt(r['pixel_noise'])} |")  # fmt: skip
    for key in ("mg2", "grounding_miou", "pixel_noise") if {"ldm", "tokencompose"} <= set(models) else ():
        gaps = [t - b for t, b in zip(results["tokencompose"][key], results["ldm"][key])]
        print(f"TokenCompose - LDM-only, {key} per seed: {', '.join(f'{g:+.3f}' for g in gaps)}")
    print(f"results: {out_dir / 'results.json'}   figures: {out_dir}/figure_*.png   wall: {wall / 60:.1f} min")
    print(f"MLflow:  {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
