"""data.caption_dropout: empty captions for classifier-free guidance, drawn from the step's seed, resume-exact."""

from __future__ import annotations

import shutil

import pytest
import torch

from tcscale.config import ConfigError, load_config
from tcscale.models.conditioning import caption_dropout_mask, drop_captions, empty_caption_ids
from tcscale.train import trainer as trainer_mod
from tests.helpers import launch

TINY = "configs/tiny_cpu.yaml"


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + i) for i in range(n)]


def test_p_one_drops_every_caption_and_p_zero_none(sd_tokenizer):
    ids = torch.tensor(
        sd_tokenizer(["a photo of a red circle", "a blue star"], max_length=77, padding="max_length").input_ids
    )
    empty = empty_caption_ids(sd_tokenizer, 77)
    assert empty[0] == sd_tokenizer.bos_token_id and empty[1] == sd_tokenizer.eos_token_id
    for g in generators(20):
        dropped = drop_captions(ids, caption_dropout_mask(g, 2, 1.0), empty)
        assert torch.equal(dropped, empty.expand(2, 77))
        assert drop_captions(ids, caption_dropout_mask(g, 2, 0.0), empty) is ids
    assert not torch.equal(ids[0], empty)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_fraction_dropped_is_p_and_a_function_of_the_seed(p):
    masks = torch.stack([caption_dropout_mask(g, 16, p) for g in generators(2000)])
    assert abs(masks.float().mean().item() - p) < 0.01  # 32,000 draws: the binomial std is <= 0.003
    again = torch.stack([caption_dropout_mask(g, 16, p) for g in generators(2000)])
    assert torch.equal(masks, again)
    assert not torch.equal(masks[:1000], masks[1000:])


