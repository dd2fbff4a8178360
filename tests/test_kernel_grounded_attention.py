"""Fused cross-attention + grounding losses (kernels/grounded_attention.py) against the PyTorch reference.

CPU tests run the Triton kernels under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA):
tiny awkward shapes, fp32 and fp16, every output and every gradient, compared with the same-dtype PyTorch reference
and with a float64 computation. GPU tests (marker ``gpu``) check bf16/fp16 at the real SD shapes with
flash-attention's rule (error vs float64 ≤ ~2× PyTorch's own same-dtype error), memory and determinism.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.grounded_attention as ga
import kernels.grounded_attention_compile_check as ga_check
from kernels import KernelConfig, cross_attention_with_grounding
from tcscale.attention.reference import cross_attention_with_grounding_reference

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_TOKEN, GRAD_PIXEL = 3.0, -2.0  # non-unit upstream gradients on the two scalar losses


def make_inputs(
    B: int,
    H: int,
    Lq: int,
    Lk: int,
    D: int,
    P: int,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    device: str = DEVICE,
    no_phrases: bool = False,
    logit_scale: float = 1.5,
) -> tuple[torch.Tensor, ...]:
    """q, k, v, phrase_masks (B, P, Lq) in {0,1}, token_phrase (B, Lk) with multi-token phrases, a padded phrase slot
    (P-1 has no token) and, for B ≥ 2, sample 1 without any phrase."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Lq, D, generator=gen) * logit_scale).to(device=device, dtype=dtype)
    k = (torch.randn(B, H, Lk, D, generator=gen) * logit_scale).to(device=device, dtype=dtype)
    v = torch.randn(B, H, Lk, D, generator=gen).to(device=device, dtype=dtype)
    phrase_masks = (torch.rand(B, P, Lq, generator=gen) > 0.6).float().to(device)
    token_phrase = torch.full((B, Lk), -1, dtype=torch.int64)
    if not no_phrases:
        for b in range(B):
            if B >= 2 and b == 1:
                continue  # a sample with no phrase (its mask slots are padding)
            pos = 1  # token 0 is SOT
            for p in range(max(P - 1, 0)):  # slot P-1 stays padded: no token points at it
                n_tokens = 1 + (p + b) % 3  # 1-3 BPE tokens per phrase
                for _ in range(n_tokens):
                    if pos < Lk:
                        token_phrase[b, pos] = p
                    pos += 2  # leave filler tokens between
    return q, k, v, phrase_masks, token_phrase.to(device)


def run_fused(inputs, grads, config=None, scale=None, heads="mean_map"):
    q, k, v, masks, token_phrase = inputs
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, token_loss, pixel_loss = cross_attention_with_grounding(
        q, k, v, masks, token_phrase, scale, config=config, token_loss_heads=heads
    )
    grad_out, grad_token, grad_pixel = grads
    torch.autograd.backward([out, token_loss, pixel_loss], [grad_out, grad_token, grad_pixel])
    return out.detach(), token_loss.detach(), pixel_loss.detach(), q.grad, k.grad, v.grad


def run_reference(inputs, grads, *, upcast: bool, scale=None, heads="mean_map"):
    q, k, v, masks, token_phrase = inputs
    dtype = torch.float64 if upcast else q.dtype  # float64 leaves: the truth's gradients are float64 too
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, token_loss, pixel_loss = cross_attention_with_grounding_reference(
        q, k, v, masks, token_phrase, scale, upcast=upcast, token_loss_heads=heads
    )
    grad_out, grad_token, grad_pixel = grads
    torch.autograd.backward(
        [out, token_loss, pixel_loss],
        [grad_out.to(out.dtype), grad_token.to(token_loss.dtype), grad_pixel.to(pixel_loss.dtype)],
    )
    return out.detach(), token_loss.detach(), pixel_loss.detach(), q.grad, k.grad, v.grad


