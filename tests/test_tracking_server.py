"""Tracking against a real `mlflow server` on loopback (the cluster set-up), started and stopped by the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tcscale.config import load_config
from tcscale.train.trainer import train
from tests.helpers.launch import free_port

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow server did not come up")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker children
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_run_logs_metrics_and_images_to_server(mlflow_server, tmp_path):
    import mlflow

    cfg = load_config(
        CONFIG,
        [
            f"output_dir={tmp_path / 'run'}",
            "max_steps=2",
            "checkpoint.every_steps=0",
            f"tracking.uri={mlflow_server}",
            "validation.every_steps=2",
            "validation.num_inference_steps=2",
        ],
    )
    result = train(cfg)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["objective.name"] == "tokencompose"
    for metric in ("loss/ldm", "loss/token", "loss/pixel"):
        assert [m.step for m in client.get_metric_history(result.run_id, metric)] == [1, 2]
    files = [a.path for a in client.list_artifacts(result.run_id, "validation/step000002")]
    assert "validation/step000002/prompt0_attention.png" in files
    assert not (tmp_path / "run" / "mlflow.db").exists()  # the server, not the local default, got the run
