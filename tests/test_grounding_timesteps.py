"""objective.tokencompose.grounding_min_timestep: only the samples at t >= it ground their phrases."""

from __future__ import annotations

import pytest
import torch

from tcscale.config import ConfigError, load_config
from tests.test_caption_dropout import TINY, reference_terms, run_step, tokencompose_parts

KEY = "objective.tokencompose.grounding_min_timestep"


def test_only_the_late_timesteps_of_the_kept_captions_are_grounded(tmp_path):
    """With caption dropout 0.5 and the threshold 500, a step whose batch holds a dropped sample, a kept one at
    t < 500 and a kept one at t >= 500: the step's token and pixel terms are the grounding losses of the kept late
    samples only, computed independently from the recorded attention probabilities."""
    threshold, B = 500, 4
    obj, _, batch = tokencompose_parts(tmp_path, 0.5, B, (f"{KEY}={threshold}",))

    def kinds(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        nb = obj.noised(batch, torch.Generator().manual_seed(seed))
        dropped = nb.dropped if nb.dropped is not None else torch.zeros(B, dtype=torch.bool)
        return dropped, nb.timesteps >= threshold

    def mixed(seed: int) -> bool:
        dropped, late = kinds(seed)
        return bool(dropped.any() and (~dropped & late).any() and (~dropped & ~late).any())

    seed = next(s for s in range(1000, 3000) if mixed(s))
    out, nb, probs = run_step(obj, batch, seed)
    dropped, late = kinds(seed)
    grounded = ~dropped & late
    token, pixel = reference_terms(obj, batch, probs, grounded)
    assert token > 0 and pixel > 0
    assert out.terms["token"].item() == pytest.approx(token, rel=1e-5)
    assert out.terms["pixel"].item() == pytest.approx(pixel, rel=1e-5)
    kept = reference_terms(obj, batch, probs, ~dropped)  # what the step would be without the threshold
    assert kept[0] != pytest.approx(token, rel=1e-3) and kept[1] != pytest.approx(pixel, rel=1e-3)


def test_a_threshold_above_every_timestep_grounds_nothing(tmp_path):
    obj, _, batch = tokencompose_parts(tmp_path, 0.0, 2, (f"{KEY}=1000",))
    out, _, _ = run_step(obj, batch, 1000)
    assert out.terms["token"].item() == 0.0 and out.terms["pixel"].item() == 0.0
    assert out.loss.item() == out.terms["ldm"].item()


def test_a_negative_threshold_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=KEY.replace(".", r"\.") + " must be >= 0, got -1"):
        load_config(
            TINY,
            [f"output_dir={tmp_path}", "objective.name=tokencompose", f"{KEY}=-1"],
        )
