"""tcscale.losses.grounding_losses against an independent float64 loop computation of docs/DESIGN.md §3."""

from __future__ import annotations

import math

import pytest
import torch

from tcscale.losses import grounding_losses


def loop_losses(attn, masks, token_phrase, per_head=False):
    """docs/DESIGN.md §3 written as plain loops in float64 (no shared code with the reference)."""
    attn = attn.double()
    B, H, Lq, Lk = attn.shape
    tok_vals, pix_vals = [], []
    for b in range(B):
        phrases = sorted({int(p) for p in token_phrase[b].tolist() if p >= 0})
        if not phrases:
            continue
        t_sum = p_sum = 0.0
        for p in phrases:
            toks = [i for i in range(Lk) if int(token_phrase[b, i]) == p]
            m = [float(masks[b, p, u]) for u in range(Lq)]
            err = 0.0
            for i in toks:
                if per_head:
                    ratios = []
                    for h in range(H):
                        col = [float(attn[b, h, u, i]) for u in range(Lq)]
                        ratios.append(sum(c * mm for c, mm in zip(col, m)) / sum(col))
                    r = sum(ratios) / H
                else:
                    col = [sum(float(attn[b, h, u, i]) for h in range(H)) / H for u in range(Lq)]
                    r = sum(c * mm for c, mm in zip(col, m)) / sum(col)
                err += (1 - r) ** 2
            t_sum += err / len(toks)
            bce = 0.0
            for u in range(Lq):
                s = sum(float(attn[b, h, u, i]) for h in range(H) for i in toks) / H
                s = min(max(s, 0.0), 1.0)
                log_s = max(math.log(s), -100.0) if s > 0 else -100.0
                log_1s = max(math.log(1 - s), -100.0) if s < 1 else -100.0
                bce += -(m[u] * log_s + (1 - m[u]) * log_1s)
            p_sum += bce / Lq
        tok_vals.append(t_sum / len(phrases))
        pix_vals.append(p_sum / len(phrases))
    if not tok_vals:
        return 0.0, 0.0
    return sum(tok_vals) / len(tok_vals), sum(pix_vals) / len(pix_vals)


def random_case(B=3, H=4, Lq=12, Lk=10, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(B, H, Lq, Lk, generator=g, dtype=torch.float64).mul(2).softmax(-1)
    masks = (torch.rand(B, P, Lq, generator=g) > 0.5).double()
    token_phrase = torch.full((B, Lk), -1, dtype=torch.long)
    token_phrase[0, [1, 2]] = 0  # multi-token phrase
    token_phrase[0, 4] = 1
    token_phrase[0, [6, 7, 8]] = 2  # three-token phrase
    token_phrase[1, 3] = 1  # phrase slot 0 is padding in sample 1
    # sample 2 has no phrase at all
    return attn, masks, token_phrase


@pytest.mark.parametrize("mode", ["mean_map", "per_head"])
def test_matches_float64_loops(mode):
    attn, masks, token_phrase = random_case()
    out = grounding_losses(attn, masks, token_phrase, token_loss_heads=mode)
    ref_tok, ref_pix = loop_losses(attn, masks, token_phrase, per_head=mode == "per_head")
    assert out["token"].item() == pytest.approx(ref_tok, rel=1e-10, abs=1e-12)
    assert out["pixel"].item() == pytest.approx(ref_pix, rel=1e-10, abs=1e-12)


def test_float32_input_and_larger_shapes():
    attn, masks, token_phrase = random_case(B=4, H=8, Lq=64, Lk=77, P=5, seed=3)
    token_phrase[3, [10, 11]] = 4
    token_phrase[3, 20] = 0
    out = grounding_losses(attn.float(), masks.float(), token_phrase)
    ref_tok, ref_pix = loop_losses(attn.float(), masks, token_phrase)
    assert out["token"].dtype == torch.float32
    assert out["token"].item() == pytest.approx(ref_tok, rel=1e-5)
    assert out["pixel"].item() == pytest.approx(ref_pix, rel=1e-5)


def test_no_phrase_is_zero_and_differentiable():
    attn, masks, _ = random_case()
    attn.requires_grad_(True)
    token_phrase = torch.full((3, 10), -1, dtype=torch.long)
    out = grounding_losses(attn, masks, token_phrase)
    assert out["token"].item() == 0.0 and out["pixel"].item() == 0.0
    (out["token"] + out["pixel"]).backward()
    assert attn.grad is not None and torch.count_nonzero(attn.grad) == 0


def test_gradient_matches_design_formulas():
    """dL/dĀ from autograd equals docs/DESIGN.md §3's closed forms (token and pixel), per phrase token."""
    attn, masks, _ = random_case(B=2, H=3, Lq=9, Lk=10, P=2, seed=5)
    token_phrase = torch.full((2, 10), -1, dtype=torch.long)
    token_phrase[0, [1, 2]] = 0
    token_phrase[0, 5] = 1
    token_phrase[1, 3] = 0
    attn.requires_grad_(True)
    out = grounding_losses(attn, masks, token_phrase)
    (grad,) = torch.autograd.grad(out["token"] + out["pixel"], attn)
    A = attn.detach().mean(1)  # (B, Lq, Lk)
    B_eff = 2
    expected = torch.zeros_like(A)
    for b in range(2):
        phrases = sorted({int(p) for p in token_phrase[b] if p >= 0})
        P = len(phrases)
        for p in phrases:
            toks = [i for i in range(10) if token_phrase[b, i] == p]
            M = masks[b, p]
            S = A[b][:, toks].sum(-1)
            for i in toks:
                s = A[b, :, i].sum()
                r = (M * A[b, :, i]).sum() / s
                d_tok = -2 * (1 - r) * (M - r) / (P * len(toks) * s)
                d_pix = (S - M) / (P * 9 * (S * (1 - S)).clamp(min=1e-12))
                expected[b, :, i] = (d_tok + d_pix) / B_eff
    # dL/dP_h = dL/dĀ / H for every head
    assert torch.allclose(grad, expected.unsqueeze(1).expand_as(grad) / 3, rtol=1e-9, atol=1e-12)


def test_unvalidated_path_gives_the_same_losses_and_gradients():
    """validate_values=False (the trainer checked the batch once) changes nothing but the host sync."""
    attn, masks, token_phrase = random_case()
    results = []
    for validate in (True, False):
        a = attn.clone().requires_grad_(True)
        out = grounding_losses(a, masks, token_phrase, validate_values=validate)
        (out["token"] + 0.5 * out["pixel"]).backward()
        results.append((out["token"].detach(), out["pixel"].detach(), a.grad))
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_bad_shapes_and_indices_name_the_argument():
    attn, masks, token_phrase = random_case()
    with pytest.raises(ValueError, match="phrase_masks"):
        grounding_losses(attn, masks[:, :, :5], token_phrase)
    with pytest.raises(ValueError, match="token_phrase"):
        grounding_losses(attn, masks, token_phrase[:, :5])
    bad = token_phrase.clone()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match=r"token_phrase values .* P=3 .* \[-1, 7\]"):
        grounding_losses(attn, masks, bad)
    bad[0, 0] = -2  # only -1 means "no phrase"
    with pytest.raises(ValueError, match=r"\[-2, 2\]"):
        grounding_losses(attn, masks, bad)
    with pytest.raises(ValueError, match="token_loss_heads"):
        grounding_losses(attn, masks, token_phrase, token_loss_heads="nope")
