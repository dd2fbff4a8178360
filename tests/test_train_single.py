"""The trainer in-process on one rank: SepEn's trainable set, export, validation artifacts, bad input, preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tcscale.models.sd import ModelLoadError
from tcscale.train import trainer as trainer_mod
from tcscale.train.export import export_pipeline
from tests.helpers import launch
from tests.helpers.launch import image_series


@pytest.fixture
def cfg_for(tiny_config):
    return tiny_config


@pytest.fixture
def final_weights():
    return launch.final_weights


@pytest.fixture
def mlflow_runs():
    return launch.mlflow_runs


def base_unet_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "base_model" / "unet" / "diffusion_pytorch_model.safetensors")


def test_sepen_trains_only_cross_attention_keys(tmp_path, cfg_for, final_weights):
    cfg = cfg_for(
        tmp_path,
        "objective.name=sepen",
        "objective.sepen.map_resolution=8",
        "objective.sepen.lambda_norm=0.5",
        "deepspeed.optimizer.params.lr=1e-2",
    )
    result = trainer_mod.train(cfg)
    assert result.step == 2
    assert {"loss/sep", "loss/en", "loss/norm"} <= set(result.last_metrics)
    before, after = base_unet_weights(tmp_path), final_weights(tmp_path)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}
    assert changed, "nothing trained"
    assert all(k.endswith("attn2.to_k.weight") for k in changed), sorted(changed)


def test_export_loads_into_diffusers_pipeline_and_generates(tmp_path, cfg_for, final_weights):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    trainer_mod.train(cfg_for(run))
    out = export_pipeline(run, tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    trained = final_weights(run)
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    image = pipe(
        "a photo of a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("objective", ["tokencompose", "ldm"])
def test_validation_logs_images_attention_heatmaps_and_grounding(tmp_path, cfg_for, mlflow_runs, objective):
    """Both objectives log labelled heatmaps (LDM-only: of the layers `attention` selects) and the live held-out
    grounding mIoU."""
    cfg = cfg_for(
        tmp_path,
        "max_steps=1",
        f"objective.name={objective}",
        "validation.every_steps=1",
        "validation.num_inference_steps=2",
        "validation.grounding.enabled=true",
        "validation.grounding.source=synthetic",
        "validation.grounding.num_samples=4",
        "validation.grounding.timesteps=[200]",
    )
    trainer_mod.train(cfg)
    client, runs = mlflow_runs(tmp_path, "tcscale-tiny")
    files = [a.path for a in client.list_artifacts(runs[0].info.run_id, "images")]
    # step-indexed image series (MLflow's step slider): the image and its per-phrase heatmaps
    assert {("validation/prompt0", 1), ("validation/prompt0_attention", 1)} <= image_series(files)
    assert str(tmp_path) in runs[0].info.artifact_uri  # artifacts stay in the run directory
    (miou,) = client.get_metric_history(runs[0].info.run_id, "grounding/miou")
    assert miou.step == 1 and 0.0 <= miou.value <= 1.0
    assert client.get_metric_history(runs[0].info.run_id, "grounding/miou_t200")[0].value == miou.value


def test_nonfinite_loss_names_step_and_term_and_writes_no_checkpoint(tmp_path, monkeypatch, cfg_for, mlflow_runs):
    from tcscale.objectives import ldm

    real = ldm.ldm_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(ldm, "ldm_loss", flaky)
    cfg = cfg_for(tmp_path, "max_steps=3", "checkpoint.every_steps=1")
    with pytest.raises(trainer_mod.NonFiniteLossError, match=r"step 2 .*'ldm'"):
        trainer_mod.train(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step1" in ckpts and "step2" not in ckpts
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step1"
    _, runs = mlflow_runs(tmp_path, "tcscale-tiny")
    assert runs[0].info.status == "FAILED"


def test_missing_model_path_is_a_clear_error(tmp_path, cfg_for):
    cfg = cfg_for(tmp_path, f"model.pretrained={tmp_path / 'no_such_model'}")
    with pytest.raises(ModelLoadError, match="no_such_model"):
        trainer_mod.train(cfg)


def test_preemption_signal_checkpoints_and_marks_the_run(tmp_path, monkeypatch, cfg_for):
    class SetAfterFirstStep:
        """PreemptionFlag's interface (tcscale.train.preemption), set as if SIGUSR1 arrived during step 1."""

        reads = 0
        reason = "SIGUSR1"
        sigterm = False

        def install(self):
            return self

        def stop_watching(self):
            pass

        @property
        def requested(self):
            self.reads += 1
            return self.reads >= 1  # the signal arrived during step 1

    monkeypatch.setattr(trainer_mod, "PreemptionFlag", SetAfterFirstStep)
    result = trainer_mod.train(cfg_for(tmp_path, "max_steps=5"))
    assert result.preempted and result.step == 1
    assert (tmp_path / "PREEMPTED").read_text().strip() == "step 1"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step1"
    # a requeued job resumes from it
    again = trainer_mod.train(cfg_for(tmp_path, "max_steps=2", "resume=latest"))
    assert again.step == 2 and again.run_id == result.run_id


def test_trains_from_webdataset_shards(tmp_path, cfg_for):
    """Grounded shards (written by dataprep) feed the trainer through the loader interface."""
    from dataprep.synthetic_shards import write_synthetic_shards

    write_synthetic_shards(str(tmp_path / "shards"), 12, 80, 96, samples_per_shard=4, progress=False)
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 3
    pattern = str(tmp_path / "shards" / "synthetic-{000000..000002}.tar")
    run = tmp_path / "run"
    result = trainer_mod.train(cfg_for(run, "data.source=webdataset", f"data.shards={pattern}"))
    assert result.step == 2
    m = result.last_metrics
    assert m["loss/token"] > 0 and m["loss/pixel"] > 0 and m["data/samples_seen"] >= 4


def test_bf16_run_with_validation_exports_fp32_weights(tmp_path, cfg_for, final_weights):
    """The GPU configs' precision path (bf16 U-Net and text encoder, fp32 VAE) on CPU: train, validate, export."""
    run = tmp_path / "run"
    cfg = cfg_for(run, "deepspeed.bf16.enabled=true", "validation.every_steps=2", "validation.num_inference_steps=2")
    result = trainer_mod.train(cfg)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(v)) for v in result.last_metrics.values())
    weights = final_weights(run)
    assert all(w.dtype == torch.float32 for w in weights.values())
    out = export_pipeline(run, tmp_path / "export")
    exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], weights[k]) for k in weights)


def test_validation_heatmap_phrases(sd_tokenizer):
    from tcscale.eval.attention_maps import phrase_tokens

    got = phrase_tokens(sd_tokenizer, "a photo of a cat and a wine glass, next to a red circle")
    # ids: SOT a photo of a cat(5) and a wine(8) glass(9) ,(10) next(11) to a red(14) circle(15) EOT
    assert got == [("cat", [5]), ("wine glass", [8, 9]), ("next", [11]), ("red circle", [14, 15])]
