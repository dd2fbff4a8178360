"""LDM loss options (min-SNR, v-prediction, noise offset), EMA and checkpoint pruning in a real run."""

from __future__ import annotations

import pytest
import torch

from tcscale.losses.diffusion import diffusion_target, ldm_loss, sample_noise
from tcscale.models.architectures import sd_noise_scheduler
from tcscale.train import trainer as trainer_mod


def alphas(scheduler, t):
    a = scheduler.alphas_cumprod[t].double()
    return a.sqrt(), (1 - a).sqrt()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_matches_formula(prediction_type):
    sched = sd_noise_scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 300, 900])
    a, s = alphas(sched, t)
    snr = (a / s) ** 2  # SNR(t) = alpha_bar / (1 - alpha_bar)
    w = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    per_sample = ((pred - target).double() ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * w).mean()
    assert ldm_loss(pred, target, t, sched, snr_gamma=5.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert ldm_loss(pred, target, t, sched).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)


def test_v_prediction_target_and_noise_offset():
    sched = sd_noise_scheduler("v_prediction")
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    a, s = alphas(sched, t)
    v = a.view(-1, 1, 1, 1) * noise.double() - s.view(-1, 1, 1, 1) * latents.double()
    torch.testing.assert_close(diffusion_target(sched, latents, noise, t).double(), v, rtol=1e-5, atol=1e-6)
    base = sample_noise(latents, torch.Generator().manual_seed(3))
    shifted = sample_noise(latents, torch.Generator().manual_seed(3), noise_offset=0.1)
    diff = shifted - base  # the same per-(sample, channel) constant at every pixel
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff)) and diff.abs().max() > 0


def test_ema_and_keep_last_k(tmp_path, tiny_config):
    cfg = tiny_config(
        tmp_path,
        *[
            "max_steps=4",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=2",
            "ema.enabled=true",
            "ema.decay=0.5",
            "objective.ldm.snr_gamma=5.0",
            "objective.ldm.noise_offset=0.05",
            "tracking.enabled=false",
        ],
    )
    result = trainer_mod.train(cfg)
    assert result.step == 4
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(("step", "tmp")))
    assert ckpts == ["step3", "step4"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step4"
    ema = torch.load(tmp_path / "checkpoints" / "step4" / "ema-rank00000.pt", map_location="cpu")
    assert ema["updates"] == 4 and ema["decay"] == 0.5 and len(ema["shares"]) > 0
