"""LoRA via peft (`model.lora`): only adapter weights train, the export loads with diffusers' `load_lora_weights`
and reproduces the trained U-Net, merged exports too; ZeRO-3 on 2 ranks resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tcscale.config import ConfigError, load_config
from tcscale.train import trainer as trainer_mod
from tcscale.train.export import export_pipeline, load_trained_components
from tests.helpers import launch

CONFIG = "configs/tiny_cpu.yaml"


def base_unet_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "base_model" / "unet" / "diffusion_pytorch_model.safetensors")


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    """One U-Net forward on fixed inputs (tiny_cpu: 4 latent channels at 8x8, text width 32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet.eval()(x, torch.tensor([10, 500]), text).sample


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lora.rnk=4", "model.lora.rnk"),
        ("model.lora.rank=0", "model.lora.rank must be > 0"),
        ("model.lora.dropout=1.5", "model.lora.dropout"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ],
)
def test_lora_config_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(CONFIG, [f"output_dir={tmp_path}", override])


def test_lora_rejected_for_the_text_encoder_objective(tmp_path):
    with pytest.raises(ConfigError, match="does not train the U-Net"):
        load_config(
            CONFIG,
            [f"output_dir={tmp_path}", "model.lora.rank=4", "objective.name=text_encoder_infonce",
             "objective.text_encoder_infonce.image_model=/nonexistent"],
        )  # fmt: skip


def test_lora_run_changes_only_adapters_and_its_export_reproduces_the_trained_unet(tmp_path, tiny_config):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    cfg = tiny_config(run, "model.lora.rank=4", "model.lora.alpha=8", "deepspeed.optimizer.params.lr=1e-2")
    trainer = trainer_mod.Trainer(cfg)
    names = {id(p): n for n, p in trainer.engine.module.named_parameters()}
    in_optimizer = [names[id(p)] for group in trainer.engine.optimizer.bit16_groups for p in group]
    assert in_optimizer and all(".lora_A." in n or ".lora_B." in n for n in in_optimizer)
    assert len(in_optimizer) == sum(1 for n, p in trainer.engine.module.named_parameters() if p.requires_grad)
    trainer.fit()

    # base weights bit-identical, adapters trained
    from tests.helpers.launch import final_weights

    before, after = base_unet_weights(run), final_weights(run)
    base_keys = {k.replace(".base_layer.", "."): k for k in after if ".lora_" not in k}
    assert base_keys.keys() == before.keys()
    assert all(torch.equal(before[k], after[v]) for k, v in base_keys.items())
    lora_b = [k for k in after if ".lora_B." in k]
    assert lora_b and any(after[k].abs().max() > 0 for k in lora_b), "adapters did not train (B still 0)"
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora_b} >= {"to_q", "to_k", "to_v", "0"}

    trained = unet_output(load_trained_components(run).unet)
    base_out = unet_output(StableDiffusionPipeline.from_pretrained(run / "base_model").unet)
    assert not torch.allclose(trained, base_out, atol=1e-4), "the adapters do not change the output"

    adapter = export_pipeline(run, tmp_path / "adapter")
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(run / "base_model")
    pipe.load_lora_weights(adapter, weight_name="pytorch_lora_weights.safetensors")  # offline: name the file
    torch.testing.assert_close(unet_output(pipe.unet), trained, rtol=1e-5, atol=1e-6)

    merged = export_pipeline(run, tmp_path / "merged", merge_lora=True)
    merged_unet = StableDiffusionPipeline.from_pretrained(merged).unet
    assert not any("lora" in n for n, _ in merged_unet.named_parameters())
    torch.testing.assert_close(unet_output(merged_unet), trained, rtol=1e-5, atol=1e-5)


