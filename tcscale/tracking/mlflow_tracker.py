"""MLflow tracking on global rank 0: params, per-step metrics, tags, images.

The default tracking URI is a sqlite database in the run directory; MLFLOW_TRACKING_URI or
`tracking.uri` overrides it (an `mlflow server` for clusters). A resumed run passes the run id
stored in its checkpoint and continues the same MLflow run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import warnings
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

    def log_image(
        self, image: Any, artifact_file: str | None = None, *, key: str | None = None, step: int | None = None
    ) -> None:
        pass

    def log_dict(self, data: dict, artifact_file: str) -> None:
        pass

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        pass


# A tracking server that stops answering must not stop training: few, short retries per call (MLflow's defaults
# retry for minutes), then the call is given up with a warning and its metrics are kept for the next call.
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
MAX_PENDING_METRICS = 100_000  # metric values kept for retry while the server is unreachable; then the oldest go
RETRY_AFTER_S = 30.0  # after a failed call, metrics are only kept (no call, no waiting) for this long


class Tracker(NullTracker):
    """An MLflow run: created, or continued when `run_id` is given (resume).

    Resilient: a tracking server that is down at start or stops answering mid-run never stops training. The first
    failure logs one warning; metrics are kept (at most MAX_PENDING_METRICS values, the oldest dropped with a
    warning) and the server is tried again at most every RETRY_AFTER_S seconds; when it answers, the run is created
    (or continued) and everything kept is sent, and one line says so. Images and dicts of a failed call are dropped.
    A resumed run does not log again the steps the interrupted run had already logged (the replayed steps are the
    same computation, so MLflow keeps one value per step), and its `failure_reason` tag is removed.
    `run_id` is None until the run exists; `on_created(run_id)` is called then (the trainer writes run.json).
    """

    def __init__(self, cfg: TrainConfig, world_size: int, run_id: str | None = None, on_created=None):
        for key, value in CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        import mlflow

        self.mlflow = mlflow
        self.cfg = cfg
        self.world_size = world_size
        self.uri = resolve_tracking_uri(cfg)
        self.client = None  # made on first contact: a sqlite store is opened (and can fail) when the client is made
        self.pending: list = []
        self.failures = 0
        self.retry_at = 0.0  # monotonic time before which no call is made (after a failure)
        self.logged_until = 0  # steps <= this were logged by an earlier attempt of this run
        self.resume_id = run_id  # the run to continue (None: create one)
        self.run_id: str | None = None
        self.on_created = on_created
        self._connect()

    def _connect(self) -> bool:
        """The run exists on the server (created or continued now if needed); False while it is unreachable."""
        if self.run_id is not None:
            return True
        if not self._call(f"reaching the tracking server {self.uri}", self._start_run):
            return False
        if self.on_created is not None:
            self.on_created(self.run_id)
        return True

    def _start_run(self) -> None:
        if self.client is None:
            self.client = self.mlflow.MlflowClient(tracking_uri=self.uri)
        cfg, client = self.cfg, self.client
        if self.resume_id is not None:
            client.update_run(self.resume_id, status="RUNNING")
            client.set_tag(self.resume_id, "resumed_world_size", str(self.world_size))
            if "failure_reason" in client.get_run(self.resume_id).data.tags:  # an earlier attempt's: not this one's
                client.delete_tag(self.resume_id, "failure_reason")
            self.logged_until = self._last_logged_step(self.resume_id)
            self.pending = [m for m in self.pending if m.step > self.logged_until]
            self.run_id = self.resume_id
            return
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        # the default local sqlite store keeps artifacts in the run directory too (not ./mlruns of the cwd)
        local = self.uri == default_tracking_uri(cfg)
        artifacts = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri() if local else None
        exp_id = (
            exp.experiment_id
            if exp is not None
            else client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
        )
        tags = {"mlflow.runName": cfg.run_name, "git_commit": git_commit(), "world_size": str(self.world_size)}
        tags.update(versions())
        run_id = client.create_run(exp_id, run_name=cfg.run_name, tags=tags).info.run_id
        params = {k: str(v)[:MAX_PARAM_CHARS] for k, v in flatten(config_to_dict(cfg)).items()}
        items = list(params.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
        self.run_id = run_id

    def _last_logged_step(self, run_id: str) -> int:
        latest = 0
        for key in self.client.get_run(run_id).data.metrics:
            history = self.client.get_metric_history(run_id, key)
            latest = max([latest, *(m.step for m in history)])
        return latest

    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        import time

        if time.monotonic() < self.retry_at:
            return False  # the server failed moments ago: keep the metrics, do not wait on it again yet
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracking failure is reported, never fatal
            self.failures += 1
            self.retry_at = time.monotonic() + RETRY_AFTER_S
            if self.failures == 1 or self.failures % 100 == 0:
                warnings.warn(
                    f"MLflow: {what} failed ({type(exc).__name__}: {str(exc)[:200]}); training goes on, "
                    f"{len(self.pending)} metric values kept for retry (failure {self.failures})",
                    stacklevel=3,
                )
            return False
        if self.failures:
            warnings.warn(f"MLflow reachable again after {self.failures} failed call(s)", stacklevel=3)
            self.failures = 0
        return True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        if step <= self.logged_until:
            return  # replayed after a resume: the interrupted attempt logged this step already
        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self.pending) > MAX_PENDING_METRICS:
            dropped = len(self.pending) - MAX_PENDING_METRICS
            self.pending = self.pending[dropped:]
            warnings.warn(f"MLflow unreachable: dropped the {dropped} oldest metric values", stacklevel=2)
        self._flush(f"logging metrics of step {step}")

    def _flush(self, what: str) -> bool:
        if not self._connect():
            return False
        batch = self.pending
        for i in range(0, len(batch), 1000):  # MLflow accepts at most 1000 metrics per batch
            if not self._call(what, self.client.log_batch, self.run_id, metrics=batch[i : i + 1000]):
                self.pending = batch[i:]
                return False
        self.pending = []
        return True

    def log_image(
        self, image: Any, artifact_file: str | None = None, *, key: str | None = None, step: int | None = None
    ) -> None:
        """An image as an artifact file, or (`key`, `step`) as one step of an image series: MLflow's run page shows a
        series with a step slider (its images tab / the artifact viewer's `images/` folder)."""
        if not self._connect():
            return
        if key is not None:
            self._call(f"logging image {key} at step {step}", self.client.log_image, self.run_id, image, key=key,
                       step=step)  # fmt: skip
        else:
            self._call(
                f"logging {artifact_file}", self.client.log_image, self.run_id, image, artifact_file=artifact_file
            )

    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self._connect():
            self._call(f"logging {artifact_file}", self.client.log_dict, self.run_id, data, artifact_file)

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        self.retry_at = 0.0  # the last chance: try once more whatever happened moments ago
        if not self._connect():
            warnings.warn(f"MLflow: the tracking server {self.uri} never answered: this run has no MLflow run and "
                          f"its {len(self.pending)} metric values were not sent", stacklevel=2)  # fmt: skip
            return
        if self.pending and not self._flush("sending the last metrics"):
            warnings.warn(f"MLflow: {len(self.pending)} metric values could not be sent", stacklevel=2)
        if reason:
            self._call("tagging the failure", self.client.set_tag, self.run_id, "failure_reason", reason[:5000])
        self._call(f"marking the run {status}", self.client.set_terminated, self.run_id, status=status)


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
        self.uri = uri
        self.pending: list = []
        self.failures = 0
        self.retry_at = 0.0
        self.logged_until = -1
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

    def _connect(self) -> bool:
        return True  # the evaluation's run is created in __init__ (an unreachable server fails the evaluation)

    _call = Tracker._call
    _flush = Tracker._flush
    log_metrics = Tracker.log_metrics
    log_image = Tracker.log_image
    log_dict = Tracker.log_dict
    end = Tracker.end

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(f"logging {path}", self.client.log_artifact, self.run_id, str(path), artifact_path)


def build_tracker(
    cfg: TrainConfig, is_rank0: bool, world_size: int, run_id: str | None, on_created=None
) -> NullTracker:
    if not (cfg.tracking.enabled and is_rank0):
        return NullTracker()
    return Tracker(cfg, world_size, run_id, on_created)


def mark_failed(run_dir: Path, reason: str) -> None:
    """Mark the MLflow run of `<run_dir>/run.json` FAILED with `failure_reason` (a resume that failed before its
    tracker existed); silently nothing when there is no run.json or the server does not answer."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import mlflow

        info = read_run_info(run_dir)
        client = mlflow.MlflowClient(tracking_uri=info["tracking_uri"])
        client.set_tag(info["mlflow_run_id"], "failure_reason", reason[:5000])
        client.set_terminated(info["mlflow_run_id"], status="FAILED")
    except Exception:  # noqa: BLE001 - reporting a failure must not hide it
        pass
