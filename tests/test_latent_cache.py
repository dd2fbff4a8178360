"""Cached VAE latents (tcscale/data/latent_cache.py, dataprep/stages/latents.py): the cache stage, the loader reading
it, the trainer without a VAE, and the refusal of a cache that is not the run's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataprep.stages import latents as stage
from dataprep.synthetic_shards import write_synthetic_shards
from tcscale.data.latent_cache import LATENTS_PART, CacheKey, LatentCacheMismatch, cache_key, decode_member
from tcscale.train import trainer as trainer_mod
from tests.helpers.launch import final_weights
from tests.helpers.paths import TINY_CONFIG

REPO = Path(__file__).resolve().parents[1]
SHARDS = "synthetic-{000000..000001}.tar"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 non-square (48 x 80) synthetic samples in 2 shards, and the same shards with the tiny VAE's latents."""
    root = tmp_path_factory.mktemp("latent_cache")
    write_synthetic_shards(str(root / "images"), 8, 48, 80, samples_per_shard=4, progress=False)
    return root


def run_cfg(tiny_config, run_dir, shard_dir, *overrides):
    return tiny_config(
        run_dir, "data.source=webdataset", f"data.shards={shard_dir}/{SHARDS}", "data.shuffle_buffer=1",
        "data.resampled=false", "max_steps=1", *overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cached(shards, tmp_path_factory):
    from tcscale.config import load_config

    cfg = load_config(
        TINY_CONFIG, ["data.source=webdataset", f"data.shards={shards}/images/{SHARDS}", "data.random_flip=true"]
    )
    out = shards / "cached"
    summary = stage.run(cfg, out, progress=False)
    assert summary["written"] == ["synthetic-000000.tar", "synthetic-000001.tar"] and summary["counts"] == {"cached": 8}
    return out


def members(path: Path) -> dict[str, dict[str, bytes]]:
    import webdataset as wds

    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
            for s in wds.tariterators.tarfile_samples([{"url": str(path)}])}  # fmt: skip


def test_stage_keeps_every_member_adds_both_flips_and_resumes(shards, cached, tiny_config, tmp_path):
    from tcscale.models.sd import load_components

    for name in ("synthetic-000000.tar", "synthetic-000001.tar"):
        src, dst = members(shards / "images" / name), members(cached / name)
        assert src.keys() == dst.keys()
        for key in src:
            assert {k: v for k, v in dst[key].items() if k != LATENTS_PART} == src[key]  # untouched
            lat = decode_member(dst[key][LATENTS_PART])
            assert lat.mean.shape == (2, 4, 8, 8) and lat.flip.tolist() == [False, True]
    # the key names this run's VAE (tiny, seed model.tiny.seed) at 64 px
    cfg = run_cfg(tiny_config, tmp_path, shards / "images")
    vae = load_components(cfg.model, 64).vae
    assert lat.key == cache_key(cfg.data, vae)
    # a rerun finds both shards done and loads no model
    again = stage.run(cfg, cached, progress=False)
    assert again["written"] == [] and len(again["skipped"]) == 2 and "key" not in again


