"""Evaluation entry point, launched like training.

    python launchers/eval.py --config configs/eval/<name>.yaml [key=value ...]          (one process)
    deepspeed launchers/eval.py --config ...                                             (every GPU of a node)
    torchrun --nproc_per_node N launchers/eval.py --config ...
    srun launchers/eval.py --config ...                                                  (SLURM, one job)
    python launchers/eval.py --config ... --shard R/N    (array task R of N: generate + detect its share; eval.sbatch)
    python launchers/eval.py --config ... --merge        (once every share finished: score, results.json, MLflow)

Every rank generates its share of each suite's (prompt, round) pairs, detects, and rank 0 scores, writes
`<output_dir>/results.json` and `table.md`, and logs the metrics, results and plots to MLflow (nested under the
training run when `model.run_dir` or `tracking.parent_run_*` names one). A rerun skips every image and detection
already on disk. `--shard R/N` needs no process group and no other task (items[R::N] of every suite, then
<output_dir>/shards/rankR-ofN.json); `--merge` generates nothing, scores what the N shares left, and logs like the
one-job run. Exit codes: 0 done; 2 bad config / model / input, or a share missing at merge (one line naming it).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tracking_target(cfg) -> tuple[str, str | None]:
    """(tracking URI, parent run id) of the evaluation (see EvalTrackingConfig)."""
    from pathlib import Path

    from tcscale.tracking.mlflow_tracker import read_run_info

    t = cfg.tracking
    parent_dir = t.parent_run_dir or cfg.model.run_dir
    info = None
    if parent_dir is not None and t.parent_run_id is None:
        try:
            info = read_run_info(parent_dir)
        except FileNotFoundError:
            if t.parent_run_dir is not None:
                raise
    uri = t.uri or (info or {}).get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    uri = uri or f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"
    return uri, t.parent_run_id or (info or {}).get("mlflow_run_id")


def log_to_mlflow(cfg, evaluation, results: dict) -> str:
    from pathlib import Path

    from tcscale.config import flatten
    from tcscale.tracking.mlflow_tracker import EvalRun

    uri, parent = tracking_target(cfg)
    # what each suite ran (its precision, sample count, sampler) as params "protocol.<metric prefix>.<key>"
    params = {**flatten(results["config"]), **flatten({"protocol": results.get("protocol", {})})}
    run = EvalRun(uri, cfg.name, experiment=cfg.tracking.experiment, parent_run_id=parent, params=params)
    run.log_metrics(results["metrics"], 0)
    out = Path(cfg.output_dir)
    for path in (out / "results.json", out / "table.md", *evaluation.artifacts):
        if Path(path).is_file():
            rel = Path(path).parent.relative_to(out) if Path(path).parent != out else None
            run.log_artifact(path, None if rel is None else str(rel))
    run.end("FINISHED")
    return run.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tcscale evaluation")
    parser.add_argument("--config", required=True, help="YAML config (configs/eval/*.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--shard", metavar="R/N", help="generate and detect the share of array task R of N (no scoring)")
    mode.add_argument("--merge", action="store_true", help="score the finished shares: results.json and MLflow")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model.pretrained=runs/x/export")
    from tcscale.logs import add_log_level_argument, setup_logging

    add_log_level_argument(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    shard = None
    if args.shard is not None:
        try:
            shard = tuple(int(x) for x in args.shard.split("/"))
            if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
                raise ValueError
        except ValueError:
            print(f"--shard {args.shard!r}: expected R/N with 0 <= R < N, e.g. 3/8", file=sys.stderr)
            return 2

    from tcscale.config import ConfigError
    from tcscale.eval.config import load_eval_config

    try:
        cfg = load_eval_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from tcscale.train.distributed import cuda_missing

    if why := cuda_missing(cfg.device):
        print(f"error: {why}", file=sys.stderr)
        return 2
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    from tcscale.data.config import DataConfigError
    from tcscale.eval.generation import EvalInputError
    from tcscale.eval.runner import EvalContext, Evaluation, run_merge, run_share
    from tcscale.models.sd import ModelLoadError
    from tcscale.train.checkpoint import CheckpointError

    try:
        if shard is not None or args.merge:  # array tasks and the merge: one process each, no process group
            import torch

            device = torch.device("cuda", 0) if cfg.device == "cuda" else torch.device("cpu")
            if shard is not None:
                run_share(cfg, shard[0], shard[1], device, progress=sys.stderr.isatty())
                print(f"share {shard[0]} of {shard[1]} done: {os.path.join(cfg.output_dir, 'shards')}")
                return 0
            results, evaluation = run_merge(cfg, device)
        else:
            from tcscale.train.distributed import barrier, init_distributed

            env = init_distributed(cfg.device)
            ctx = EvalContext(env.rank, env.world_size, env.device, barrier, progress=sys.stderr.isatty())
            evaluation = Evaluation(cfg, ctx)
            results = evaluation.run()
        if results is not None:
            from tcscale.eval.compare import compare_table

            print(compare_table([results]))
            print(f"results: {os.path.join(cfg.output_dir, 'results.json')}")
            if cfg.tracking.enabled:
                run_id = log_to_mlflow(cfg, evaluation, results)
                print(f"mlflow run {run_id}")
    except (EvalInputError, DataConfigError, ModelLoadError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
