"""The fault suite: each probe of issue #14 as a careful user would try it, asserting the message, the exit code,
what is on disk and the MLflow run status. In-process where one rank shows the behaviour (the launcher's `main`,
so exit codes are the real ones), through the real launcher on 2 ranks where ranks matter.

CI runs as root, which ignores file permissions: the unwritable-output probes use paths that cannot be
directories (a path under a regular file), which take the same code path as a permission error (an OSError
on the probe write, reported with its strerror).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import launch

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny_cpu.yaml"


@pytest.fixture(scope="module")
def train_main():
    spec = importlib.util.spec_from_file_location("train_launcher", REPO / "launchers" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_main(train_main, run: Path, *overrides: str) -> int:
    return train_main(["--config", CONFIG, f"output_dir={run}", "max_steps=2", "checkpoint.every_steps=0", *overrides])


def runs_of(run_dir: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tcscale-tiny")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


# -- diverging runs -----------------------------------------------------------------------------------
def test_exploding_lr_names_step_and_term_before_bce_sees_nan(train_main, tmp_path, capsys):
    run = tmp_path / "run"
    code = run_main(train_main, run, "max_steps=4", "checkpoint.every_steps=1", "deepspeed.optimizer.params.lr=1e30")
    err = capsys.readouterr().err
    assert code == 3, err
    assert "non-finite loss at step 2" in err and "term(s)" in err and "binary_cross_entropy" not in err
    assert len([x for x in err.splitlines() if "non-finite" in x]) == 1 and "Traceback" not in err  # one line
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    assert ckpts == ["step1"]  # the diverged step is never saved
    _, runs = runs_of(run)
    assert runs[0].info.status == "FAILED" and "NonFiniteLossError" in runs[0].data.tags["failure_reason"]


def test_overflowing_loss_weight_is_named_before_any_update(train_main, tmp_path, capsys):
    run = tmp_path / "run"
    code = run_main(train_main, run, "objective.tokencompose.token_loss_weight=1e39", "checkpoint.every_steps=1")
    err = capsys.readouterr().err
    assert code == 3 and "step 1" in err and "weighted total is inf although every term is finite" in err, err
    assert not any(p.name.startswith("step") for p in (run / "checkpoints").iterdir())


# -- bad input, before any model loads ------------------------------------------------------------------
def test_deepspeed_section_is_type_checked_at_load(train_main, tmp_path, capsys):
    t0 = time.perf_counter()
    code = run_main(train_main, tmp_path / "run", "deepspeed.train_micro_batch_size_per_gpu=abc")
    err = capsys.readouterr().err
    assert code == 2 and "deepspeed.train_micro_batch_size_per_gpu='abc' must be an integer" in err
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "run").exists()
    assert run_main(train_main, tmp_path / "r2", "deepspeed.zero_optimization.stagee=2") == 2
    assert "deepspeed.zero_optimization.stagee" in capsys.readouterr().err


def test_missing_shards_fail_before_models_and_leave_no_run(train_main, tmp_path, capsys, monkeypatch):
    from tcscale.train import trainer

    def no_models(*a, **k):
        raise AssertionError("models were loaded before the data path was checked")

    monkeypatch.setattr(trainer, "load_components", no_models)
    run = tmp_path / "run"
    code = run_main(train_main, run, "data.source=webdataset", f"data.shards={tmp_path}/none-{{000000..000003}}.tar")
    err = capsys.readouterr().err
    assert code == 2 and "matches no file" in err and "data.shards" in err
    _, runs = runs_of(run)
    assert runs == []  # no MLflow run left RUNNING


def test_unwritable_output_is_one_line_naming_the_folder(train_main, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert run_main(train_main, blocker / "run") == 2
    err = capsys.readouterr().err
    assert "output_dir: cannot write in" in err and str(blocker / "run") in err and "Traceback" not in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoints folder goes")
    assert run_main(train_main, run) == 2
    assert f"cannot write in {run / 'checkpoints'}" in capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.slow
def test_unwritable_output_on_two_ranks_has_no_cross_rank_noise(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = subprocess.run(
        launch.deepspeed_cmd(2, CONFIG, [f"output_dir={blocker / 'run'}", "max_steps=2"]),
        cwd=REPO, env=launch.clean_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and "output_dir: cannot write in" in lines[0], proc.stderr[-3000:]
    assert "DistNetworkError" not in proc.stderr and "Traceback" not in proc.stderr


# -- interrupted runs ---------------------------------------------------------------------------------
def test_stale_temp_checkpoint_replayed_metrics_and_preempted_marker(train_main, tmp_path, capsys):
    """What a SIGKILL during a save leaves (tmp-step4, PREEMPTED, metrics logged past the last checkpoint) is
    cleaned up by the resumed run: tmp removed at start-up, each step logged once, PREEMPTED gone at the end."""
    run = tmp_path / "run"
    assert run_main(train_main, run, "max_steps=5", "checkpoint.every_steps=3", "checkpoint.save_final=false") == 0
    (run / "checkpoints" / "tmp-step4").mkdir()
    (run / "checkpoints" / "tmp-step4" / "half_written.pt").write_bytes(b"\0" * 16)
    (run / "PREEMPTED").write_text("step 4\n")
    capsys.readouterr()
    assert run_main(train_main, run, "max_steps=6", "checkpoint.every_steps=2", "resume=latest") == 0
    out = capsys.readouterr().out
    assert "removed tmp-step4" in out and "steps 4..5 were logged before the interruption" in out
    assert not (run / "checkpoints" / "tmp-step4").exists() and not (run / "PREEMPTED").exists()
    client, runs = runs_of(run)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/ldm")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]


def _kill_then_resume(launch, run: Path, overrides: list[str], kill_at: int) -> None:
    cmd_env = launch.clean_env()
    cmd = [os.sys.executable, "launchers/train.py", "--config", CONFIG, f"output_dir={run}", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cmd_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f"step {kill_at}/" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert f"step {kill_at}/" in "".join(seen), "".join(seen)[-3000:]
    done = subprocess.run([*cmd, "resume=latest"], cwd=REPO, env=cmd_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_sigkill_at_a_random_step_reaches_the_uninterrupted_weights(tmp_path):
    common = ["max_steps=10", "checkpoint.every_steps=2", "checkpoint.keep_last=10", "tracking.enabled=false"]
    ref = tmp_path / "ref"
    proc = subprocess.run([os.sys.executable, "launchers/train.py", "--config", CONFIG, f"output_dir={ref}", *common],
                          cwd=REPO, env=launch.clean_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = launch.final_weights(ref)
    for seed in (0, 1, 2):
        kill_at = random.Random(seed).randint(3, 9)
        run = tmp_path / f"kill{seed}"
        _kill_then_resume(launch, run, common, kill_at)
        got = launch.final_weights(run)
        for k in expected:
            torch.testing.assert_close(
                got[k], expected[k], rtol=0, atol=1e-6, msg=lambda m, k=k, s=seed: f"{k} (seed {s}): {m}"
            )


@pytest.mark.distributed
@pytest.mark.slow
def test_sigusr1_to_the_deepspeed_launcher_checkpoints_and_stops_the_ranks(tmp_path):
    run = tmp_path / "run"
    cmd = launch.deepspeed_cmd(2, CONFIG, [f"output_dir={run}", "max_steps=300", "checkpoint.every_steps=0"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "step 2/300" in line:
                os.kill(proc.pid, signal.SIGUSR1)  # the launcher's pid, not the ranks'
                break
        out.extend(proc.stdout)  # the ranks' output goes on until they exit
        proc.wait(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = "".join(out)
    assert (run / "PREEMPTED").is_file(), text[-3000:]
    step = int((run / "PREEMPTED").read_text().split()[1])
    assert 2 <= step < 300 and (run / "checkpoints" / "latest").read_text() == f"step{step}"
    assert "launcher process" in text and "is gone" in text
    _, runs = runs_of(run)
    assert runs[0].info.status == "KILLED"
    time.sleep(1)
    alive = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split()
    assert not alive, "ranks outlived their launcher"


# -- untrusted files ----------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_checkpoints_load_weights_only_unless_opted_in(train_main, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(train_main, run) == 0
    marker = tmp_path / "pwned"
    states = run / "checkpoints" / "step2" / "mp_rank_00_model_states.pt"
    good = torch.load(states, map_location="cpu", weights_only=True)
    torch.save({**good, "payload": _RunsCode(marker)}, states)
    from tcscale.train.checkpoint import write_manifest

    write_manifest(states.parent)  # as whoever hands you the file would: it passes the completeness check
    # export refuses, naming the file and the opt-in; the payload never runs
    from tcscale.train.export import export_pipeline
    from tcscale.train.safe_load import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states\.pt.*allow_unsafe_load"):
        export_pipeline(run, tmp_path / "export")
    spec = importlib.util.spec_from_file_location("export_launcher", REPO / "launchers" / "export.py")
    export_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_cli)
    capsys.readouterr()
    assert export_cli.main(["--run-dir", str(run), "--out", str(tmp_path / "export")]) == 2
    assert "--allow-unsafe-load" in capsys.readouterr().err
    # resume refuses too
    assert run_main(train_main, run, "max_steps=3", "resume=latest") == 2
    assert "cannot be loaded weights-only" in capsys.readouterr().err
    assert not marker.exists()


def test_safe_load_opt_in_and_the_dataprep_checkpoint(tmp_path):
    import argparse
    import warnings

    from dataprep.stages.common import StageError
    from dataprep.stages.grounding import _torch_load_checkpoint
    from tcscale.train.safe_load import UnsafeCheckpointError, safe_torch_load

    path = tmp_path / "groundingdino_like.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4)}, path)  # as official ckpts do
    with pytest.raises(UnsafeCheckpointError), safe_torch_load():
        torch.load(path)
    with pytest.raises(StageError, match=r"grounding\.allow_unsafe_load"):
        _torch_load_checkpoint(str(path), "grounding.detector_checkpoint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = _torch_load_checkpoint(str(path), "grounding.detector_checkpoint", allow_unsafe=True)
    assert torch.equal(state["model"]["w"], torch.ones(2)) and any(
        "weights_only=False" in str(w.message) for w in caught
    )
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, plain)
    assert torch.equal(_torch_load_checkpoint(str(plain), "k")["model"]["w"], torch.zeros(1))
    assert pickle.loads(pickle.dumps(1)) == 1


# -- tracking server failure ----------------------------------------------------------------------------
@pytest.mark.slow
def test_tracking_server_dying_mid_run_does_not_stop_training(tmp_path, mlflow_server):
    env = launch.clean_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0")
    run = tmp_path / "run"
    cmd = [os.sys.executable, "launchers/train.py", "--config", CONFIG, f"output_dir={run}",
           f"tracking.uri={mlflow_server.url}", "max_steps=6", "checkpoint.every_steps=3"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "step 2/6" in line:
            mlflow_server.stop()
    assert proc.wait(timeout=600) == 0, "".join(out)[-3000:]
    text = "".join(out)
    assert "MLflow: logging metrics of step" in text and "training goes on" in text
    assert text.count("MLflow: logging metrics") == 1  # one warning, not one per step
    assert (run / "checkpoints" / "step6").is_dir()
    # back up: the run is there with what reached it, and a resumed training continues it
    mlflow_server.start()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    run_id = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    assert {m.step for m in client.get_metric_history(run_id, "loss/ldm")} >= {1, 2}
    again = subprocess.run([*cmd[:-2], "max_steps=8", "checkpoint.every_steps=3", "resume=latest"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {7, 8} <= {m.step for m in client.get_metric_history(run_id, "loss/ldm")}


def test_pipe_shards_and_unsafe_loading_are_documented():
    """`data.shards='pipe:...'` runs a shell command (webdataset): said where users look, with what is safe to load."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## When things go wrong") : readme.index("## Layout")]
    assert "pipe:" in section and "shell" in section and "weights_only=True" in section
    assert "pipe:" in (REPO / "tcscale" / "data" / "config.py").read_text()