def make_grads(out_shape, dtype, *, device=DEVICE, out_weight: float = 0.5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    grad_out = (torch.randn(*out_shape, generator=gen) * out_weight).to(device=device, dtype=dtype)
    f32 = dict(device=device, dtype=torch.float32)
    return grad_out, torch.tensor(GRAD_TOKEN, **f32), torch.tensor(GRAD_PIXEL, **f32)


NAMES = ("out", "token_loss", "pixel_loss", "dq", "dk", "dv")


def max_errors(results, truth) -> dict[str, float]:
    return {n: (a.double() - t.double()).abs().max().item() for n, a, t in zip(NAMES, results, truth)}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """|actual - expected| ≤ rel · max(1, max|expected|) elementwise (errors of softmax-based gradients scale with
    the largest entry, not with each entry)."""
    atol = rel * max(1.0, expected.double().abs().max().item())
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=0, atol=atol, msg=lambda m: f"{what} (atol {atol:.2e}): {m}"
    )


def assert_flash_rule(fused, ref_same_dtype, truth, *, factor: float = 2.0, atol: float = 1e-5) -> dict:
    """Error of the fused kernel vs float64 ≤ factor × error of the same-dtype PyTorch reference (+ atol)."""
    err_fused = max_errors(fused, truth)
    err_ref = max_errors(ref_same_dtype, truth)
    for name in NAMES:
        scale = max(1.0, truth[NAMES.index(name)].double().abs().max().item())
        assert err_fused[name] <= factor * err_ref[name] + atol * scale, (name, err_fused, err_ref)
    return err_fused


# ----------------------------------------------------------------------------------------------------------------------
# CPU, Triton interpreter
# ----------------------------------------------------------------------------------------------------------------------

# (B, H, Lq, Lk, D, P, config): Lq not a multiple of the block, Lk 77 and 20, d 40 → one zero-padded chunk of 64
# and d 80 → three head-dim chunks of 32 (the last one half padding), a split query axis (fp32 dK/dV partials)
# and no split.
SHAPES = {
    "sd-like": (3, 5, 37, 77, 40, 4, KernelConfig(block_m_fwd=16, block_m_bwd=16, num_splits=2)),
    "d80-lk20": (2, 2, 20, 20, 80, 3, KernelConfig(block_m_fwd=16, block_m_bwd=16, block_d=32)),
}


