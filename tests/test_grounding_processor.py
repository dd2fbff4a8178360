"""Grounding attention processors on a real (tiny) diffusers U-Net."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from tcscale.attention.masks import masks_to_layer
from tcscale.attention.processors import install_grounding_processors
from tcscale.attention.recorders import LossRecorder, MapCapture, ProbsRecorder
from tcscale.config import TinyModelConfig
from tcscale.families.layout import UNET_LAYOUT, select_layers
from tcscale.families.sd import tiny_unet
from tcscale.losses import grounding_losses


def recorder(masks, token_phrase, **kw) -> LossRecorder:
    return LossRecorder((8, 8), token_phrase, phrase_masks=masks, **kw)


def test_layer_selection_on_sd14_layout():
    """SD1.4 at 512 px: mid + up blocks = 10 grounded layers at 8², 3x16², 3x32², 3x64² (docs/DESIGN.md §3)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults = SD1.x layout
    names = select_layers(unet, ["mid", "up"], None, 64)
    sides = sorted(UNET_LAYOUT.latent_side(unet, n, 64) for n in names)
    assert sides == [8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert select_layers(unet, ["down", "mid", "up"], [16], 64) == [
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
    ]


def test_output_unchanged_and_losses_match_reference(grounded_unet, grounding_inputs):
    unet, plan = grounded_unet()
    names = list(plan.layers)
    plain = copy.deepcopy(unet)
    plain.set_attn_processor(AttnProcessor2_0())
    latents, t, text, masks, token_phrase = grounding_inputs()
    with torch.no_grad():
        with recorder(masks, token_phrase) as ctx:
            out = unet(latents, t, text, cross_attention_kwargs=ctx.kwargs).sample
        ref = plain(latents, t, text).sample
        no_ctx = unet(latents, t, text).sample
        with ProbsRecorder((8, 8)) as probs, MapCapture((8, 8)) as maps:
            out_probs = unet(latents, t, text, cross_attention_kwargs=probs.kwargs).sample
            out_maps = unet(latents, t, text, cross_attention_kwargs=maps.kwargs).sample
    for other in (out, no_ctx, out_probs, out_maps):  # every recorder computes the same attention output
        assert torch.allclose(other, ref, atol=1e-5)
    assert sorted(r.name for r in ctx.records) == sorted(names) and len(names) == 5
    assert sorted(r.name for r in probs.records) == sorted(names) and set(maps.maps) == set(names)
    for r in probs.records:  # the head average of the recorded probabilities is what the capture keeps
        torch.testing.assert_close(maps.maps[r.name], r.probs.mean(1))

    # independent recomputation of one layer's losses from its own q, k
    name = names[-1]
    attn_mod = dict(unet.named_modules())[name]
    captured = {}
    attn_mod.register_forward_pre_hook(
        lambda m, a, kw: captured.update(h=a[0], e=kw["encoder_hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        with recorder(masks, token_phrase) as ctx2:
            unet(latents, t, text, cross_attention_kwargs=ctx2.kwargs)
        h, e = captured["h"], captured["e"]
        B, Lq, _ = h.shape
        heads = attn_mod.heads
        q = attn_mod.to_q(h).view(B, Lq, heads, -1).transpose(1, 2)
        k = attn_mod.to_k(e).view(B, 77, heads, -1).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * attn_mod.scale).softmax(-1)
        side = int(Lq**0.5)
        expected = grounding_losses(probs, masks_to_layer(masks, (side, side)), token_phrase)
    rec = next(r for r in ctx2.records if r.name == name)
    assert rec.size == (side, side)
    assert rec.token.item() == pytest.approx(expected["token"].item(), rel=1e-5)
    assert rec.pixel.item() == pytest.approx(expected["pixel"].item(), rel=1e-5)


def grounding_grads(unet, inputs, use_checkpointing: bool):
    latents, t, text, masks, token_phrase = inputs
    unet.zero_grad(set_to_none=True)
    if use_checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    with recorder(masks, token_phrase) as ctx:
        unet(latents, t, text, cross_attention_kwargs=ctx.kwargs)
    n_records = len(ctx.records)
    loss = sum(r.token + r.pixel for r in ctx.records)  # grounding terms only: no LDM gradient at all
    loss.backward()
    assert len(ctx.records) == n_records  # the checkpoint's recompute recorded nothing
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_grounding_gradients_survive_activation_checkpointing(grounded_unet, grounding_inputs):
    unet, plan = grounded_unet()
    names = plan.layers
    plain = grounding_grads(unet, grounding_inputs(), use_checkpointing=False)
    ckpt = grounding_grads(unet, grounding_inputs(), use_checkpointing=True)
    # the grounding terms reach the U-Net's weights: the grounded layers' q/k and layers before them
    for key in (
        f"{names[0]}.to_k.weight",
        f"{names[0]}.to_q.weight",
        "conv_in.weight",
        "down_blocks.0.resnets.0.conv1.weight",
    ):
        assert key in ckpt and ckpt[key].abs().sum() > 0, key
    assert plain.keys() == ckpt.keys()
    for key in plain:
        assert torch.allclose(plain[key], ckpt[key], rtol=1e-4, atol=1e-7), key


def test_sample_without_phrases_gives_zero_terms_and_runs(grounded_unet, grounding_inputs):
    unet, _ = grounded_unet()
    latents, t, text, masks, _ = grounding_inputs()
    token_phrase = torch.full((2, 77), -1, dtype=torch.long)
    with recorder(masks, token_phrase) as ctx:
        out = unet(latents, t, text, cross_attention_kwargs=ctx.kwargs).sample
    assert torch.isfinite(out).all()
    assert all(r.token.item() == 0 and r.pixel.item() == 0 for r in ctx.records)
    sum(r.token + r.pixel for r in ctx.records).backward()  # still a graph: every rank runs backward


def test_fused_backend_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    unet = tiny_unet(TinyModelConfig(), 8)
    with pytest.raises(RuntimeError, match="(?i)gpu|cuda|triton"):
        install_grounding_processors(unet, select_layers(unet, ["up"], None, 8), "fused")


def test_recorder_records_only_inside_its_block(grounded_unet, grounding_inputs):
    """Closed after its `with` block, a recorder computes the same values but records nothing more (what an
    activation checkpoint's recompute relies on); never opened, it records nothing at all."""
    unet, plan = grounded_unet()
    latents, t, text, masks, token_phrase = grounding_inputs()
    rec = recorder(masks, token_phrase)
    with torch.no_grad():
        unet(latents, t, text, cross_attention_kwargs=rec.kwargs)
        assert rec.records == []
        with rec:
            unet(latents, t, text, cross_attention_kwargs=rec.kwargs)
        unet(latents, t, text, cross_attention_kwargs=rec.kwargs)
    assert sorted(r.name for r in rec.records) == sorted(plan.layers)


def test_token_phrase_checked_once_per_forward(grounded_unet, grounding_inputs):
    """The recorder validates token_phrase once for the batch (naming the range); a validated recorder makes the
    layers skip their own validation, with the same losses as unvalidated layers."""
    unet, _ = grounded_unet()
    latents, t, text, masks, token_phrase = grounding_inputs()
    bad = token_phrase.clone()
    bad[1, 5] = masks.shape[1]  # a phrase slot that does not exist
    with pytest.raises(ValueError, match=rf"token_phrase values .* P={masks.shape[1]} .* \[-1, {masks.shape[1]}\]"):
        recorder(masks, bad)
    assert not recorder(masks, bad, validate=False).validated
    losses = []
    for check in (False, True):
        with recorder(masks, token_phrase, validate=check) as ctx:
            unet(latents, t, text, cross_attention_kwargs=ctx.kwargs)
        assert ctx.validated == check
        losses.append([(r.token.item(), r.pixel.item()) for r in ctx.records])
    assert losses[0] == losses[1] and len(losses[0]) > 0
