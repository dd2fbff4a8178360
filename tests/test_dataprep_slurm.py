"""launchers/slurm/dataprep.sbatch: static checks, and an array job on a real single-node Slurm cluster.

The cluster test (marked ``slow``; skips without Slurm, see tests/slurm_cluster.py) submits a 2-task array running
the real launcher with the caption-choice stage on the tiny CLIP model: each array task must process exactly its
own shard (SLURM_ARRAY_TASK_ID -> shard range).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.dataprep_models import PHOTOS
from tests.helpers.slurm import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launchers" / "slurm" / "dataprep.sbatch"
WAIT_S = 180


def test_sbatch_syntax_and_usage(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, timeout=10).returncode == 0
    res = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, cwd=tmp_path, timeout=10)
    assert res.returncode == 2 and "usage" in res.stderr and "--array" in res.stderr
    header = [ln for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header and any("%A_%a" in ln for ln in header)


@pytest.fixture
def slurm(slurm_cluster) -> SlurmCluster:
    return slurm_cluster


@pytest.mark.slow
def test_array_tasks_each_process_their_shard(
    slurm: SlurmCluster, tmp_path: Path, tiny_dataprep_models, write_photos
) -> None:
    tiny = tiny_dataprep_models
    photos = write_photos(tmp_path / "images")
    lines = [{"image": p.name, "captions": PHOTOS[p.stem][1]} for p in photos]
    (tmp_path / "images" / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = tmp_path / "dataprep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": str(tmp_path / "images"),
                "work_dir": str(tmp_path / "work"),
                "out_dir": str(tmp_path / "shards"),
                "samples_per_shard": 2,
                "stages": ["caption_choice"],
                "device": "cpu",
                "progress": False,
                "caption_choice": {"model": str(tiny.clip_dir)},
            }
        )
    )
    env = dict(slurm.env, TCSCALE_ROOT=str(REPO), TCSCALE_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("SLURM_ARRAY_TASK_ID", None)
    res = slurm.run(
        "sbatch", "--parsable", "--wait", "--array=0-1", "--ntasks=1", "--cpus-per-task=1", "--time=10",
        f"--output={tmp_path / 'slurm-%A_%a.out'}", str(SBATCH), str(config), "shards_per_task=1",
        env=env, timeout=WAIT_S, check=False,
    )  # fmt: skip
    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("slurm-*.out")}
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{logs}\n{slurm.logs()}"
    reports = {}
    for text in logs.values():
        report = json.loads(text.strip().splitlines()[-1])
        reports[report["slurm_array_task"]] = report
    assert {k: r["shards"] for k, r in reports.items()} == {"0": [0], "1": [1]}
    out = tmp_path / "work" / "caption_choice"
    keys = [[json.loads(ln)["key"] for ln in (out / f"grounded-{s:06d}.jsonl").open()] for s in (0, 1)]
    assert keys == [["astronaut", "chelsea"], ["coffee"]]