def test_the_step_generator_stream_is_untouched():
    """Dropping draws from a derived generator: the step's noise and timesteps are those of p = 0."""
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    caption_dropout_mask(a, 16, 0.5)
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_empty_caption_is_what_the_pipeline_encodes_for_guidance(tiny_config, tmp_path):
    """The trained unconditional branch is the one StableDiffusionPipeline subtracts at guidance_scale > 1."""
    from tcscale.families import family_of
    from tcscale.models.sd import load_components

    cfg = tiny_config(tmp_path, "objective.name=ldm")
    comps = load_components(cfg.model, cfg.data.resolution)
    pipe = family_of(cfg.model).pipeline(comps)
    _, negative = pipe.encode_prompt("a photo of a red circle", "cpu", 1, True)
    ours = comps.text_encoder(empty_caption_ids(comps.tokenizer, 77)[None])[0]
    torch.testing.assert_close(negative, ours, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_out_of_range_names_the_key_on_one_line(value):
    with pytest.raises(ConfigError, match=r"data\.caption_dropout must be in \[0, 1\)") as info:
        load_config(TINY, ["objective.name=ldm", f"data.caption_dropout={value}"])
    assert "\n" not in str(info.value)


def test_an_objective_that_reads_no_captions_refuses_it():
    """SepEn is data-free (its prompts are the concept list): the key is refused, naming the objectives that apply
    it."""
    with pytest.raises(ConfigError, match=r"data\.caption_dropout=0\.1: objective 'sepen'") as info:
        load_config(TINY, ["objective.name=sepen", "data.caption_dropout=0.1"])
    assert "\n" not in str(info.value) and "ldm | tokencompose" in str(info.value)
    assert load_config(TINY, ["objective.name=sepen"]).data.caption_dropout == 0.0


def tokencompose_parts(tmp_path, p: float, batch_size: int = 4, overrides: tuple[str, ...] = ()):
    """A TokenCompose objective on the tiny model at `data.caption_dropout=p`, its components and one loader batch."""
    from tcscale.data import build_train_loader
    from tcscale.models.architectures import build_tiny_components
    from tcscale.objectives import OBJECTIVES, BuildContext

    cfg = load_config(
        TINY,
        [f"output_dir={tmp_path}", f"deepspeed.train_micro_batch_size_per_gpu={batch_size}",
         "tracking.enabled=false", "objective.name=tokencompose", f"data.caption_dropout={p}", *overrides],
    )  # fmt: skip
    comps = build_tiny_components(cfg.model.tiny, cfg.data.resolution)
    ctx = BuildContext(cfg, comps, torch.float32, torch.device("cpu"), micro_batch_size=batch_size)
    obj = OBJECTIVES["tokencompose"].build(cfg.objective.tokencompose, ctx)
    loader = build_train_loader(
        cfg.data, comps.tokenizer, rank=0, world_size=1, micro_batch_size=batch_size, seed=0, plan=obj.plan
    )
    return obj, comps, loader.next_batch()


def run_step(obj, batch, seed: int):
    """One real step of `obj` with the generator seed `seed`, and its inputs again (the same seed: the same noise,
    timesteps and drop) with every grounded layer's attention probabilities."""
    from tcscale.attention.recorders import ProbsRecorder

    with torch.no_grad():
        out = obj(obj.module, batch, torch.Generator().manual_seed(seed))
        nb = obj.noised(batch, torch.Generator().manual_seed(seed))
        with ProbsRecorder(tuple(nb.latents.shape[-2:])) as rec:
            obj.module(nb.noisy, nb.timesteps, nb.text, cross_attention_kwargs=rec.kwargs)
    return out, nb, {r.name: r.probs for r in rec.records}


def reference_terms(obj, batch, probs, samples: torch.Tensor) -> tuple[float, float]:
    """The token and pixel terms summed over the grounded layers, computed by tcscale.losses.grounding on the
    recorded probabilities of `samples` (B,) bool only."""
    from tcscale.losses import grounding_losses

    terms = [
        grounding_losses(
            probs[n][samples], batch["layer_masks"][(obj.plan.side_of(n),) * 2][samples],
            batch["token_phrase"][samples],
        )
        for n in obj.plan.layers
    ]  # fmt: skip
    return sum(t["token"].item() for t in terms), sum(t["pixel"].item() for t in terms)


def tokencompose_step(tmp_path, p: float, seed: int, batch_size: int = 4):
    """`run_step` of `tokencompose_parts`."""
    obj, comps, batch = tokencompose_parts(tmp_path, p, batch_size)
    out, nb, probs = run_step(obj, batch, seed)
    return obj, comps, batch, out, nb, probs


def test_tokencompose_grounds_only_the_samples_that_keep_their_caption(tmp_path):
    """A dropped sample trains the unconditional branch with L_LDM alone: the step's token and pixel terms are the
    grounding losses (tcscale.losses.grounding) of the kept samples only, its text is the empty caption's encoding."""
    p, B = 0.5, 4
    seed = next(
        s for s in range(1000, 2000) if 0 < int(caption_dropout_mask(torch.Generator().manual_seed(s), B, p).sum()) < B
    )
    obj, comps, batch, out, nb, probs = tokencompose_step(tmp_path, p, seed, B)
    drop = caption_dropout_mask(torch.Generator().manual_seed(seed), B, p)
    assert torch.equal(nb.dropped, drop)
    keep = ~drop
    with torch.no_grad():
        empty = comps.text_encoder(empty_caption_ids(comps.tokenizer, 77)[None])[0][0]
    torch.testing.assert_close(nb.text[drop], empty.expand(int(drop.sum()), -1, -1), rtol=0, atol=0)
    assert (batch["token_phrase"][drop] >= 0).any(), "the dropped samples had phrases to leave out"

    token, pixel = reference_terms(obj, batch, probs, keep)
    assert out.terms["token"].item() == pytest.approx(token, rel=1e-5)
    assert out.terms["pixel"].item() == pytest.approx(pixel, rel=1e-5)
    # grounding the dropped samples too would give another value
    everyone = reference_terms(obj, batch, probs, torch.ones(B, dtype=torch.bool))
    assert everyone[0] != pytest.approx(token, rel=1e-3) and everyone[1] != pytest.approx(pixel, rel=1e-3)


def test_tokencompose_with_every_caption_dropped_is_the_ldm_loss(tmp_path):
    """p 0.9, a step whose two samples are both dropped: nothing is grounded, the loss is L_LDM (on empty captions)."""
    seed = next(s for s in range(1000, 2000) if caption_dropout_mask(torch.Generator().manual_seed(s), 2, 0.9).all())
    _, _, _, out, _, _ = tokencompose_step(tmp_path, 0.9, seed, batch_size=2)
    assert out.terms["token"].item() == 0.0 and out.terms["pixel"].item() == 0.0
    assert out.loss.item() == out.terms["ldm"].item()


def test_ldm_run_with_dropout_trains_differently_and_resumes_exactly(tiny_config, tmp_path):
    """The real trainer: dropout changes the weights (it is applied), and a run cut at its step-2 checkpoint resumes
    to the uninterrupted run's step-4 weights."""
    common = ["objective.name=ldm", "max_steps=4", "checkpoint.every_steps=2", "tracking.enabled=false"]
    ref = tmp_path / "dropout"
    trainer_mod.train(tiny_config(ref, *common, "data.caption_dropout=0.5"))
    plain = tmp_path / "plain"
    trainer_mod.train(tiny_config(plain, *common))
    a, b = launch.final_weights(ref), launch.final_weights(plain)
    assert any(not torch.equal(a[k], b[k]) for k in a), "caption_dropout=0.5 trained the same weights as 0"

    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step4")
    (run / "checkpoints" / "latest").write_text("step2")
    result = trainer_mod.train(tiny_config(run, *common, "data.caption_dropout=0.5", "resume=latest"))
    assert result.step == 4
    resumed = launch.final_weights(run)
    assert resumed.keys() == a.keys()
    for k in a:
        torch.testing.assert_close(resumed[k], a[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
