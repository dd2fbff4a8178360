"""Tracking against a real `mlflow server` on loopback (the cluster set-up), started and stopped by the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcscale.config import load_config
from tcscale.train.trainer import train
from tests.helpers import launch
from tests.helpers.launch import image_series

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
    files = [a.path for a in client.list_artifacts(result.run_id, "images")]
    assert ("validation/prompt0_attention", 2) in image_series(files)
    assert not (tmp_path / "run" / "mlflow.db").exists()  # the server, not the local default, got the run


def rest(url: str, endpoint: str, **params) -> dict:
    """GET one endpoint of MLflow's REST API."""
    import json
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{query}", timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.distributed
def test_lab_server_takes_a_two_rank_run_and_its_nested_evaluation_then_stops_every_process(mlflow_server, tmp_path):
    """launchers/mlflow_server.sh (the fixture starts it), clients through MLFLOW_TRACKING_URI only."""
    import json
    import os

    assert mlflow_server.processes(), "the server's session holds its processes while it runs"
    run, out = tmp_path / "run", tmp_path / "eval"
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url  # the ranks and the eval inherit it (clean_env keeps it)
    try:
        launch.run_deepspeed(2, "configs/tiny_cpu.yaml", [
            f"output_dir={run}", "max_steps=2", "checkpoint.every_steps=2", "validation.every_steps=2",
            "validation.num_inference_steps=2"])  # fmt: skip
        launch.run_deepspeed(1, "configs/eval/tiny_cpu.yaml", [
            f"model.run_dir={run}", f"output_dir={out}", "sampler.num_inference_steps=2", "synthetic.num_prompts=2",
            "grounding.num_samples=4"], script="launchers/eval.py")  # fmt: skip
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert not (run / "mlflow.db").exists() and not (out / "mlflow.db").exists()  # the server got everything

    experiments = rest(mlflow_server.url, "experiments/search", max_results=100)["experiments"]
    ids = [e["experiment_id"] for e in experiments if e["name"] == "tcscale-tiny"]
    assert len(ids) == 1
    from urllib.request import Request, urlopen

    body = json.dumps({"experiment_ids": ids, "max_results": 100}).encode()
    with urlopen(Request(f"{mlflow_server.url}/api/2.0/mlflow/runs/search", body,
                         {"Content-Type": "application/json"}), timeout=30) as resp:  # fmt: skip
        runs = json.loads(resp.read())["runs"]
    parent = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    assert tags[parent]["world_size"] == "2"
    nested = [rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == parent]
    assert len(nested) == 1  # the evaluation, nested under the training run
    history = rest(mlflow_server.url, "metrics/get-history", run_id=parent, metric_key="loss/token")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2]
    files = rest(mlflow_server.url, "artifacts/list", run_id=parent, path="images").get("files", [])
    assert ("validation/prompt0_attention", 2) in image_series(f["path"] for f in files)
    results = json.loads((out / "results.json").read_text())
    ev = [r for r in runs if r["info"]["run_id"] == nested[0]][0]
    logged = {m["key"]: m["value"] for m in ev["data"]["metrics"]}
    assert logged["grounding/miou"] == pytest.approx(results["metrics"]["grounding/miou"])
    assert {"results.json", "table.md"} <= {f["path"] for f in rest(mlflow_server.url, "artifacts/list",
                                                                    run_id=nested[0]).get("files", [])}  # fmt: skip

    mlflow_server.stop()
    assert mlflow_server.processes() == []  # the script's server and every worker it started are gone
