"""Scale-out under a real single-node Slurm cluster: the eval array (launchers/slurm/eval_array.sh: N array tasks
of eval.sbatch plus the merge job), and train.sbatch's multi-node branch (one torchrun launcher per "node").

Skips without Slurm (.ci/install_slurm.sh installs it). Two "nodes" are two launchers on the one machine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.slurm import STANDIN, SlurmCluster, find_program, job_env, sbatch_args, wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
EVAL_ARRAY = REPO / "launchers" / "slurm" / "eval_array.sh"
EVAL_WAIT_S = 420  # 2 array tasks (import, export, generate) then the merge, on a 2-core machine


def eval_env(cluster: SlurmCluster, tmp_path: Path) -> dict[str, str]:
    env = dict(cluster.env, TCSCALE_ROOT=str(REPO), TCSCALE_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.update(
        TCSCALE_EVAL_WAIT="1",  # eval_array.sh waits for the merge and exits with its status
        TCSCALE_SBATCH_ARGS=f"--ntasks=1 --cpus-per-task=1 --time=10 --output={tmp_path}/slurm-%j.out",
        PATH=f"{Path(find_program('sbatch') or 'sbatch').parent}:{env.get('PATH', '')}",
    )
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MAX", "TCSCALE_EVAL_SHARDS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    return env


def submit_eval(cluster: SlurmCluster, tmp_path: Path, overrides: list[str]) -> str:
    res = cluster.run(
        "bash", str(EVAL_ARRAY), "2", "configs/eval/tiny_cpu.yaml", *overrides,
        env=eval_env(cluster, tmp_path), timeout=EVAL_WAIT_S, check=False, cwd=REPO,
    )  # fmt: skip
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in tmp_path.glob("slurm-*.out"))
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{logs}\n{cluster.logs()}"
    return res.stdout


def test_eval_array_completes_merges_into_mlflow_and_a_rerun_generates_nothing(slurm_cluster, tmp_path, tiny_config):
    from tcscale.train.trainer import train
    from tests.helpers.launch import mlflow_runs

    run, out = tmp_path / "run", tmp_path / "eval"
    train(tiny_config(run, "max_steps=1"))
    overrides = [f"model.run_dir={run}", f"output_dir={out}", "sampler.num_inference_steps=2", "sampler.batch_size=2",
                 "synthetic.num_prompts=2", "grounding.num_samples=4"]  # fmt: skip
    t0 = time.monotonic()
    printed = submit_eval(slurm_cluster, tmp_path, overrides)
    first_s = time.monotonic() - t0
    assert "(2 tasks), merge" in printed

    assert sorted(p.name for p in (out / "shards").iterdir()) == ["rank0-of2.json", "rank1-of2.json"]
    results = json.loads((out / "results.json").read_text())
    items = {}
    for suite in ("synthetic_k2", "synthetic_k3"):
        keys = [json.loads(line)["key"] for line in (out / suite / "items.jsonl").read_text().splitlines()]
        assert sorted(p.stem for p in (out / suite / "images").glob("*.png")) == sorted(keys)
        items[suite] = keys
    assert sum(len(v) for v in items.values()) == 2 * 2 * 2  # 2 prompts x 2 rounds, k = 2 and 3
    assert "grounding/miou" in results["metrics"] and "synthetic/k2/all_objects" in results["metrics"]
    mtimes = {p: p.stat().st_mtime_ns for suite in items for p in (out / suite / "images").glob("*.png")}

    # the merge logged under the training run, like a one-job evaluation
    parent = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    client, runs = mlflow_runs(run, "tcscale-tiny")
    evals = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(evals) == 1 and evals[0].info.status == "FINISHED"
    assert evals[0].data.metrics["grounding/miou"] == pytest.approx(results["metrics"]["grounding/miou"])

    t0 = time.monotonic()
    submit_eval(slurm_cluster, tmp_path, overrides)  # the same command again: every image is on disk
    again = json.loads((out / "results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # no image rewritten
    for suite in items:
        assert again["details"]["counts"][suite]["generated"] == 0, again["details"]
        assert again["details"]["counts"][suite]["existing"] == 4, again["details"]["counts"]
    assert again["metrics"] == pytest.approx(results["metrics"])
    print(f"eval array of 2 + merge: {first_s:.1f} s; rerun {time.monotonic() - t0:.1f} s")


def test_a_merge_names_the_unfinished_array_task(tmp_path):
    """No cluster needed: the merge of an array whose task 0 never finished."""
    import subprocess

    out = tmp_path / "eval"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "rank1-of2.json").write_text("{}")
    res = subprocess.run(
        [sys.executable, "launchers/eval.py", "--config", "configs/eval/tiny_cpu.yaml", "--merge",
         "model.run_dir=null", f"model.pretrained={tmp_path / 'unused'}", f"output_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "array task(s) [0] of 2 have not finished" in res.stderr.strip().splitlines()[-1]


def test_sbatch_multi_node_branch_runs_one_torchrun_per_node(slurm_cluster, tmp_path):
    """TCSCALE_LAUNCH=torchrun (what more than one node selects), two launchers on the one node as two nodes."""
    entry = tmp_path / "standin.py"
    entry.write_text(STANDIN)
    env = job_env(slurm_cluster, tmp_path, entry, TCSCALE_LAUNCH="torchrun", TCSCALE_LAUNCHERS_PER_NODE="2",
                  TCSCALE_SHUTDOWN_S="20", RDZV_TIMEOUT="60")  # fmt: skip
    res = slurm_cluster.run(*sbatch_args(tmp_path, "--wait"), "configs/some.yaml", "a=1", env=env, timeout=120,
                            check=False)  # fmt: skip
    job_id = res.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job_id}.out"
    text = log.read_text(errors="replace") if log.is_file() else ""
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{text[-4000:]}"
    assert "launch torchrun" in text
    records = [json.loads((tmp_path / f"started.0.rank{r}.json").read_text()) for r in range(2)]
    assert sorted(rec["env"]["NODE_RANK"] for rec in records) == ["0", "1"]  # one launcher per srun task
    for rec in records:
        e = rec["env"]
        assert e["WORLD_SIZE"] == "2" and e["LOCAL_RANK"] == "0" and e["LOCAL_WORLD_SIZE"] == "1"
        assert rec["all_reduce"] == 3.0  # the two "nodes" met in one process group
        assert rec["argv"] == ["--config", "configs/some.yaml", "a=1"]


def test_sbatch_rejects_an_unknown_launch_mode(slurm_cluster, tmp_path):
    entry = tmp_path / "standin.py"
    entry.write_text(STANDIN)
    env = job_env(slurm_cluster, tmp_path, entry, TCSCALE_LAUNCH="mpirun")
    res = slurm_cluster.run(*sbatch_args(tmp_path, "--wait"), "configs/some.yaml", env=env, timeout=60, check=False)
    job_id = res.stdout.strip().split(";")[0]
    wait_for("the job log", lambda: (tmp_path / f"slurm-{job_id}.out").is_file(), cluster=slurm_cluster)
    assert res.returncode != 0
    text = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "TCSCALE_LAUNCH=mpirun: expected srun, torchrun or auto" in text
