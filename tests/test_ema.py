"""The fp32 EMA (tcscale.train.ema): in bf16 at decay 0.9999 it moves as an independent fp32 EMA of the master
weights predicts (where a bf16 average would not move at all), across ranks under ZeRO-3, through a resume, into the
export (`launchers/export.py --ema`, whose model card says so); swapped into the module for validation and back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tcscale.train.ema import load_ema_state_dict
from tests.helpers import launch

CONFIG = "configs/tiny_cpu.yaml"
DECAY = 0.9999
# lr 1e-2: each step moves weights by ~1e-2, so the average moves by ~1e-6 per step: far above fp32's resolution
# at these weights (~1e-8), far below bf16's (~1e-3), so an average kept in bf16 would not move at all
COMMON = ["tracking.enabled=false", "ema.enabled=true", f"ema.decay={DECAY}", "deepspeed.bf16.enabled=true",
          "deepspeed.optimizer.params.lr=1.0e-2", "checkpoint.every_steps=1", "checkpoint.keep_last=10"]  # fmt: skip


def base_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights the engine started from: the run's tiny base U-Net rounded to bf16 (DeepSpeed casts the module
    to bf16 and builds the fp32 master copy from it)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(run / "base_model" / "unet")
    return {k: v.bfloat16().double() for k, v in unet.state_dict().items()}


def independent_ema(run: Path, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The EMA of the fp32 master weights of every checkpoint step1..stepN (DeepSpeed's own consolidation), kept in
    fp64, and the same average kept in bf16 (what an EMA of the bf16 module parameters stores)."""
    from tcscale.train.export import consolidated_state_dict

    ema = base_weights(run)
    in_bf16 = {k: v.bfloat16() for k, v in ema.items()}
    for t in range(1, steps + 1):
        w = consolidated_state_dict(run / "checkpoints", f"step{t}")
        ema = {k: DECAY * v + (1 - DECAY) * w[k].double() for k, v in ema.items()}
        in_bf16 = {k: (DECAY * v.double() + (1 - DECAY) * w[k].double()).bfloat16() for k, v in in_bf16.items()}
    return ema, in_bf16


def assert_ema_matches(run: Path, got: dict[str, torch.Tensor], steps: int) -> None:
    from tcscale.train.export import consolidated_state_dict

    (want, in_bf16), start = independent_ema(run, steps), base_weights(run)
    raw = consolidated_state_dict(run / "checkpoints", f"step{steps}")
    moved = torch.cat([(want[k] - start[k]).flatten() for k in got])
    err = torch.cat([(got[k].double() - want[k]).flatten() for k in got])
    assert moved.abs().max() > 1e-6  # the average moved (by about (1 - decay) x the weights' change)
    # it moved as the fp32 EMA predicts: the error is fp32 rounding (a few ulp), far below the movement
    assert err.norm() < 0.02 * moved.norm(), (err.norm(), moved.norm())
    # an average kept in bf16 barely moves (its updates are below bf16's resolution but where weights are ~0)
    bf16_moved = torch.cat([(in_bf16[k].double() - start[k]).flatten() for k in got])
    assert (bf16_moved != 0).float().mean() < 0.05 and bf16_moved.norm() < 0.25 * moved.norm()
    # and the EMA is not the raw weights
    assert torch.cat([(got[k].double() - raw[k].double()).flatten() for k in got]).abs().max() > 1e-3


@pytest.mark.distributed
@pytest.mark.slow
def test_bf16_zero3_two_ranks_ema_resumes_and_exports(tmp_path):
    import yaml

    run = tmp_path / "run"
    recipe = yaml.safe_load((launch.REPO / CONFIG).read_text())  # the tiny config with a stated global batch
    del recipe["deepspeed"]["gradient_accumulation_steps"]
    recipe["batch"] = {"global_size": 8}
    config = tmp_path / "tiny_global8.yaml"
    config.write_text(yaml.safe_dump(recipe))
    over = [f"output_dir={run}", *COMMON, "deepspeed.zero_optimization.stage=3"]
    # validation at step 2 from the EMA weights: swapped into the ZeRO-3 partitions and back (collective)
    valid = ["ema.validate=true", "validation.every_steps=2", "validation.num_inference_steps=1"]
    out = launch.run_deepspeed(2, str(config), [*over, *valid, "max_steps=2"]).stdout
    # the recipe's global batch: 2 ranks x micro-batch 2 -> accumulation 2, printed at start-up
    assert "batch: global 8 samples per optimizer step = micro-batch 2 x accumulation 2 x 2 ranks" in out
    assert "ema: fp32 average of the trained weights, decay 0.9999" in out
    tag = run / "checkpoints" / "step2"
    assert sorted(p.name for p in tag.glob("ema-rank*.pt")) == ["ema-rank00000.pt", "ema-rank00001.pt"]
    out = launch.run_deepspeed(2, str(config), [*over, "max_steps=3", "resume=latest"]).stdout
    assert "2 updates resumed" in out

    from launchers.export import main as export_main

    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "ema"), "--ema"]) == 0
    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "raw")]) == 0
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(tmp_path / "ema" / "unet").state_dict()
    assert_ema_matches(run, exported, steps=3)
    raw = UNet2DConditionModel.from_pretrained(tmp_path / "raw" / "unet").state_dict()
    torch.testing.assert_close(raw, launch.final_weights(run), rtol=0, atol=0)
    card = (tmp_path / "ema" / "README.md").read_text()
    assert "EMA of the trained weights (fp32, decay 0.9999, 3 updates)" in card
    assert "the trained weights" in (tmp_path / "raw" / "README.md").read_text()


def test_bf16_zero2_ema_swap_for_validation_and_export_refusal(tmp_path, tiny_config):
    """One rank, ZeRO-2 (DeepSpeed's fp32 fragments): the average after 3 steps, the module holding the EMA weights
    inside `swapped_in` and exactly its trained weights after; a run without EMA refuses --ema in one line."""
    from tcscale.train.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, *COMMON, "max_steps=3", "deepspeed.zero_optimization.stage=2"))
    result = trainer.fit()
    assert result.step == 3
    assert_ema_matches(run, load_ema_state_dict(run / "checkpoints" / "step3"), steps=3)
    params = {n: p for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    ema = load_ema_state_dict(run / "checkpoints" / "step3")
    with trainer.ema.swapped_in():
        for n, p in params.items():
            assert p.dtype == torch.bfloat16
            torch.testing.assert_close(p.detach(), ema[n].to(torch.bfloat16), rtol=0, atol=0)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)

    plain = tmp_path / "plain"
    Trainer(tiny_config(plain, "tracking.enabled=false")).fit()
    from launchers.export import main as export_main

    assert export_main(["--run-dir", str(plain), "--out", str(tmp_path / "x"), "--ema"]) == 2
    assert not (tmp_path / "x").exists()
