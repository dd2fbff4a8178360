"""MLflow tracking on global rank 0: params, per-step metrics, tags, images.

The default tracking URI is a sqlite database in the run directory; MLFLOW_TRACKING_URI or
`tracking.uri` overrides it (an `mlflow server` for clusters). A resumed run passes the run id
stored in its checkpoint and continues the same MLflow run.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from tcscale.config import TrainConfig, config_to_dict, flatten

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def resolve_tracking_uri(cfg: TrainConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_tracking_uri(cfg)


def default_tracking_uri(cfg: TrainConfig) -> str:
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


RUN_INFO = "run.json"  # <output_dir>/run.json: the MLflow run of a training run, for evaluations to nest under


def write_run_info(out_dir: Path, run_id: str, uri: str, experiment: str) -> None:
    """<output_dir>/run.json (temp name, then rename): {"mlflow_run_id", "tracking_uri", "experiment"}."""
    import json

    path = Path(out_dir) / RUN_INFO
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri, "experiment": experiment}, indent=1))
    os.replace(tmp, path)


def read_run_info(run_dir: str | os.PathLike) -> dict[str, str]:
    """The run.json of a training run directory; a missing one raises FileNotFoundError naming the path."""
    import json

    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run.json (was the run tracked with MLflow?)")
    return json.loads(path.read_text())


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"version.python": platform.python_version()}
    for package in ("torch", "deepspeed", "diffusers", "transformers"):
        try:
            out[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            out[f"version.{package}"] = "not installed"
    return out


class NullTracker:
    """Tracker of non-zero ranks and of runs with tracking disabled: does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: Any, artifact_file: str) -> None:
        pass

    def log_dict(self, data: dict, artifact_file: str) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class Tracker(NullTracker):
    """An MLflow run: created, or continued when `run_id` is given (resume)."""

    def __init__(self, cfg: TrainConfig, world_size: int, run_id: str | None = None):
        import mlflow

        self.mlflow = mlflow
        uri = resolve_tracking_uri(cfg)
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
            # the default local sqlite store keeps artifacts in the run directory too (not ./mlruns of the cwd)
            local = uri == default_tracking_uri(cfg)
            artifacts = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri() if local else None
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self.client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
            )
            tags = {"mlflow.runName": cfg.run_name, "git_commit": git_commit(), "world_size": str(world_size)}
            tags.update(versions())
            run = self.client.create_run(exp_id, run_name=cfg.run_name, tags=tags)
            self.run_id = run.info.run_id
            params = {k: str(v)[:MAX_PARAM_CHARS] for k, v in flatten(config_to_dict(cfg)).items()}
            items = list(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "resumed_world_size", str(world_size))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_image(self, image: Any, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def build_tracker(cfg: TrainConfig, is_rank0: bool, world_size: int, run_id: str | None) -> NullTracker:
    if not (cfg.tracking.enabled and is_rank0):
        return NullTracker()
    return Tracker(cfg, world_size, run_id)


class EvalRun(NullTracker):
    """The MLflow run of one evaluation, nested under a training run when its id is given (`mlflow.parentRunId`),
    in that run's experiment unless another is named."""

    def __init__(
        self,
        uri: str,
        run_name: str,
        *,
        experiment: str | None = None,
        parent_run_id: str | None = None,
        params: dict[str, Any] | None = None,
    ):
        import mlflow
        from mlflow.entities import Param

        self.client = mlflow.MlflowClient(tracking_uri=uri)
        exp_id = None
        if experiment is None and parent_run_id is not None:
            exp_id = self.client.get_run(parent_run_id).info.experiment_id
        if exp_id is None:
            name = experiment or "tcscale-eval"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        tags = {"mlflow.runName": run_name, "git_commit": git_commit(), "kind": "evaluation", **versions()}
        if parent_run_id is not None:
            tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in (params or {}).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    log_metrics = Tracker.log_metrics
    log_image = Tracker.log_image
    log_dict = Tracker.log_dict
    end = Tracker.end

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
