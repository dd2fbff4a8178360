"""The fault suite, wave three (issue #32): a corrupt latest checkpoint, a full disk during a save, SIGTERM, a
tracking server that is down, two runs on one output directory, `resume=latest` with nothing to resume. Each probe
as a user meets it: the launcher's `main` in-process where one rank shows the behaviour (exit codes are the real
ones), the real `deepspeed` launcher on 2 ranks for the signal. Tiny model, 2-5 steps each.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import socket
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
    spec = importlib.util.spec_from_file_location("train_launcher_recovery", REPO / "launchers" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_main(train_main, run: Path, *overrides: str) -> int:
    return train_main(["--config", CONFIG, f"output_dir={run}", "max_steps=2", "checkpoint.every_steps=0", *overrides])


def mlflow_run(run_dir: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tcscale-tiny")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def one_line(err: str, needle: str) -> str:
    lines = [x for x in err.splitlines() if needle in x]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# -- corrupt checkpoints --------------------------------------------------------------------------------
@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_newest_complete_one(train_main, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(train_main, run, "max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=3") == 0
    ckpt = run / "checkpoints"
    shard = ckpt / "step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # what a node dying mid-write leaves
    capsys.readouterr()

    # named explicitly: refused, the file named, exit 2; the MLflow run it was to continue records why
    assert run_main(train_main, run, "max_steps=5", f"resume={ckpt / 'step4'}") == 2
    line = one_line(capsys.readouterr().err, "error:")
    assert "CheckpointError" in line and str(shard) in line and "the save wrote" in line
    failed = mlflow_run(run)
    assert failed.info.status == "FAILED" and str(shard) in failed.data.tags["failure_reason"]

    # resume=latest: one line naming the file, resumes from step2, the broken one kept aside
    assert run_main(train_main, run, "max_steps=5", "resume=latest") == 0
    out = capsys.readouterr().out
    note = one_line(out, "resume=latest: checkpoint")
    assert str(shard) in note and "resuming from step2" in note and "corrupt-step4" in note
    assert "resumed from" in out and "at step 2" in out
    assert (ckpt / "corrupt-step4").is_dir() and (ckpt / "latest").read_text() == "step5"
    finished = mlflow_run(run)  # the same run, finished, its earlier failure_reason gone
    assert finished.info.status == "FINISHED" and "failure_reason" not in finished.data.tags


def test_no_loadable_checkpoint_is_exit_2_and_a_damaged_record_is_named(train_main, tmp_path, capsys):
    from tcscale.train.checkpoint import MANIFEST, check_complete

    run = tmp_path / "run"
    assert run_main(train_main, run, "max_steps=2", "checkpoint.every_steps=2") == 0
    states = run / "checkpoints" / "step2" / "mp_rank_00_model_states.pt"
    manifest = json.loads((states.parent / MANIFEST).read_text())["files"]
    assert manifest[states.name] == states.stat().st_size and check_complete(states.parent) is None
    good = states.read_bytes()
    states.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    assert run_main(train_main, run, "max_steps=3", "resume=latest") == 2
    line = one_line(capsys.readouterr().err, "error:")
    assert "no loadable checkpoint" in line and str(states) in line
    # the same size, a damaged record: passes the cheap check, then its load names it (exit 2, no traceback)
    assert (run / "checkpoints" / "step2").is_dir()  # nothing is moved when there is nothing to fall back to
    # the same size, a damaged tensor record (torch.load would read it as NaN weights): its CRC-32 names it
    damaged = bytearray(good)
    start = len(good) // 3
    damaged[start : start + 4096] = b"\xff" * 4096
    states.write_bytes(bytes(damaged))
    assert run_main(train_main, run, "max_steps=3", f"resume={states.parent}") == 2
    line = one_line(capsys.readouterr().err, "error:")
    assert str(states) in line and "fails its CRC-32 check" in line


def test_an_unreadable_file_inside_a_load_is_named(tmp_path):
    """What gets past the check (or a file outside a manifest) fails its torch.load with the file named."""
    from tcscale.train.safe_load import CheckpointReadError, safe_torch_load

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"w": torch.ones(3)}, path)
    path.write_bytes(path.read_bytes()[:100])
    expected = r"mp_rank_00_model_states\.pt: cannot be read .*truncated or corrupt"
    with pytest.raises(CheckpointReadError, match=expected):
        with safe_torch_load():
            torch.load(path)


# -- a full disk during a save ---------------------------------------------------------------------------
def test_disk_full_during_a_save_names_the_disk_and_keeps_the_previous_checkpoint(
    train_main, tmp_path, capsys, monkeypatch
):
    """ENOSPC from the writer (CI cannot mount a small tmpfs; the report has the real tmpfs run): one line naming
    the directory and the full disk, exit 2, the temp directory removed, the previous checkpoint intact and
    resumable, the MLflow run FAILED with the reason."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "tmp-step4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    assert run_main(train_main, run, "max_steps=4", "checkpoint.every_steps=2") == 2
    line = one_line(capsys.readouterr().err, "error:")
    assert "CheckpointSaveError: checkpoint step4" in line and "no space left on device" in line
    assert "MiB free" in line and f"previous checkpoint {run / 'checkpoints' / 'step2'} is intact" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if "step" in p.name) == ["step2"]
    failed = mlflow_run(run)
    assert failed.info.status == "FAILED" and "no space left" in failed.data.tags["failure_reason"]
    monkeypatch.setattr(torch, "save", real_save)
    assert run_main(train_main, run, "max_steps=4", "checkpoint.every_steps=2", "resume=latest") == 0
    assert (run / "checkpoints" / "latest").read_text() == "step4" and mlflow_run(run).info.status == "FINISHED"


