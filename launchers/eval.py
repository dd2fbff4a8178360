"""Evaluation entry point, launched like training.

    python launchers/eval.py --config configs/eval/<name>.yaml [key=value ...]          (one process)
    deepspeed launchers/eval.py --config ...                                             (every GPU of a node)
    torchrun --nproc_per_node N launchers/eval.py --config ...
    srun launchers/eval.py --config ...                                                  (SLURM; eval.sbatch)

Every rank generates its share of each suite's (prompt, round) pairs, detects, and rank 0 scores, writes
`<output_dir>/results.json` and `table.md`, and logs the metrics, results and plots to MLflow (nested under the
training run when `model.run_dir` or `tracking.parent_run_*` names one). A rerun skips every image and detection
already on disk. Exit codes: 0 done; 2 bad config / model / input (one line naming it).
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
    run = EvalRun(
        uri, cfg.name, experiment=cfg.tracking.experiment, parent_run_id=parent, params=flatten(results["config"])
    )
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
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model.pretrained=runs/x/export")
    args = parser.parse_args(argv)

    from tcscale.config import ConfigError
    from tcscale.eval.config import load_eval_config

    try:
        cfg = load_eval_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    from tcscale.data.config import DataConfigError
    from tcscale.eval.generation import EvalInputError
    from tcscale.eval.runner import EvalContext, Evaluation
    from tcscale.models.sd import ModelLoadError
    from tcscale.train.checkpoint import CheckpointError
    from tcscale.train.distributed import barrier, init_distributed

    env = init_distributed()
    ctx = EvalContext(env.rank, env.world_size, env.device, barrier, progress=sys.stderr.isatty())
    try:
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
