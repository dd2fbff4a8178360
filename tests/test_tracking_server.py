"""Tracking against a real `mlflow server` on loopback (the cluster set-up), started and stopped by the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcscale.config import load_config
from tcscale.train.trainer import train

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def test_run_logs_metrics_and_images_to_server(mlflow_server, tmp_path):
    import mlflow

    cfg = load_config(
        CONFIG,
        [
            f"output_dir={tmp_path / 'run'}",
            "max_steps=2",
            "checkpoint.every_steps=0",
            f"tracking.uri={mlflow_server.url}",
            "validation.every_steps=2",
            "validation.num_inference_steps=2",
        ],
    )
    result = train(cfg)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["objective.name"] == "tokencompose"
    for metric in ("loss/ldm", "loss/token", "loss/pixel"):
        assert [m.step for m in client.get_metric_history(result.run_id, metric)] == [1, 2]
    files = [a.path for a in client.list_artifacts(result.run_id, "validation/step000002")]
    assert "validation/step000002/prompt0_attention.png" in files
    assert not (tmp_path / "run" / "mlflow.db").exists()  # the server, not the local default, got the run
