"""Objectives are registry entries: a toy one, registered from this module (no edit under tcscale/), trains 2 steps
through the real launcher on 2 CPU ranks, with its own config section, metrics and trainable set.

The launcher imports this file through the config's `imports` key, so keep its top-level imports to the standard
library, torch, pytest and tcscale (the training processes do not have tests/ on their path).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import yaml

from tcscale.objectives import OBJECTIVES, Objective, StepOutput, register_objective


@dataclass
class ToyConfig:
    target: float = 0.0  # the U-Net's prediction is pulled towards this constant
    weight: float = 1.0  # scale of the loss


class ToyObjective(Objective):
    """Data-free: pull the U-Net's output towards a constant on random inputs, training conv_out only."""

    reads_data = False

    def __init__(self, cfg: ToyConfig, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.module = ctx.comps.unet
        for name, p in self.module.named_parameters():
            p.requires_grad_(name.startswith("conv_out."))

    def batch(self, micro_step: int) -> dict:
        return {"micro_step": micro_step, "batch_size": self.ctx.micro_batch_size}

    def synthetic_batch(self, batch_size: int, *, phrases: int = 4) -> dict:
        return {"micro_step": 0, "batch_size": batch_size}

    def __call__(self, model, batch, generator):
        unet, ctx = self.module, self.ctx
        side = ctx.cfg.data.resolution // 8
        B = batch["batch_size"]
        z = torch.randn(B, unet.config.in_channels, side, side, generator=generator, device=ctx.device)
        t = torch.randint(0, 1000, (B,), generator=generator, device=ctx.device)
        text = torch.zeros(B, 77, unet.config.cross_attention_dim, device=ctx.device)
        pred = model(z.to(ctx.dtype), t, text.to(ctx.dtype)).sample
        loss = self.cfg.weight * (pred.float() - self.cfg.target).square().mean()
        return StepOutput(loss, {"toy": loss})


register_objective("toy", ToyConfig, ToyObjective, description="test objective")


def test_registry_lists_the_builtin_objectives():
    assert {"tokencompose", "ldm", "sepen"} <= set(OBJECTIVES)
    for name in ("tokencompose", "ldm", "sepen"):
        spec = OBJECTIVES[name]
        assert spec.name == name and callable(spec.build) and spec.description


def test_config_sections_follow_the_registry(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path, "objective.name=toy", "objective.toy.weight=3")
    assert cfg.objective.name == "toy" and cfg.objective.toy == ToyConfig(weight=3.0)
    assert cfg.objective.tokencompose.token_loss_weight == 1e-3  # the other sections stay, with their values
    from tcscale.config import ConfigError

    with pytest.raises(ConfigError, match=r"objective\.toy\.wieght"):
        tiny_config(tmp_path, "objective.name=toy", "objective.toy.wieght=3")
    with pytest.raises(ConfigError, match=r"objective\.name"):
        tiny_config(tmp_path, "objective.name=toyy")


def test_a_registered_objective_is_planned_by_its_own_step(tmp_path):
    """`python -m tcscale.memory` plans an objective registered outside tcscale/ (through `imports`): its own
    synthetic batch and step on the meta device, a fp32 U-Net that trains conv_out only."""
    import json
    import subprocess
    import sys

    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "tcscale.memory", "--config", "configs/tiny_cpu.yaml", f"imports=[{__file__}]",
           "objective.name=toy", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(out.read_text())
    assert plan["objective"] == "toy" and plan["predicted_peak"] > 0
    conv_out = 4 * 32 * 3 * 3 + 4  # conv_out of the tiny U-Net: 32 channels in, 4 latent channels out, 3 x 3
    assert plan["trainable_params"] == conv_out
    assert plan["activations_per_sample"] > 0  # its forward through the whole U-Net keeps activations


def test_bad_plugin_import_names_the_entry(tiny_config, tmp_path):
    from tcscale.config import ConfigError

    with pytest.raises(ConfigError, match=r"imports: .*no_such_module"):
        tiny_config(tmp_path, "imports=[no_such_module_for_tcscale]")
    with pytest.raises(ConfigError, match=r"imports: file not found: .*missing\.py"):
        tiny_config(tmp_path, f"imports=[{tmp_path / 'missing.py'}]")


@pytest.mark.distributed
@pytest.mark.slow
def test_toy_objective_trains_through_the_launcher_on_two_ranks(tmp_path):
    from tests.helpers import launch  # not at the top: the training processes import this file without tests/

    run = tmp_path / "run"
    launch.run_deepspeed(
        2,
        "configs/tiny_cpu.yaml",
        [
            f"output_dir={run}",
            "max_steps=2",
            f"imports=[{__file__}]",
            "objective.name=toy",
            "objective.toy.target=0.5",
            "deepspeed.optimizer.params.lr=1e-2",
        ],
    )
    client, runs = launch.mlflow_runs(run, "tcscale-tiny")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/toy")]
    assert sorted(steps) == [1, 2]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["objective"]["name"] == "toy" and saved["objective"]["toy"] == {"target": 0.5, "weight": 1.0}
    from safetensors.torch import load_file

    before = load_file(run / "base_model" / "unet" / "diffusion_pytorch_model.safetensors")
    after = launch.final_weights(run)
    changed = {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}
    assert changed == {"conv_out.weight", "conv_out.bias"}