@pytest.mark.interpret
@pytest.mark.parametrize("heads", ["mean_map", "per_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_reference_and_float64(shape, dtype, heads):
    """out, both losses and dq, dk, dv against the same-dtype PyTorch reference and float64, for both token-loss
    definitions (mean_map: paper Eq. 5 on the head-averaged map; per_head: the official code's ratio per head)."""
    B, H, Lq, Lk, D, P, config = SHAPES[shape]
    inputs = make_inputs(B, H, Lq, Lk, D, P, dtype)
    grads = make_grads((B, H, Lq, D), dtype)
    fused = run_fused(inputs, grads, config, heads=heads)
    ref = run_reference(inputs, grads, upcast=False, heads=heads)
    truth = run_reference(inputs, grads, upcast=True, heads=heads)
    assert fused[1] > 0 and fused[2] > 0  # the losses are not trivially zero
    if heads == "per_head":  # the two definitions really differ on these inputs (H > 1)
        other = run_reference(inputs, grads, upcast=True, heads="mean_map")
        assert abs(truth[1].item() - other[1].item()) > 1e-3 * abs(truth[1].item())
    if dtype == torch.float32:
        for name, a, r, t in zip(NAMES, fused, ref, truth):
            assert_close_scaled(a, t, 2e-5, f"{name} vs float64")
            assert_close_scaled(a, r, 2e-5, f"{name} vs fp32 reference")
    else:
        assert_flash_rule(fused, ref, truth, atol=2e-4)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "B, H, Lq, Lk, D, P, fractional_masks",
    [(1, 1, 5, 3, 8, 1, False), (2, 2, 16, 77, 64, 16, True), (64, 5, 4, 6, 8, 2, False)],
    ids=["one-tiny-sample", "16-phrases-soft-masks", "batch-64"],
)
def test_edge_shapes(B, H, Lq, Lk, D, P, fractional_masks):
    """Lq below one block, Lk = 3, d = 8 (padded to 16), one sample; 16 phrase slots (BLOCK_P full) with masks in
    [0, 1] (the reference accepts them); a batch of 64 with 5 heads whose sample 1 has no phrase (batch mean over
    B_eff = 63)."""
    q, k, v, masks, token_phrase = make_inputs(B, H, Lq, Lk, D, P, torch.float32, seed=7)
    if B == 1:
        token_phrase[0, 1:] = 0  # tokens 1, 2 form the only phrase
    elif B == 2:
        token_phrase[:, 1 : 1 + 2 * P] = torch.arange(P).repeat_interleave(2)  # 16 phrases x 2 tokens, both samples
    else:
        assert (token_phrase[1] == -1).all() and (token_phrase[0] >= 0).any()  # make_inputs: sample 1 has none
    if fractional_masks:
        masks = torch.rand(masks.shape, generator=torch.Generator().manual_seed(8))
    inputs = (q, k, v, masks, token_phrase)
    grads = make_grads((B, H, Lq, D), torch.float32)
    fused = run_fused(inputs, grads, KernelConfig(block_m_fwd=16, block_m_bwd=16))
    truth = run_reference(inputs, grads, upcast=True)
    assert fused[1] > 0 and fused[2] > 0
    for name, a, t in zip(NAMES, fused, truth):
        assert_close_scaled(a, t, 2e-5, name)


@pytest.mark.interpret
@pytest.mark.parametrize("heads", ["mean_map", "per_head"])
def test_loss_gradients_alone_match_float64(heads):
    """Each loss's gradient on its own (the out gradient cannot hide an error in the folded-in loss gradient)."""
    B, H, Lq, Lk, D, P, config = SHAPES["sd-like"]
    q, k, v, masks, token_phrase = make_inputs(B, H, Lq, Lk, D, P, torch.float32, seed=3)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    _, token64, pixel64 = cross_attention_with_grounding_reference(
        q64, k64, v64, masks, token_phrase, token_loss_heads=heads
    )
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    _, token, pixel = cross_attention_with_grounding(
        qf, kf, vf, masks, token_phrase, config=config, token_loss_heads=heads
    )
    for fused_loss, loss64 in ((token, token64), (pixel, pixel64)):
        grads = torch.autograd.grad(fused_loss, (qf, kf, vf), retain_graph=True)
        grads64 = torch.autograd.grad(loss64, (q64, k64), retain_graph=True)
        for name, g, g64 in zip(("dq", "dk"), grads, grads64):
            assert g64.abs().max() > 1e-4, name  # the loss really reaches this input
            torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5 * g64.abs().max().item(), msg=name)
        assert torch.count_nonzero(grads[2]) == 0  # the losses do not depend on v


@pytest.mark.interpret
@pytest.mark.parametrize("masks_slots", [3, 0], ids=["all-tokens-unassigned", "zero-phrase-slots"])
def test_batch_without_phrases(masks_slots):
    """No sample has a phrase: both losses are 0 yet attached to the graph; gradients are those of out alone."""
    B, H, Lq, Lk, D = 2, 2, 20, 20, 40
    inputs = make_inputs(B, H, Lq, Lk, D, masks_slots, torch.float32, no_phrases=True)
    grads = make_grads((B, H, Lq, D), torch.float32)
    config = KernelConfig(block_m_fwd=16, block_m_bwd=16)
    q, k, v, masks, token_phrase = inputs
    qf = q.clone().requires_grad_()
    _, token_loss, pixel_loss = cross_attention_with_grounding(qf, k, v, masks, token_phrase, config=config)
    assert token_loss.item() == 0.0 and pixel_loss.item() == 0.0
    assert token_loss.requires_grad and pixel_loss.requires_grad and token_loss.grad_fn is not None
    fused = run_fused(inputs, grads, config)
    truth = run_reference(inputs, grads, upcast=True)
    for name, a, t in zip(NAMES, fused, truth):
        assert_close_scaled(a, t, 2e-5, name)


