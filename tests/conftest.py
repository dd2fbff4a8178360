"""Shared pytest set-up and fixtures.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before any kernel module is
imported (decoration time), so it is set here, before test modules load. `pyproject.toml` puts the repository root
and benchmarks/ on the path (no sys.path edits in tests); builders live in tests/helpers/ and reach test modules as
the fixtures below.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers.paths import TINY_CONFIG  # noqa: E402
from tests.helpers.shm import remove_orphan_buffers  # noqa: E402

_SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    """Ranks the tests SIGKILL cannot unlink their DeepSpeed /dev/shm buffer (67 MB of RAM each); remove those this
    session made that no live process maps, so a long suite does not fill the machine's memory with tmpfs."""
    remove_orphan_buffers(_SESSION_START)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


# -- runs ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_config():
    """`tiny_config(run_dir, *overrides)`: configs/tiny_cpu.yaml for a 2-step run in `run_dir`, no periodic
    checkpoints (a final one is written), overrides applied last."""
    from tcscale.config import load_config

    def make(run_dir: Path, *overrides: str):
        return load_config(
            TINY_CONFIG, [f"output_dir={run_dir}", "max_steps=2", "checkpoint.every_steps=0", *overrides]
        )

    return make


# -- grounded attention on a tiny U-Net ---------------------------------------------------------------
@pytest.fixture
def grounding_inputs():
    """`grounding_inputs(B=2, side=8, seed=0)` -> (latents, t, text, masks (B, 2, 8·side, 8·side), token_phrase)."""
    from tests.helpers.grounding import make_inputs

    return make_inputs


@pytest.fixture
def grounded_unet():
    """`grounded_unet(seed=0)` -> (tiny U-Net with reference grounding processors on mid + up, its plan)."""
    from tests.helpers.grounding import grounded_unet as build

    return build


# -- data and dataprep --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_dataprep_models(tmp_path_factory):
    """Tiny CLIP, flair tagger, Grounding DINO and SAM-HQ built once per session (tests/helpers/dataprep_models)."""
    from tests.helpers.dataprep_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("dataprep_tiny_models"))


@pytest.fixture(scope="session")
def write_photos():
    """`write_photos(folder, names=...)`: scikit-image's bundled photos saved as JPEG files."""
    from tests.helpers.dataprep_models import write_photos as write

    return write


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node Slurm cluster; skips when Slurm/munge are not installed (see .ci/install_slurm.sh)."""
    from tests.helpers.slurm import running_cluster

    yield from running_cluster()


@pytest.fixture(scope="session")
def sd_tokenizer():
    """The SD1.x CLIP tokenizer, built offline from open_clip's BPE vocabulary."""
    from tcscale.models.tokenizer import sd_clip_tokenizer

    return sd_clip_tokenizer()


@pytest.fixture
def mlflow_server(tmp_path):
    """A running `mlflow server` on loopback (`.url`; `.stop()` / `.start()` to take it down and back up)."""
    from tests.helpers.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "mlflow-server").start()
    try:
        yield server
    finally:
        server.stop()