def test_torch_zip_writer_failure_is_reported_as_a_full_disk(tmp_path):
    """What torch's writer raises on a full disk has no errno (inline_container.cc ... unexpected pos)."""
    from tcscale.train.checkpoint import save_failure_cause

    exc = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4259264 vs 4259152")
    cause = save_failure_cause(exc, tmp_path)
    assert "most likely full" in cause and "MiB free of" in cause
    assert save_failure_cause(ValueError("other"), tmp_path) == "ValueError: other"


# -- SIGTERM ----------------------------------------------------------------------------------------------
def _ranks_of(launcher_pid: int) -> list[int]:
    """The training ranks under a deepspeed launcher (its launch.py's children)."""
    import psutil

    children = psutil.Process(launcher_pid).children(recursive=True)
    return [p.pid for p in children if "--local_rank" in " ".join(p.cmdline())]


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_the_ranks_checkpoints_and_exits_75(tmp_path):
    """scancel / a time limit: SIGTERM to the ranks (2 ranks, ZeRO-2) is a preemption: checkpoint, PREEMPTED,
    the launcher exits 75, the MLflow run KILLED with the reason, and a resume continues it."""
    run = tmp_path / "run"
    cmd = launch.deepspeed_cmd(2, CONFIG, [f"output_dir={run}", "max_steps=300", "checkpoint.every_steps=0"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "step 2/300" in line:
                for pid in _ranks_of(proc.pid):
                    os.kill(pid, signal.SIGTERM)
                break
        out.extend(proc.stdout)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(out)
    assert code == 75, text[-3000:]
    assert "SIGTERM received" in text and "Traceback" not in text
    step = int((run / "PREEMPTED").read_text().split()[1])
    assert step >= 2 and (run / "checkpoints" / "latest").read_text() == f"step{step}"
    killed = mlflow_run(run)
    assert killed.info.status == "KILLED" and "SIGTERM" in killed.data.tags["failure_reason"]


@pytest.mark.slow
def test_sigterm_without_time_to_save_stops_cleanly_with_143(tmp_path):
    """checkpoint.on_sigterm=false (a scheduler that kills soon after SIGTERM): stop at the end of the step without
    saving, exit 143, the MLflow run KILLED with the reason (never left RUNNING), the lock released."""
    run = tmp_path / "run"
    cmd = [os.sys.executable, "launchers/train.py", "--config", CONFIG, f"output_dir={run}", "max_steps=300",
           "checkpoint.every_steps=2", "checkpoint.on_sigterm=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "step 3/300" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out.extend(proc.stdout)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(out)
    assert code == 143, text[-3000:]
    assert "stopped without a checkpoint (checkpoint.on_sigterm=false)" in text and "Traceback" not in text
    assert (run / "checkpoints" / "latest").read_text() == "step2" and not (run / "PREEMPTED").exists()
    killed = mlflow_run(run)
    assert killed.info.status == "KILLED" and "SIGTERM" in killed.data.tags["failure_reason"]
    assert not (run / ".tcscale.lock").exists()


# -- the tracking server ---------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_server_down_at_start_trains_on_with_one_warning(train_main, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = tmp_path / "run"
    with pytest.warns(UserWarning) as caught:
        assert run_main(train_main, run, "max_steps=3") == 0
    messages = [str(w.message) for w in caught if "MLflow" in str(w.message)]
    assert sum("training goes on" in m for m in messages) == 1, messages  # one warning, not one per step
    assert "reaching the tracking server http://127.0.0.1:" in messages[0]
    assert "Traceback" not in capsys.readouterr().err
    assert (run / "checkpoints" / "latest").read_text() == "step3"


def test_metrics_kept_while_the_server_is_down_are_sent_when_it_returns(tmp_path):
    """Down at start, back later: the run is created then and carries every step kept meanwhile; run.json follows.
    (A sqlite store whose folder is a file for now stands in for the unreachable server.)"""
    import warnings

    import mlflow

    from tcscale.config import load_config
    from tcscale.tracking.mlflow_tracker import Tracker

    store = tmp_path / "later"
    store.write_text("not a folder yet")
    cfg = load_config(REPO / CONFIG, [f"output_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{store}/m.db"])
    created = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(cfg, world_size=2, on_created=created.append)
        assert tracker.run_id is None
        for step in (1, 2, 3):
            tracker.log_metrics({"loss/ldm": float(step)}, step)
    assert sum("training goes on" in str(w.message) for w in caught) == 1 and len(tracker.pending) == 3
    store.unlink()
    store.mkdir()
    tracker.retry_at = 0.0  # the retry interval has passed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker.log_metrics({"loss/ldm": 4.0}, 4)
        tracker.end("FINISHED")
    assert created == [tracker.run_id] and tracker.pending == []
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}/m.db")
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss/ldm")] == [1, 2, 3, 4]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


# -- one run per output directory ------------------------------------------------------------------------
def test_second_run_on_an_output_dir_is_refused_and_a_dead_runs_lock_is_taken_over(train_main, tmp_path, capsys):
    from tcscale.train.run_lock import LOCK_NAME, _identity, stale_reason

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(["sleep", "300"])  # a live process of this host holds the lock
    try:
        ident = {**_identity(), "pid": holder.pid, "pid_start": None}
        from tcscale.train.run_lock import _start_time

        ident["pid_start"] = _start_time(holder.pid)
        (run / LOCK_NAME).write_text(json.dumps(ident))
        (run / "config.yaml").write_text("the live run's config\n")
        assert run_main(train_main, run, "resume=latest") == 2
        line = one_line(capsys.readouterr().err, "error:")
        assert f"output_dir {run} is in use by another training run" in line and f"pid {holder.pid}" in line
        assert (run / "config.yaml").read_text() == "the live run's config\n"  # the survivor's config untouched
    finally:
        holder.kill()
        holder.wait()
    # its process is gone: the stale lock is taken over, saying whose it was; nothing to resume is said too
    assert run_main(train_main, run, "max_steps=1", "resume=latest") == 0
    out = capsys.readouterr().out
    assert one_line(out, "took over the stale lock").endswith(f"its process {holder.pid} on this host is gone")
    assert one_line(out, "resume=latest: no checkpoint in").endswith("starting from step 1")
    assert not (run / LOCK_NAME).exists()  # released at the end
    # another host: alive while it refreshes the lock, stale once it stops
    other = {"host": "node-elsewhere", "pid": 1, "pid_start": "1"}
    assert stale_reason(other, age_s=10) is None
    assert "not refreshed for 600 s" in stale_reason(other, age_s=600)
    requeued = {"host": "node-elsewhere", "pid": 1, "slurm_job_id": "42"}
    assert "earlier attempt of this Slurm job" in stale_reason(requeued, 0, {"host": "here", "slurm_job_id": "42"})


def test_two_processes_racing_for_one_output_dir_get_one_lock(tmp_path):
    """The lock itself, under a race: of two processes taking it at once, exactly one gets it."""
    script = (
        "import sys, time; from tcscale.train.run_lock import RunLock; from tcscale.train.errors import RunInputError\n"
        "lock = RunLock(sys.argv[1])\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "try:\n    lock.acquire(); print('got'); time.sleep(3); lock.release()\n"
        "except RunInputError as e:\n    print('refused', e)\n"
    )
    start = str(time.time() + 3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [os.sys.executable, "-c", script, str(tmp_path), start]
    procs = [subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, env=env) for _ in range(2)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs[0] == "got" and outs[1].startswith("refused") and "in use by another training run" in outs[1], outs


# -- noise ----------------------------------------------------------------------------------------------------
def test_a_caption_over_77_tokens_aligns_without_the_indexing_errors_warning(sd_tokenizer, capsys):
    from tcscale.data.align import PhraseAligner

    caption = " ".join(["a red circle next to a blue square"] * 12) + " and a green star"
    found = PhraseAligner(sd_tokenizer).align(caption, ["a red circle", "a green star"])
    err = capsys.readouterr().err
    assert "indexing errors" not in err and "longer than the specified maximum" not in err
    assert found.positions[0] == [1, 2, 3]  # "a red circle", right after <start>
    assert found.positions[1] is None and found.reasons[1] == "truncated"  # beyond token 77: dropped as such


def test_readme_lists_every_exit_code_the_launcher_returns():
    import re

    from tcscale.train import errors

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## When things go wrong") : readme.index("## Layout")]
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert codes == {0, 1, 2, 3, 4, 75, 143}
    documented = {int(c) for c in re.findall(r"`(\d+)` ", section.split("\n\n")[1])}
    assert documented == codes, documented
    for words in ("SIGTERM received", "checkpoint.on_sigterm=false", "corrupt-step<N>", ".tcscale.lock",
                  "starting from step 1", "free space"):  # fmt: skip
        assert words in section, words
