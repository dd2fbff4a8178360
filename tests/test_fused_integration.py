"""attention.backend=fused: the Triton kernel (interpreter on CPU) inside the U-Net equals the reference backend."""

from __future__ import annotations

import pytest
import torch

from tcscale.attention.plan import GroundingPlan
from tcscale.attention.processors import install_grounding_processors
from tcscale.attention.recorders import LossRecorder

pytestmark = pytest.mark.interpret


def forward_backward(unet, names, backend, inputs, heads="mean_map"):
    latents, t, text, masks, token_phrase = inputs
    install_grounding_processors(unet, names, backend)
    unet.zero_grad(set_to_none=True)
    with LossRecorder((8, 8), token_phrase, phrase_masks=masks, token_loss_heads=heads) as ctx:
        out = unet(latents, t, text, cross_attention_kwargs=ctx.kwargs).sample
    # a non-unit mix of the three outputs, so every gradient path of the kernel is exercised
    loss = out.square().mean() + sum(0.7 * r.token + 0.3 * r.pixel for r in ctx.records)
    loss.backward()
    losses = {r.name: (r.token.detach(), r.pixel.detach()) for r in ctx.records}
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return out.detach(), losses, grads


@pytest.mark.parametrize("heads", ["mean_map", "per_head"])
def test_fused_backend_matches_reference_through_the_unet(heads, grounded_unet, grounding_inputs):
    """Both token-loss definitions (objective.tokencompose.token_loss_heads) through the fused backend equal the
    reference."""
    unet, plan = grounded_unet()
    names = list(plan.layers)
    out_ref, loss_ref, grad_ref = forward_backward(unet, names, "reference", grounding_inputs(), heads)
    out_fused, loss_fused, grad_fused = forward_backward(unet, names, "fused", grounding_inputs(), heads)
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


def _sd14_run(unet, names, backend, dtype, inputs):
    latents, t, text, masks, token_phrase = inputs
    install_grounding_processors(unet, names, backend)
    unet.zero_grad(set_to_none=True)
    with LossRecorder((64, 64), token_phrase, phrase_masks=masks) as ctx:
        out = unet(latents.to(dtype), t, text.to(dtype), cross_attention_kwargs=ctx.kwargs).sample
    loss = 1e-3 * out.float().square().mean() + sum(r.token + r.pixel for r in ctx.records)
    loss.backward()
    losses = torch.stack([torch.stack([r.token, r.pixel]) for r in ctx.records]).double().flatten()
    grads = torch.cat([p.grad.double().flatten() for p in unet.parameters() if p.grad is not None])
    return losses, grads


@pytest.mark.gpu
def test_gpu_fused_in_sd14_unet_bf16_as_close_as_reference():
    """SD1.4's U-Net (released architecture, random weights, 512 px, batch 2) in bf16: the fused backend's
    per-layer losses and U-Net gradients are within 2x the bf16 reference backend's error against fp32."""
    import copy

    from tcscale.models.architectures import architecture, random_unet

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet32 = random_unet(architecture("sd14"))
    names = list(GroundingPlan.build(unet32, blocks=["mid", "up"], resolutions=None, image_resolution=512,
                                     scale_factor=8).layers)  # fmt: skip
    assert len(names) == 10
    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(2, 3, 512, 512)
    masks[0, 0, 40:300, 60:260] = 1
    masks[0, 1, 200:480, 250:500] = 1
    masks[0, 2, 10:120, 300:500] = 1
    masks[1, 0, 100:400, 100:400] = 1
    masks[1, 1, 0:256, 256:512] = 1
    token_phrase = torch.full((2, 77), -1, dtype=torch.long)
    token_phrase[0, [2, 3]], token_phrase[0, 5], token_phrase[0, [7, 8]] = 0, 1, 2
    token_phrase[1, 4], token_phrase[1, 6] = 0, 1
    inputs = (
        torch.randn(2, 4, 64, 64, generator=g).cuda(),
        torch.tensor([100, 700], device="cuda"),
        torch.randn(2, 77, 768, generator=g).cuda(),
        masks.cuda(),
        token_phrase.cuda(),
    )
    truth = _sd14_run(unet32, names, "reference", torch.float32, inputs)
    unet16 = copy.deepcopy(unet32).to(torch.bfloat16)
    del unet32
    ref = _sd14_run(unet16, names, "reference", torch.bfloat16, inputs)
    fused = _sd14_run(unet16, names, "fused", torch.bfloat16, inputs)
    for what, i in (("per-layer losses", 0), ("U-Net gradients", 1)):
        assert torch.isfinite(fused[i]).all(), what
        err_ref = ((ref[i] - truth[i]).norm() / truth[i].norm()).item()
        err_fused = ((fused[i] - truth[i]).norm() / truth[i].norm()).item()
        assert err_fused <= 2 * err_ref + 1e-3, (what, err_fused, err_ref)