def test_sepen_lora_adapts_only_cross_attention_keys(tmp_path, tiny_config):
    cfg = tiny_config(
        tmp_path, "max_steps=1", "objective.name=sepen", "objective.sepen.map_resolution=8", "model.lora.rank=2",
        "deepspeed.optimizer.params.lr=1e-2",
    )  # fmt: skip
    trainer_mod.train(cfg)
    after = launch.final_weights(tmp_path)
    adapters = {k for k in after if ".lora_" in k}
    assert adapters and all(".attn2.to_k.lora_" in k for k in adapters), sorted(adapters)[:4]


def test_export_merge_lora_refuses_a_full_finetuning_run(tmp_path, tiny_config):
    from tcscale.train.checkpoint import CheckpointError

    trainer_mod.train(tiny_config(tmp_path, "max_steps=1"))
    with pytest.raises(CheckpointError, match="trained no LoRA"):
        export_pipeline(tmp_path, tmp_path / "merged", merge_lora=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_lora_zero3_two_ranks_resumes_exactly(tmp_path):
    """ZeRO-3 on 2 ranks: a copy of a 4-step run cut back to its step-2 checkpoint resumes to the uninterrupted
    run's weights (adapters and base)."""
    import shutil

    common = ["max_steps=4", "model.lora.rank=4", "deepspeed.zero_optimization.stage=3", "checkpoint.every_steps=2",
              "data.synthetic.num_samples=16", "deepspeed.optimizer.params.lr=1e-2"]  # fmt: skip
    ref, run = tmp_path / "uninterrupted", tmp_path / "resumed"
    launch.run_deepspeed(2, CONFIG, [f"output_dir={ref}", *common])
    shutil.copytree(ref, run)  # the same run, as if killed after its step-2 checkpoint
    shutil.rmtree(run / "checkpoints" / "step4")
    (run / "checkpoints" / "latest").write_text("step2")
    proc = launch.run_deepspeed(2, CONFIG, [f"output_dir={run}", "resume=latest", *common])
    assert "resumed from" in proc.stdout
    a, b = launch.final_weights(ref), launch.final_weights(run)
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    base = base_unet_weights(ref)
    assert all(torch.equal(base[k.replace(".base_layer.", ".")], a[k]) for k in a if ".lora_" not in k)


def test_step_benchmark_reports_full_against_lora_memory(tmp_path):
    """bench_step --finetune full,lora: trainable parameters, AdamW state and bytes saved for backward per row."""
    import json

    import bench_step

    out = tmp_path / "step_time.jsonl"
    bench_step.main(["--tiny", "--resolution", "64", "--batch", "1", "--steps", "1", "--warmup", "0",
                     "--providers", "tokencompose_reference", "--finetune", "full,lora", "--lora-rank", "4",
                     "--out", str(out)])  # fmt: skip
    full, lora = [json.loads(line) for line in out.read_text().splitlines()]
    assert (full["finetune"], lora["finetune"]) == ("full", "lora_r4")
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 10
    for row in (full, lora):  # AdamW: exp_avg + exp_avg_sq in fp32 per trainable element (+ a step scalar each)
        assert 8 * row["trainable_params"] <= row["optimizer_state_bytes"] < 8 * row["trainable_params"] + 8192
        assert row["saved_activation_bytes"] > 0


def test_eval_load_pipeline_reads_a_lora_export(tmp_path, tiny_config):
    """eval's load_pipeline of an adapter directory: the base pipeline its tcscale_lora.json names + the adapter."""
    from tcscale.eval.config import EvalModelConfig, SamplerConfig
    from tcscale.eval.generation import load_pipeline

    run = tmp_path / "run"
    trainer_mod.train(tiny_config(run, "max_steps=1", "model.lora.rank=4", "deepspeed.optimizer.params.lr=1e-2"))
    adapter = export_pipeline(run, tmp_path / "adapter")
    pipe = load_pipeline(str(adapter), EvalModelConfig(pretrained=str(adapter)), SamplerConfig("ddim"), "cpu")
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(load_trained_components(run).unet))
