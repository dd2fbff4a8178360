"""Table 4's protocol on tiny models: null-text inversion against plain DDIM inversion, DAAM's heat-map aggregation
against an independent computation, and a tiny CPU run of configs/eval/sd14_table4.yaml."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tcscale.eval.config import EvalModelConfig, SamplerConfig, load_eval_config
from tcscale.eval.daam import (
    HeadMapCapture,
    daam_heat_maps,
    ddim_inversion,
    mask_iou,
    null_text_optimization,
    regenerate,
    word_mask,
    word_token_indices,
)
from tcscale.eval.generation import load_pipeline

PROMPT = "a photo of a red circle and a blue star"


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from tcscale.config import TinyModelConfig
    from tcscale.models.architectures import build_tiny_components
    from tcscale.models.sd import save_pipeline_dir

    return save_pipeline_dir(build_tiny_components(TinyModelConfig(), 64), tmp_path_factory.mktemp("pipe") / "p")


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(str(tiny_pipeline_dir), EvalModelConfig(pretrained="x"), SamplerConfig("ddim"), "cpu")


def _embeddings(pipe):
    with torch.no_grad():
        return pipe.encode_prompt(PROMPT, "cpu", 1, False)[0], pipe.encode_prompt("", "cpu", 1, False)[0]


def _image_latent(pipe):
    """The latent of an image the tiny model made itself (so the prompt describes it as well as it can)."""
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    x = torch.from_numpy(np.asarray(image.images[0], dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def test_null_text_inversion_reconstructs_better_than_plain_ddim_inversion(pipe):
    cond, empty = _embeddings(pipe)
    latent = _image_latent(pipe)
    steps, config = 5, pipe.scheduler.config
    trajectory = ddim_inversion(pipe.unet, config, latent, cond, steps)
    assert len(trajectory) == steps + 1 and torch.equal(trajectory[0], latent)
    plain = regenerate(pipe.unet, config, trajectory[-1], cond, [empty] * steps, guidance=7.5)
    # a tiny random text space: a larger step than SD's 1e-2 reaches the trajectory in 20 iterations
    unconds = null_text_optimization(
        pipe.unet, config, trajectory, cond, empty, guidance=7.5, inner_steps=20, learning_rate=0.1
    )
    assert len(unconds) == steps and not torch.equal(unconds[0], empty)
    inverted = regenerate(pipe.unet, config, trajectory[-1], cond, unconds, guidance=7.5)
    err_plain, err_null = F.mse_loss(plain, latent).item(), F.mse_loss(inverted, latent).item()
    print(f"reconstruction MSE of the latent: plain DDIM inversion {err_plain:.3e}, null-text {err_null:.3e}")
    assert err_null < 0.2 * err_plain  # measured: 0.28 against 3.10
    assert all(p.requires_grad for p in pipe.unet.parameters())  # the optimisation froze the U-Net only meanwhile


def test_heat_maps_against_an_independent_computation(pipe):
    """DAAM's aggregation recomputed from each step's probabilities (per step upsampled and summed: bicubic is linear,
    so the order of sum and upsampling does not matter before the clamp), then the word map and its mask."""
    from diffusers import DDIMScheduler

    from tcscale.attention.plan import GroundingPlan
    from tcscale.attention.processors import observe
    from tcscale.attention.recorders import ProbsRecorder

    cond, empty = _embeddings(pipe)
    steps, config, side = 3, pipe.scheduler.config, 8
    z_T = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))
    plan = GroundingPlan.build(pipe.unet, blocks=["down", "up"], resolutions=None, image_resolution=64, scale_factor=8)
    observe(pipe.unet, plan)
    capture = HeadMapCapture((side, side))
    regenerate(pipe.unet, config, z_T, cond, [empty] * steps, guidance=7.5, recorder=capture)
    assert set(capture.maps) == set(plan.layers) and not any("mid_block" in n for n in capture.maps)
    heat = daam_heat_maps({k: v[0] for k, v in capture.maps.items()}, side)

    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(steps)
    latent, per_layer_head = z_T, {}
    with torch.no_grad():
        for t in sched.timesteps:
            eps_u = pipe.unet(latent, t, encoder_hidden_states=empty).sample
            with ProbsRecorder((side, side)) as rec:
                eps_c = pipe.unet(latent, t, encoder_hidden_states=cond, cross_attention_kwargs=rec.kwargs).sample
            for r in rec.records:
                h = r.size[0]
                for head in range(r.probs.shape[1]):
                    m = r.probs[0, head].T.reshape(-1, 1, h, h).double()  # (tokens, 1, h, w)
                    up = F.interpolate(m, size=(side, side), mode="bicubic")[:, 0]
                    key = (r.name, head)
                    per_layer_head[key] = per_layer_head.get(key, 0) + up
            latent = sched.step(eps_u + 7.5 * (eps_c - eps_u), t, latent).prev_sample
    expected = torch.stack([m.clamp(min=0) for m in per_layer_head.values()]).mean(0)
    torch.testing.assert_close(heat.double(), expected, rtol=1e-4, atol=1e-6)

    idx = word_token_indices(pipe.tokenizer, PROMPT, "circle")
    assert idx == [6]  # <start> a photo of a red circle: "circle" is the 6th token after the start token
    assert word_token_indices(pipe.tokenizer, "a cat and a cat", "cat") == [2, 5]  # every occurrence
    assert word_token_indices(pipe.tokenizer, PROMPT, "zebra") == []
    up = F.interpolate(expected[6][None, None], size=(64, 64), mode="bicubic")[0, 0]
    norm = (up - up.min()) / (up.max() - up.min() + 1e-8)
    assert torch.equal(word_mask(heat[idx].mean(0), (64, 64), 0.4), norm > 0.4)


def test_maps_at_an_eighth_of_the_latent_side_are_left_out():
    rng = torch.Generator().manual_seed(0)
    full = {"a": torch.rand(2, 64, 5, generator=rng), "b": torch.rand(2, 16, 5, generator=rng)}
    with_small = {**full, "mid": torch.rand(2, 1, 5, generator=rng)}  # a 1x1 map of an 8x8 latent
    torch.testing.assert_close(daam_heat_maps(with_small, 8), daam_heat_maps(full, 8))
    assert daam_heat_maps(full, 8).shape == (5, 8, 8)
    assert mask_iou(torch.tensor([[1, 1], [0, 0]]), torch.tensor([[1, 0], [1, 0]])) == pytest.approx(1 / 3)


def _fake_cocogen(root, pipe, n=2):
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"{i:04d}"
        folder.mkdir(parents=True)
        (folder / "prompt.txt").write_text(f"a red circle and a blue star {i}\n")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "output.png")
        for word, box in (("circle", (4, 4, 30, 30)), ("star", (30, 30, 60, 60)), ("zebra", (0, 0, 10, 10))):
            alpha = np.zeros((64, 64), np.uint8)
            alpha[box[1] : box[3], box[0] : box[2]] = 255
            rgba = np.dstack([np.zeros((64, 64, 3), np.uint8), alpha])
            Image.fromarray(rgba, "RGBA").save(folder / f"{word}.gt.png")


def test_sd14_table4_runs_on_tiny_models(tiny_pipeline_dir, pipe, tmp_path):
    from tcscale.eval.compare import compare_table
    from tcscale.eval.runner import EvalContext, Evaluation

    _fake_cocogen(tmp_path / "coco-gen", pipe)
    overrides = [
        "model.run_dir=null", f"model.pretrained={tiny_pipeline_dir}", f"output_dir={tmp_path / 'e'}",
        f"daam_cocogen.data_dir={tmp_path / 'coco-gen'}", "daam_cocogen.num_inference_steps=3",
        "daam_cocogen.inner_steps=2", "daam_cocogen.resolution=64",
    ]  # fmt: skip
    cfg = load_eval_config("configs/eval/sd14_table4.yaml", overrides)
    results = Evaluation(cfg, EvalContext(progress=False)).run()
    records = [json.loads((tmp_path / "e" / "daam_cocogen" / "records" / f"{i:04d}.json").read_text()) for i in (0, 1)]
    assert [[r["word"] for r in rs] for rs in records] == [["circle", "star"]] * 2  # "zebra" is not in the prompt
    ious = [r["iou"] for rs in records for r in rs]
    assert all(0.0 <= v <= 1.0 for v in ious)
    assert results["metrics"]["daam_cocogen/miou"] == pytest.approx(np.mean(ious))
    assert results["protocol"]["daam_cocogen"]["suite"] == "daam_cocogen"
    assert results["protocol"]["daam_cocogen"]["samples"] == 2 and results["protocol"]["daam_cocogen"]["words"] == 4
    row = compare_table([results]).splitlines()[2]
    assert "†" not in row  # the suite is Table 4's: its value stands beside the paper's unmarked