@pytest.mark.interpret
def test_noncontiguous_views_custom_scale_and_determinism():
    """Transposed (B, L, H, d) views as diffusers produces them give the same result as contiguous inputs; a custom
    scale is honoured; two runs are bit-identical (fixed-order reductions, no atomics)."""
    B, H, Lq, Lk, D, P = 2, 3, 21, 77, 40, 3
    config = KernelConfig(block_m_fwd=16, block_m_bwd=16, num_splits=2)
    q, k, v, masks, token_phrase = make_inputs(B, H, Lq, Lk, D, P, torch.float32, seed=5)
    q_view, k_view, v_view = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q_view.is_contiguous()
    grads = make_grads((B, H, Lq, D), torch.float32)
    scale = 0.3
    fused_view = run_fused((q_view, k_view, v_view, masks, token_phrase), grads, config, scale=scale)
    fused = run_fused((q, k, v, masks, token_phrase), grads, config, scale=scale)
    fused_again = run_fused((q, k, v, masks, token_phrase), grads, config, scale=scale)
    truth = run_reference((q, k, v, masks, token_phrase), grads, upcast=True, scale=scale)
    for name, a, b_, c, t in zip(NAMES, fused_view, fused, fused_again, truth):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(b_, c), f"{name} differs between two identical runs"
        assert_close_scaled(a, t, 2e-5, name)


@pytest.mark.interpret
@pytest.mark.parametrize("P, heads", [(4, "mean_map"), (4, "per_head"), (0, "per_head")])
def test_every_buffer_written_before_read_and_int32_token_phrase(monkeypatch, P, heads):
    """The launchers allocate without zero-fills: with every torch.empty / empty_like poisoned (NaN, or a huge
    integer), forward and backward give bit-identical results, so no kernel reads memory nothing wrote. An int32
    token_phrase gives the same results as int64 (both are read in place)."""
    B, H, Lq, Lk, D = 3, 2, 37, 20, 40
    config = KernelConfig(block_m_fwd=16, block_m_bwd=16, num_splits=2)
    inputs = make_inputs(B, H, Lq, Lk, D, P, torch.float32, seed=7)
    grads = make_grads((B, H, Lq, D), torch.float32)
    clean = run_fused(inputs, grads, config, heads=heads)
    int32_inputs = (*inputs[:4], inputs[4].to(torch.int32))
    for name, a, b_ in zip(NAMES, clean, run_fused(int32_inputs, grads, config, heads=heads)):
        assert torch.equal(a, b_), f"{name}: int32 token_phrase differs from int64"

    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(2**30)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    poisoned = run_fused(inputs, grads, config, heads=heads)
    monkeypatch.undo()
    for name, a, b_ in zip(NAMES, clean, poisoned):
        assert torch.isfinite(b_).all() and torch.equal(a, b_), f"{name} changes when fresh buffers hold garbage"


