"""TokenCompose against flow matching alone on a tiny SD3-shaped model trained from scratch on the synthetic shapes
world: held-out grounding mIoU over seeds (docs/MMDIT.md, "Evidence").

    python benchmarks/sd3_grounding.py                      # seeds 0 1 2 x {flow matching, tokencompose}, held-out
    python benchmarks/sd3_grounding.py --split validation --seeds 0 --methods tokencompose --tag lam0.2 \\
        --set objective.tokencompose.token_loss_weight=0.2  # one point of a sweep, scored on the validation split
    python benchmarks/sd3_grounding.py --smoke              # 4 steps, 8 evaluation images (the pipeline only)

Each (method, seed) trains through the real launcher (`deepspeed --num_gpus 1 launchers/train.py --config
configs/tiny_sd3_cpu.yaml objective.name=ldm|tokencompose seed=<seed> ...`: same data stream, steps, batch and seed for
both methods; `ldm` is flow matching alone on an SD3 model) and is evaluated with `launchers/eval.py --config
configs/eval/tiny_sd3_grounding.yaml` (one forward at t = 100 on images that each show >= 2 objects). Held-out: one
colour/shape combination per image never trained on, a world seed of its own per training seed (11233 + seed).
Validation (for choosing settings): training combinations, world seeds 7000 + 11233 + seed, never the held-out ones.

A training whose last checkpoint is on disk, or an evaluation whose results.json is, is not run again. Writes
benchmarks/results/sd3_grounding_<split>[_<tag>].json: the settings, per model the mIoU of every seed (and
per grounded layer), mean and population std, the commands and the wall time. Runs `--jobs` trainings at a time, one
thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
METHODS = {"flow_matching": "ldm", "tokencompose": "tokencompose"}  # result name -> objective.name
GROUNDING_SEED = 11233  # + seed: the held-out world of each seed's evaluation
VALIDATION_SEED = 7000  # + GROUNDING_SEED + seed: the validation worlds (training combinations)
# From scratch, as the U-Net demo was (docs/DEMO.md): 4,000 distinct 1-3-object images, batch 8, AdamW lr 1e-3 with a
# 20-step linear warm-up; no checkpoint before the last step.
TRAIN = [
    "data.synthetic.num_samples=4000",
    "deepspeed.train_micro_batch_size_per_gpu=8",
    "deepspeed.optimizer.params.lr=1.0e-3",
    "deepspeed.scheduler.type=WarmupLR",
    "deepspeed.scheduler.params.warmup_min_lr=0.0",
    "deepspeed.scheduler.params.warmup_max_lr=1.0e-3",
    "deepspeed.scheduler.params.warmup_num_steps=20",
    "deepspeed.scheduler.params.warmup_type=linear",
    "checkpoint.every_steps=0",
    "log_to_stdout_every=50",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_jobs(jobs: dict[str, tuple[list[str], Path]], slots: int) -> None:
    """Run the commands `slots` at a time; a failed one stops everything with its log's tail."""
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < slots:
            name = pending.pop(0)
            cmd, log = jobs[name]
            log.parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "w")  # noqa: SIM115 - closed when the job ends
            running[name] = (subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=f, stderr=subprocess.STDOUT), f)
            print(f"[{time.strftime('%H:%M:%S')}] started {name}", flush=True)
        time.sleep(2.0)
        for name in list(running):
            proc, f = running[name]
            if proc.poll() is None:
                continue
            f.close()
            del running[name]
            print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {proc.returncode}", flush=True)
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.terminate()
                    other.wait()
                tail = "\n".join(jobs[name][1].read_text().splitlines()[-25:])
                raise SystemExit(f"{name} failed (exit {proc.returncode}); {jobs[name][1]}:\n{tail}")