def test_cached_mean_is_the_vae_posterior_of_the_loader_crop(shards, cached, tiny_config, tmp_path):
    """The loader's own pixels (data.latents=images) of each sample, encoded here, against the cached posterior."""
    from tcscale.data import build_train_loader
    from tcscale.models.sd import load_components
    from tcscale.models.tokenizer import sd_clip_tokenizer

    cfg = run_cfg(tiny_config, tmp_path, shards / "images")
    vae = load_components(cfg.model, 64).vae.eval()
    loader = build_train_loader(cfg.data, sd_clip_tokenizer(), rank=0, world_size=1, micro_batch_size=4, seed=0)
    batch = loader.next_batch()
    loader.close()
    stored = {**members(cached / "synthetic-000000.tar"), **members(cached / "synthetic-000001.tar")}
    with torch.no_grad():
        for key, pixels in zip(batch["keys"], batch["pixel_values"]):
            lat = decode_member(stored[key][LATENTS_PART])
            for v, x in enumerate([pixels, pixels.flip(-1)]):  # the loader flips after its crop and resize
                dist = vae.encode(x[None]).latent_dist
                torch.testing.assert_close(torch.from_numpy(lat.mean[v])[None], dist.mean, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(torch.from_numpy(lat.logvar[v])[None], dist.logvar, atol=1e-5, rtol=1e-5)
            assert not np.allclose(lat.mean[0], lat.mean[1][..., ::-1], atol=1e-3)  # the flip's latent is its own


def test_one_step_from_cached_latents_equals_the_step_from_images(shards, cached, tiny_config, tmp_path):
    """Same samples, same generator: the cached posterior's draw is the VAE's draw, so the U-Net update agrees. Adam
    with eps=1 makes the first update lr * g / (|g| + 1), linear in small gradients, so fp32 noise in a near-zero
    gradient (a conv bias before a GroupNorm) is not amplified to a full step of lr as with eps=1e-8. Tolerance: a few
    float32 ulps of the weights (|w| < 1), four orders below the largest update."""
    opt = ["deepspeed.optimizer.params.eps=1.0", "deepspeed.optimizer.params.lr=1e-2", "data.random_flip=true"]
    a = trainer_mod.train(run_cfg(tiny_config, tmp_path / "images", shards / "images", *opt))
    b = trainer_mod.train(run_cfg(tiny_config, tmp_path / "cached", cached, *opt, "data.latents=cached"))
    for term in ("loss/ldm", "loss/token", "loss/pixel"):
        assert b.last_metrics[term] == pytest.approx(a.last_metrics[term], rel=1e-5), term
    wa, wb = final_weights(tmp_path / "images"), final_weights(tmp_path / "cached")
    assert wa.keys() == wb.keys()
    base = trainer_mod.load_components(run_cfg(tiny_config, tmp_path, cached).model, 64).unet.state_dict()
    assert max(float((wa[k] - base[k]).abs().max()) for k in wa) > 1e-4, "the step changed nothing"
    for k in wa:
        torch.testing.assert_close(
            wb[k] - base[k], wa[k] - base[k], rtol=1e-3, atol=6e-8, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_trainer_keeps_no_vae_weights(shards, cached, tiny_config, tmp_path):
    trainer = trainer_mod.Trainer(run_cfg(tiny_config, tmp_path, cached, "data.latents=cached"))
    try:
        assert all(p.device.type == "meta" for p in trainer.comps.vae.parameters())
        batch = next(trainer.batches)
        assert "pixel_values" not in batch and batch["latent_mean"].shape == (2, 4, 8, 8)
        assert trainer.train_step()["loss/ldm"] > 0
    finally:
        trainer.loader.close()
        trainer.tracker.end("FINISHED")
        trainer.release()


def test_planner_leaves_the_vae_out(tiny_config, tmp_path, cached):
    from tcscale.memory.planner import build_models

    images = build_models(run_cfg(tiny_config, tmp_path, cached), "tiny")
    latents = build_models(run_cfg(tiny_config, tmp_path, cached, "data.latents=cached"), "tiny")
    assert images.frozen_fp32 == sum(p.numel() for p in images.comps.vae.parameters()) > 0
    assert latents.frozen_fp32 == 0 and latents.frozen_compute == images.frozen_compute
    # the planner's meta-device micro-step runs on the cached posterior (no VAE forward) and plans less memory
    from tcscale.memory.planner import plan_memory

    with_vae = plan_memory(run_cfg(tiny_config, tmp_path, cached), target="cpu")
    without = plan_memory(run_cfg(tiny_config, tmp_path, cached, "data.latents=cached"), target="cpu")
    assert without.peak() < with_vae.peak()


def test_loader_refuses_a_cache_of_another_resolution(cached, tiny_config, tmp_path):
    from tcscale.data import build_train_loader
    from tcscale.models.tokenizer import sd_clip_tokenizer

    cfg = run_cfg(tiny_config, tmp_path, cached, "data.latents=cached")
    loader = build_train_loader(cfg.data, sd_clip_tokenizer(), rank=0, world_size=1, micro_batch_size=2, seed=0)
    written = decode_member(next(iter(members(cached / "synthetic-000000.tar").values()))[LATENTS_PART]).key
    loader.expect_latent_cache(CacheKey(written.vae, 32))
    with pytest.raises(LatentCacheMismatch) as err:
        loader.next_batch()
    msg = str(err.value)
    assert "\n" not in msg and f"VAE {written.vae} at 64 px" in msg and f"VAE {written.vae} at 32 px" in msg


def test_launcher_refuses_a_cache_of_another_vae_with_one_line(cached, tmp_path):
    """model.tiny.seed=7 builds another tiny VAE than the cache's (seed 0): exit 2, one line naming both VAEs."""
    from tests.helpers.launch import clean_env

    proc = subprocess.run(
        [sys.executable, "launchers/train.py", "--config", str(TINY_CONFIG), f"output_dir={tmp_path}", "max_steps=1",
         "data.source=webdataset", f"data.shards={cached}/{SHARDS}", "data.latents=cached", "model.tiny.seed=7",
         "tracking.enabled=false"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=900,  # 300 s ran out under load 4-5
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "LatentCacheMismatch" in ln]
    assert len(lines) == 1 and lines[0].count("VAE ") == 2, proc.stderr[-2000:]


def test_config_refuses_uncacheable_choices(tiny_config, tmp_path):
    from tcscale.config import ConfigError

    with pytest.raises(ConfigError, match="data.source=webdataset"):
        tiny_config(tmp_path, "data.latents=cached")
    with pytest.raises(ConfigError, match="data.center_crop=true"):
        tiny_config(tmp_path, "data.latents=cached", "data.source=webdataset", "data.center_crop=false")
    with pytest.raises(ConfigError, match="validation.every_steps"):
        tiny_config(tmp_path, "data.latents=cached", "data.source=webdataset", "validation.every_steps=5")


def test_stage_array_tasks_and_an_interrupted_shard(shards, tmp_path):
    """A SLURM array task takes its shard range; a shard whose encoding fails leaves neither it nor a temp file."""
    assert stage.shard_indices(None, 5, 2, env={"SLURM_ARRAY_TASK_ID": "2"}) == [4]
    assert stage.shard_indices(None, 5, 2, env={"SLURM_ARRAY_TASK_ID": "0"}) == [0, 1]
    assert stage.shard_indices("1,3", 5, 1, env={}) == [1, 3]

    def failing(image):
        raise RuntimeError("killed")

    dst = tmp_path / "synthetic-000000.tar"
    with pytest.raises(RuntimeError, match="killed"):
        stage.cache_shard(str(shards / "images" / "synthetic-000000.tar"), dst, failing)
    assert list(tmp_path.iterdir()) == []