@pytest.mark.interpret
def test_saves_nothing_of_attention_size():
    """Nothing of size B·H·Lq·Lk is kept for backward: only q, k, v and O(B·H·Lq + B·P·Lq + B·Lk) reductions."""
    B, H, Lq, Lk, D, P = 2, 2, 20, 77, 16, 3
    q, k, v, masks, token_phrase = make_inputs(B, H, Lq, Lk, D, P, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    saved_numels = []

    def pack(t):
        saved_numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_attention_with_grounding(q, k, v, masks, token_phrase, config=KernelConfig(block_m_fwd=16))
    largest_allowed = max(q.numel(), k.numel(), B * H * Lq, B * P * Lq, B * 256)
    assert saved_numels and max(saved_numels) <= largest_allowed < B * H * Lq * Lk


@pytest.mark.interpret
def test_argument_errors():
    B, H, Lq, Lk, D, P = 2, 2, 16, 20, 16, 2
    q, k, v, masks, token_phrase = make_inputs(B, H, Lq, Lk, D, P, torch.float32)
    call = cross_attention_with_grounding
    with pytest.raises(ValueError, match="Lk"):
        big_k = torch.randn(B, H, 300, D)
        call(q, big_k, big_k, masks, torch.full((B, 300), -1))
    with pytest.raises(ValueError, match="phrase_masks"):
        call(q, k, v, masks[:, :, :-1], token_phrase)
    with pytest.raises(ValueError, match="token_phrase"):
        call(q, k, v, masks, token_phrase[:, :-1])
    with pytest.raises(TypeError, match="token_phrase"):
        call(q, k, v, masks, token_phrase.float())
    with pytest.raises(ValueError, match="token_phrase values"):
        call(q, k, v, masks, torch.full_like(token_phrase, P))
    with pytest.raises(ValueError, match="^k must"):
        call(q, k[..., :-1], v[..., :-1], masks, token_phrase)
    with pytest.raises(ValueError, match="^v must"):
        call(q, k, v[:, :, :-1], masks, token_phrase)
    with pytest.raises(TypeError, match="share a dtype"):
        call(q, k.half(), v, masks, token_phrase)
    with pytest.raises(ValueError, match="^q must"):
        call(q[0], k, v, masks, token_phrase)
    if ga.interpreter_enabled():
        with pytest.raises(TypeError, match="bfloat16"):
            call(q.bfloat16(), k.bfloat16(), v.bfloat16(), masks, token_phrase)


def test_clear_error_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not ga.triton_available()
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cross_attention_with_grounding(q, q, q, torch.zeros(1, 1, 4), torch.full((1, 4), -1))


def test_compiles_for_sm90_within_h100_shared_memory():
    """GPU compile of every planned launch (Triton AOT + bundled ptxas/cuobjdump, no GPU needed) at the extreme SD
    head dims, specialised as the JIT would specialise the launch: catches code the interpreter accepts but the GPU
    compiler refuses, blocks that would not fit an H100, and the code-quality regressions that cost speed: every
    kernel on tensor cores, 16-byte (not 2-byte) global accesses for q/out/dO/dQ (d = 40 has strides the JIT
    cannot prove aligned, so the kernels carry alignment hints), no fp64 arithmetic."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    reports = []
    for layout, head_dims, heads in (("diffusers", "40,160", "mean_map"), ("contiguous", "40", "per_head")):
        cmd = [sys.executable, "-m", "kernels.grounded_attention_compile_check", "--dtype", "bf16"]
        cmd += ["--head-dims", head_dims, "--layout", layout, "--token-loss-heads", heads]
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        reports += [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 12  # forward, finalize, batch mean, backward × 3 configurations
    assert {r["token_loss_heads"] for r in reports} == {"mean_map", "per_head"}
    for r in reports:
        assert r["shared_bytes"] <= ga_check.H100_SHARED_BYTES, r
        if "sass_fp64" not in r:
            continue  # no cuobjdump in this Triton build: the SASS checks cannot run
        assert r["sass_fp64"] == 0, r
        if r["kernel"] in ("forward", "backward"):
            assert r["sass_mma"] > 0 and r["sass_ldst_16bit"] == 0, r


def test_row_alignment_hint_is_what_the_strides_allow():
    """The ROW_ALIGN hint (elements every row offset is a multiple of) never claims more than the strides give."""
    from kernels.grounded_attention import _row_align

    assert _row_align(torch.empty(2, 8, 64, 40)) == 8  # contiguous d = 40: row stride 40
    assert _row_align(torch.empty(2, 64, 8, 40).transpose(1, 2)) == 8  # diffusers view: head stride 40
    assert _row_align(torch.empty(2, 64, 8, 64).transpose(1, 2), torch.empty(2, 8, 64, 64)) == 16
    assert _row_align(torch.empty(2, 3, 10, 37)) == 1
    assert _row_align(torch.empty(2, 3, 10, 80), torch.empty(2, 3, 10, 36)) == 4


# ----------------------------------------------------------------------------------------------------------------------
# GPU: real Stable Diffusion shapes
# ----------------------------------------------------------------------------------------------------------------------

# (H, Lq, d) of the grounded layers: SD1.4 at 512 px (64², 32², 16²; 8² shares 16²'s d160) and SD2.1 at 768 px.
GPU_SHAPES = [(8, 4096, 40), (8, 1024, 80), (8, 256, 160), (5, 9216, 64), (10, 2304, 64), (20, 576, 64)]


def _gpu_flash_rule(shape, dtype, heads="mean_map"):
    H, Lq, D = shape
    B, Lk, P = 8, 77, 8
    inputs = make_inputs(B, H, Lq, Lk, D, P, dtype, device="cuda", logit_scale=1.0)
    grads = make_grads((B, H, Lq, D), dtype, device="cuda", out_weight=1.0)
    fused = run_fused(inputs, grads, heads=heads)
    ref = run_reference(inputs, grads, upcast=False, heads=heads)
    truth = run_reference(inputs, grads, upcast=True, heads=heads)
    assert_flash_rule(fused, ref, truth, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"H{h}-Lq{lq}-d{d}" for h, lq, d in GPU_SHAPES])
def test_gpu_sd_shapes_flash_rule(shape, dtype):
    _gpu_flash_rule(shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 4096, 40), (20, 576, 64)], ids=["H8-Lq4096-d40", "H20-Lq576-d64"])
def test_gpu_per_head_token_loss_flash_rule(shape):
    """token_loss_heads="per_head" in bf16 at SD shapes: within the flash rule of the bf16 PyTorch reference."""
    _gpu_flash_rule(shape, torch.bfloat16, heads="per_head")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 1024, 80), (8, 256, 160)], ids=["d80", "d160"])
def test_gpu_fp32_matches_float64(shape):
    """fp32 inputs use IEEE fp32 dots (no TF32): close to float64 like the fp32 PyTorch reference."""
    H, Lq, D = shape
    inputs = make_inputs(8, H, Lq, 77, D, 8, torch.float32, device="cuda", logit_scale=1.0)
    grads = make_grads((8, H, Lq, D), torch.float32, device="cuda", out_weight=1.0)
    fused = run_fused(inputs, grads)
    truth = run_reference(inputs, grads, upcast=True)
    for name, a, t in zip(NAMES, fused, truth):
        assert_close_scaled(a, t, 1e-4, name)


@pytest.mark.gpu
def test_gpu_deterministic():
    inputs = make_inputs(8, 8, 1024, 77, 80, 8, torch.bfloat16, device="cuda")
    grads = make_grads((8, 8, 1024, 80), torch.bfloat16, device="cuda")
    first, second = run_fused(inputs, grads), run_fused(inputs, grads)
    for name, a, b_ in zip(NAMES, first, second):
        assert torch.equal(a, b_), name


def _peak_extra_mib(forward, inputs, grad_out) -> float:
    """Peak memory allocated by one forward + backward above what exists before it (inputs, leaves, grad_out)."""
    q, k, v, masks, token_phrase = inputs
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, token_loss, pixel_loss = forward(q, k, v, masks, token_phrase)
    torch.autograd.backward(
        [out, token_loss, pixel_loss], [grad_out, torch.ones_like(token_loss), torch.ones_like(pixel_loss)]
    )
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.gpu
def test_gpu_memory_far_below_materialised_reference():
    B, H, Lq, Lk, D, P = 8, 8, 4096, 77, 40, 8
    inputs = make_inputs(B, H, Lq, Lk, D, P, torch.float16, device="cuda")
    grad_out = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.float16)
    fused_mib = _peak_extra_mib(cross_attention_with_grounding, inputs, grad_out)
    ref_mib = _peak_extra_mib(cross_attention_with_grounding_reference, inputs, grad_out)
    attn_mib = B * H * Lq * Lk * 2 / 2**20  # one fp16 probability tensor (38.5 MiB here)
    q_mib = B * H * Lq * D * 2 / 2**20  # one q-sized tensor (20 MiB here)
    # fused: out, dq, fp32 dK/dV split partials, LSE, phrase maps, small reductions; the reference keeps several
    # (B, H, Lq, Lk) tensors (scores, probabilities, their fp32 copy, gradients)
    assert fused_mib < 3 * q_mib + 0.25 * attn_mib, (fused_mib, ref_mib, attn_mib, q_mib)
    assert fused_mib < 0.3 * ref_mib, (fused_mib, ref_mib)
    assert math.isfinite(fused_mib)


@pytest.mark.gpu
def test_gpu_no_host_sync_when_validated_once():
    """With token_phrase validated once per batch (validate_values=False), neither the fused kernel nor the
    PyTorch reference losses synchronise with the device, forward or backward (CUDA sync debug mode)."""
    from tcscale.losses import grounding_losses

    inputs = make_inputs(4, 8, 256, 77, 80, 8, torch.bfloat16, device="cuda")
    q, k, v, masks, token_phrase = inputs
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, token, pixel = cross_attention_with_grounding(q, k, v, masks, token_phrase, validate_values=False)
    (out.float().sum() + token + pixel).backward()  # the first calls compile; the checked ones come after them
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, token, pixel = cross_attention_with_grounding(q, k, v, masks, token_phrase, validate_values=False)
        (out.float().sum() + token + pixel).backward()
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5, dim=-1)
        losses = grounding_losses(probs, masks, token_phrase, validate_values=False)
        (losses["token"] + losses["pixel"]).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
