"""attention.backend=fused: the Triton kernel (interpreter on CPU) inside the U-Net equals the reference backend."""

from __future__ import annotations

import pytest
import torch

from tcscale.attention.grounding_processor import GroundingContext, install_grounding_processors
from tests.test_grounding_processor import grounded_unet, make_inputs

pytestmark = pytest.mark.interpret


def forward_backward(unet, names, backend):
    latents, t, text, masks, token_phrase = make_inputs()
    install_grounding_processors(unet, names, backend)
    unet.zero_grad(set_to_none=True)
    ctx = GroundingContext(latent_size=(8, 8), token_phrase=token_phrase, phrase_masks=masks)
    out = unet(latents, t, text, cross_attention_kwargs={"grounding": ctx}).sample
    # a non-unit mix of the three outputs, so every gradient path of the kernel is exercised
    loss = out.square().mean() + sum(0.7 * r.token + 0.3 * r.pixel for r in ctx.records)
    loss.backward()
    losses = {r.name: (r.token.detach(), r.pixel.detach()) for r in ctx.records}
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return out.detach(), losses, grads


def test_fused_backend_matches_reference_through_the_unet():
    unet, names = grounded_unet()
    out_ref, loss_ref, grad_ref = forward_backward(unet, names, "reference")
    out_fused, loss_fused, grad_fused = forward_backward(unet, names, "fused")
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-4, atol=1e-5)
    assert loss_ref.keys() == loss_fused.keys() == set(names)
    for name in names:
        torch.testing.assert_close(loss_fused[name][0], loss_ref[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_fused[name][1], loss_ref[name][1], rtol=1e-5, atol=1e-6)
    assert grad_ref.keys() == grad_fused.keys()
    for key in grad_ref:
        torch.testing.assert_close(
            grad_fused[key], grad_ref[key], rtol=1e-3, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}"
        )