def run_settings(run: Path, eval_dir: str) -> dict:
    """What a run trained and was scored with, read back from its merged config and its evaluation's results."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    tc = cfg.objective.tokencompose
    scored = json.loads((run / eval_dir / "results.json").read_text())["details"]["grounding"]["layers"]
    return {
        "objective": cfg.objective.name,
        "grounded_blocks": list(cfg.attention.blocks) if cfg.objective.name == "tokencompose" else [],
        "token_loss_weight": tc.token_loss_weight if cfg.objective.name == "tokencompose" else None,
        "pixel_loss_weight": tc.pixel_loss_weight if cfg.objective.name == "tokencompose" else None,
        "lr": cfg.deepspeed.optimizer.params.lr,
        "max_steps": cfg.max_steps,
        "scored_layers": scored,
    }


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps of batch 8 (default 400)")
    ap.add_argument("--split", choices=["held_out", "validation"], default="held_out")
    ap.add_argument("--samples", type=int, default=128, help="evaluation images per seed (default 128)")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="training config overrides (key=value)")
    ap.add_argument("--eval-set", nargs="*", default=[], help="evaluation config overrides (key=value)")
    ap.add_argument("--eval-dir", default="eval", help="evaluation folder in each run (default eval)")
    ap.add_argument("--tag", default="", help="suffix of the results file and run folder")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at a time, one thread each (default 1)")
    ap.add_argument("--out", default="runs/sd3_grounding", help="run folders (default runs/sd3_grounding)")
    ap.add_argument("--results", default=None, help="results JSON (default benchmarks/results/sd3_grounding_...)")
    ap.add_argument("--smoke", action="store_true", help="4 steps, 8 evaluation images: checks the pipeline")
    args = ap.parse_args(argv)
    steps, samples = (4, 8) if args.smoke else (args.steps, args.samples)
    name = f"sd3_grounding_{args.split}" + (f"_{args.tag}" if args.tag else "")
    out = (REPO / args.out / name).resolve()
    results_path = Path(args.results) if args.results else RESULTS / f"{name}.json"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    t0 = time.perf_counter()

    runs = {(m, s): out / f"{m}_s{s}" for s in args.seeds for m in args.methods}
    train = {
        f"train {m} s{s}": ([deepspeed, "--num_gpus", "1", "--master_port", str(free_port()), "launchers/train.py",
                             "--config", "configs/tiny_sd3_cpu.yaml", f"objective.name={METHODS[m]}",
                             f"run_name={m}_s{s}", f"output_dir={run}", f"seed={s}", f"max_steps={steps}",
                             f"tracking.uri={uri}", *TRAIN, *args.overrides], run / "train.log")
        for (m, s), run in runs.items()
    }  # fmt: skip
    # a stage already on disk is not run again (a killed benchmark resumes; one method's runs can come first)
    train_todo = {k: v for k, v in train.items() if not (v[1].parent / "checkpoints" / f"step{steps}").is_dir()}
    run_jobs(train_todo, args.jobs)

    def eval_cmd(s: int, run: Path) -> list[str]:
        world = GROUNDING_SEED + s if args.split == "held_out" else VALIDATION_SEED + GROUNDING_SEED + s
        cmd = [sys.executable, "launchers/eval.py", "--config", "configs/eval/tiny_sd3_grounding.yaml",
               f"model.run_dir={run}", f"output_dir={run / args.eval_dir}", f"grounding.synthetic_seed={world}",
               f"grounding.num_samples={samples}", f"tracking.uri={uri}"]  # fmt: skip
        cmd.append(f"seed={s}" if args.split == "held_out" else f"seed={VALIDATION_SEED + s}")
        if args.split == "validation":
            cmd.append("grounding.synthetic_split=train")
        return cmd + list(args.eval_set)

    evals = {f"eval {m} s{s}": (eval_cmd(s, run), run / f"{args.eval_dir}.log") for (m, s), run in runs.items()}
    done = {k for k, v in evals.items() if (v[1].parent / args.eval_dir / "results.json").is_file()}
    evals_todo = {k: v for k, v in evals.items() if k not in done}
    run_jobs(evals_todo, args.jobs)

    models: dict[str, dict] = {}
    for m in args.methods:
        per_seed, layers = [], {}
        for s in args.seeds:
            metrics = json.loads((runs[(m, s)] / args.eval_dir / "results.json").read_text())["metrics"]
            per_seed.append(metrics["grounding/miou"])
            for key, value in metrics.items():
                if key.startswith("grounding/layer/"):
                    layers.setdefault(key.removeprefix("grounding/layer/"), []).append(value)
        settings = run_settings(runs[(m, args.seeds[0])], args.eval_dir)
        models[m] = {"grounding_miou": per_seed, **summarize(per_seed), "per_layer": layers, "settings": settings}
    import torch

    result = {
        "benchmark": "sd3_grounding",
        "split": args.split,
        "seeds": args.seeds,
        "steps": steps,
        "evaluation_images": samples,
        "train_overrides": TRAIN + list(args.overrides),
        "eval_overrides": list(args.eval_set),
        "models": models,
        "commands": {
            "train": "deepspeed --num_gpus 1 " + " ".join(train[next(iter(train))][0][5:]),
            "eval": "python " + " ".join(evals[next(iter(evals))][0][1:]),
        },
        "wall_s": round(time.perf_counter() - t0, 1),  # of this invocation: the stages it ran, below
        "ran": {"trainings": len(train_todo), "evaluations": len(evals_todo), "jobs": args.jobs},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| model | grounding mIoU ({args.split} split), seeds {args.seeds} | per seed |")
    print("|---|---|---|")
    for m, r in models.items():
        print(f"| {m} | {r['mean']:.3f} ± {r['std']:.3f} | {' / '.join(f'{v:.3f}' for v in r['grounding_miou'])} |")
    print(f"wrote {results_path} ({result['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
