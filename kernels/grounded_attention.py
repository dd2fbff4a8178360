"""Fused cross-attention + TokenCompose grounding losses (docs/DESIGN.md §3, §4; issue #5).

``cross_attention_with_grounding(q, k, v, phrase_masks, token_phrase)`` returns ``softmax(q kᵀ·scale) v`` together
with the token and pixel losses of ``tcscale.losses.grounding_losses`` on the same probabilities, for either
token-loss definition (token_loss_heads "mean_map", paper Eq. 5, or "per_head", the official code), without ever
storing a (B, H, Lq, Lk) tensor. Notation as in docs/DESIGN.md §3: sample b, head h, query
(latent) position u < Lq, text token i/j < Lk (Lk ≤ 256, so a whole softmax row is one tile), phrase slot p < P.

File layout (STYLE.md "kernel files in four layers"):
  1. ``@triton.jit`` kernels: forward (attention + loss partials), finalize (per-sample losses and the per-token
     backward coefficients), batch mean, backward (softmax backward with the loss gradient folded in);
  2. launchers ``grounded_attention_forward`` / ``grounded_attention_backward`` (checks, block sizes, allocation);
  3. ``GroundedAttentionFunction`` (torch.autograd.Function) saving only the row log-sum-exp and small reductions;
  4. the public ``cross_attention_with_grounding``.

Reductions across query blocks are **deterministic**: every forward program writes its per-column / per-phrase
partial sums into its own slot of a (B, num_q_blocks, ·) buffer and a second kernel sums them in a fixed order;
the backward accumulates dK/dV of one (b, h) in registers over its query blocks and, when the query axis is split
over several programs for parallelism, sums the per-split fp32 partials in a fixed order. No atomics anywhere, so
repeated calls give bit-identical results.

Saved for backward (extra memory O(B·H·Lq + B·P·Lq + B·Lk)): LSE (B, H, Lq) fp32, the phrase maps S (B, P, Lq)
fp32, the fp32 phrase masks (B, P, Lq), token_phrase (B, Lk) as given (int64 or int32), r_i and a per-token
coefficient (B, Lk) fp32, a per-phrase coefficient (B, P) fp32 and 1/B_eff. q, k, v are the inputs themselves.

Launches (forward + backward): forward, finalize, batch mean; backward, plus one sum and one cast of the fp32
dK/dV partials when the query axis is split. No conversion kernels or zero-fills.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.modes import TOKEN_LOSS_HEADS

MAX_LK = 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# globals read inside @triton.jit kernels must be tl.constexpr (the compiler refuses plain globals on GPU)
BCE_EPS = tl.constexpr(1e-12)  # torch's binary_cross_entropy backward clamps S(1 - S) at this value
BCE_LOG_MIN = tl.constexpr(-100.0)  # torch's BCELoss clamps log at -100
LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = 2^(x·log2 e)


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when the fused kernel can run here: a CUDA GPU, or the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    return torch.cuda.is_available() or interpreter_enabled()


# ======================================================================================================================
# 1. Triton kernels
# ======================================================================================================================


@triton.jit
def _phrase_operands(Masks, TokPhrase, b, offs_m, offs_n, row_ok, col_ok, Lq, Lk, P, BLOCK_P: tl.constexpr):
    """The phrase side of one block: onehot[i, p] = 1 if token i belongs to phrase p (BLOCK_N, BLOCK_P), the masks
    M_p[u] of the block's rows (BLOCK_M, BLOCK_P), and the phrase-slot offsets and validity."""
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    tok_phrase = tl.load(TokPhrase + b * Lk + offs_n, mask=col_ok, other=-1)
    onehot = ((tok_phrase[:, None] == offs_p[None, :]) & p_ok[None, :]).to(tl.float32)
    mask_up = tl.load(
        Masks + b * P * Lq + offs_p[None, :] * Lq + offs_m[:, None], mask=row_ok[:, None] & p_ok[None, :], other=0.0
    )
    return offs_p, p_ok, onehot, mask_up


@triton.jit
def _grounded_attention_fwd_kernel(
    Q, K, V, Out, LSE,  # q (B,H,Lq,D) any strides, k/v (B,H,Lk,D) contiguous, out like q, LSE (B,H,Lq) fp32
    Masks, TokPhrase, PhraseMaps,  # masks (B,P,Lq) fp32, token_phrase (B,Lk) int64/int32, S (B,P,Lq) fp32 (written)
    PartA, PartS, PartBCE,  # (B, NUM_MB, HP, BLOCK_N) ×2, (B, NUM_MB, BLOCK_P) fp32 partials; HP = H if PER_HEAD else 1
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, P, NUM_MB,
    scale_log2e, inv_H,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_PHRASES: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr, PER_HEAD: tl.constexpr,
):  # fmt: skip
    """One program = one sample b and one block of BLOCK_M query rows, looping over all heads.

    Looping the heads inside the program lets it build the head-averaged map Ā = (1/H) Σ_h P_h for its rows in
    registers, which the (non-linear) pixel loss needs before anything can be reduced over u. The head dim is
    processed in chunks of BLOCK_DK columns (zero-padded past D), which bounds shared memory for d = 160 and fp32.
    PER_HEAD (token_loss_heads="per_head"): the token-loss partials are taken per head, from P_h, not from Ā.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq
    col_ok = offs_n < Lk

    # every non-unit stride of q / out is a multiple of ROW_ALIGN elements (the launcher checked): with the row
    # offsets marked so, Triton proves 16-byte alignment of each row and uses vector loads/stores even for d = 40,
    # a stride its own divisible-by-16 specialisation says nothing about (hints must sit on computed values: an
    # attribute on a kernel argument is dropped)
    q_row_off = tl.multiple_of(offs_m * stride_qm, ROW_ALIGN)
    o_row_off = tl.multiple_of(offs_m * stride_om, ROW_ALIGN)
    abar = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # Σ_h P_h for this block (scaled by 1/H below)
    if HAS_PHRASES and PER_HEAD:  # the mask of each token's phrase, needed inside the head loop
        offs_p, p_ok, onehot, mask_up = _phrase_operands(
            Masks, TokPhrase, b, offs_m, offs_n, row_ok, col_ok, Lq, Lk, P, BLOCK_P
        )
        token_masks = tl.dot(mask_up, tl.trans(onehot), input_precision="ieee")  # M_{p(i)}[u]: (BLOCK_M, BLOCK_N)
    for h in range(H):
        q_rows = Q + tl.multiple_of(b * stride_qb + h * stride_qh, ROW_ALIGN) + q_row_off[:, None]
        o_rows = Out + tl.multiple_of(b * stride_ob + h * stride_oh, ROW_ALIGN) + o_row_off[:, None]
        kv_rows = (b * H + h) * Lk * D + offs_n[:, None] * D  # K, V contiguous with a compile-time head dim
        # (1) scores s2 = Q_h K_hᵀ·scale·log2(e) over the whole key axis (Lk ≤ BLOCK_N ≤ 256: one tile), the
        #     head dim accumulated chunk by chunk (padded columns load as 0 and add nothing)
        scores = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(NUM_DK):
            offs_d = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
            d_ok = offs_d < D
            q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            k = tl.load(K + kv_rows + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            scores += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        scores = tl.where(col_ok[None, :], scores * scale_log2e, float("-inf"))
        # (2) the exact softmax of each row, in base 2: P_h = 2^(s2 - max) / Σ_j 2^(s2 - max)
        row_max = tl.max(scores, axis=1)
        p = tl.exp2(scores - row_max[:, None])
        row_sum = tl.sum(p, axis=1)
        p = p / row_sum[:, None]  # P_h[u, j]
        # (3) out = P_h V_h (probabilities rounded to the input dtype for the tensor-core dot, as flash attention)
        p_lowp = p.to(V.dtype.element_ty)
        for c in tl.static_range(NUM_DK):
            offs_d = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
            d_ok = offs_d < D
            v = tl.load(V + kv_rows + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            out = tl.dot(p_lowp, v, input_precision=DOT_PRECISION)
            tl.store(
                o_rows + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :]
            )
        # (4) base-2 log-sum-exp LSE_h[u] = max_j s2[u,j] + log2 Σ_j 2^(s2[u,j] - max): backward's P_h = 2^(s2 - LSE)
        tl.store(LSE + (b * H + h) * Lq + offs_m, row_max + tl.log2(row_sum), mask=row_ok)
        if HAS_PHRASES:
            abar += p
            if PER_HEAD:  # (4b) per-head token partials a_{h,i} = Σ_u M_{p(i)}[u] P_h[u,i], s_{h,i} = Σ_u P_h[u,i]
                p_rows = tl.where(row_ok[:, None], p, 0.0)
                part_off = ((b * NUM_MB + pid_m) * H + h) * BLOCK_N + offs_n
                tl.store(PartA + part_off, tl.sum(p_rows * token_masks, axis=0))
                tl.store(PartS + part_off, tl.sum(p_rows, axis=0))

    if HAS_PHRASES:
        # (5) Ā[u, i] for the valid rows of this block
        abar = tl.where(row_ok[:, None], abar * inv_H, 0.0)
        if not PER_HEAD:
            offs_p, p_ok, onehot, mask_up = _phrase_operands(
                Masks, TokPhrase, b, offs_m, offs_n, row_ok, col_ok, Lq, Lk, P, BLOCK_P
            )
        # (6) phrase maps S_p[u] = Σ_{i∈T_p} Ā[u,i] = (Ā · onehot)[u, p]; saved for the backward's pixel gradient
        phrase_maps = tl.dot(abar, onehot, input_precision="ieee")  # (BLOCK_M, BLOCK_P)
        tl.store(
            PhraseMaps + b * P * Lq + offs_p[None, :] * Lq + offs_m[:, None],
            phrase_maps,
            mask=row_ok[:, None] & p_ok[None, :],
        )
        if not PER_HEAD:
            # (7) token-loss partials over this block's rows: a_i = Σ_u M_{p(i)}[u] Ā[u,i],  s_i = Σ_u Ā[u,i]
            token_masks = tl.dot(mask_up, tl.trans(onehot), input_precision="ieee")  # M_{p(i)}[u]
            part_off = (b * NUM_MB + pid_m) * BLOCK_N + offs_n
            tl.store(PartA + part_off, tl.sum(abar * token_masks, axis=0))
            tl.store(PartS + part_off, tl.sum(abar, axis=0))
        # (8) pixel-loss partials: Σ_u BCE(clamp(S_p[u], 0, 1), M_p[u]) with both logs clamped at -100 (BCELoss)
        s_clamped = tl.minimum(tl.maximum(phrase_maps, 0.0), 1.0)
        # (log of max(x, 1e-44) is exact wherever log x > -100, and ≤ -100 below: no log(0) needed. The floor is an
        #  fp32 constant: a Python float below fp32's normal range would make Triton promote the logs to fp64)
        tiny = tl.full([], 1e-44, tl.float32)
        log_s = tl.maximum(tl.log(tl.maximum(s_clamped, tiny)), BCE_LOG_MIN)
        log_1ms = tl.maximum(tl.log(tl.maximum(1.0 - s_clamped, tiny)), BCE_LOG_MIN)
        bce = -(mask_up * log_s + (1.0 - mask_up) * log_1ms)
        bce = tl.where(row_ok[:, None] & p_ok[None, :], bce, 0.0)
        tl.store(PartBCE + (b * NUM_MB + pid_m) * BLOCK_P + offs_p, tl.sum(bce, axis=0))


@triton.jit
def _sum_partials(Part, base, stride_mb, NUM_MB, offs, BLOCK_MB: tl.constexpr):
    """Σ over the query blocks mb of Part[base + mb·stride_mb + offs], in block order (deterministic)."""
    total = tl.zeros(offs.shape, dtype=tl.float32)
    for mb0 in range(0, NUM_MB, BLOCK_MB):
        offs_mb = mb0 + tl.arange(0, BLOCK_MB)
        rows = base + offs_mb[:, None] * stride_mb + offs[None, :]
        total += tl.sum(tl.load(Part + rows, mask=(offs_mb < NUM_MB)[:, None], other=0.0), axis=0)
    return total


@triton.jit
def _grounding_finalize_kernel(
    PartA, PartS, PartBCE, TokPhrase,
    Ratio, TokCoef, PixCoef, SampleStats,  # (B, HP, BLOCK_N) ×2, (B, BLOCK_P), (B, 3) fp32 outputs
    H, Lq, Lk, P, NUM_MB,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_MB: tl.constexpr, PER_HEAD: tl.constexpr,
):  # fmt: skip
    """One program per sample: reduce the forward partials (fixed order) and compute the per-sample losses and the
    coefficients of the loss gradient. Phrases of the sample = phrase slots that some token points at.

    Outputs per token (per head and token when PER_HEAD, HP = H; else HP = 1): the activation ratio r and the
    token-loss coefficient c with ∂L_tok,b/∂P_h[u,i] = c_(h),i · (M_p(i)[u] - r_(h),i) / H (step 5)."""
    b = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    col_ok = offs_n < Lk
    p_ok = offs_p < P

    # (1) phrase membership: |T_p| = count_p, the sample's phrases are those with count_p > 0, n_b of them
    tok_phrase = tl.load(TokPhrase + b * Lk + offs_n, mask=col_ok, other=-1)
    onehot = ((tok_phrase[:, None] == offs_p[None, :]) & p_ok[None, :]).to(tl.float32)  # (BLOCK_N, BLOCK_P)
    is_token = tl.sum(onehot, axis=1) > 0.0
    count = tl.sum(onehot, axis=0)  # |T_p|
    present = count > 0.0
    n_phrases = tl.sum(present.to(tl.float32), axis=0)
    inv_n = 1.0 / tl.maximum(n_phrases, 1.0)

    # (2) activation ratios from the partials summed over the query blocks
    if PER_HEAD:
        #   per head: r_{h,i} = a_{h,i} / s_{h,i};  r_i = (1/H) Σ_h r_{h,i}  (the official code's token loss).
        #   r_{h,i} goes to Ratio now; s_{h,i} is parked in TokCoef and turned into c_{h,i} in step (5).
        ratio = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for h in range(H):
            base = b * NUM_MB * H * BLOCK_N + h * BLOCK_N
            a_h = _sum_partials(PartA, base, H * BLOCK_N, NUM_MB, offs_n, BLOCK_MB)
            s_h = tl.where(is_token, _sum_partials(PartS, base, H * BLOCK_N, NUM_MB, offs_n, BLOCK_MB), 1.0)
            ratio_h = tl.where(is_token, a_h / s_h, 0.0)
            tl.store(Ratio + (b * H + h) * BLOCK_N + offs_n, ratio_h)
            tl.store(TokCoef + (b * H + h) * BLOCK_N + offs_n, s_h)
            ratio += ratio_h
        ratio = ratio / H
    else:
        #   head-averaged map: r_i = a_i / s_i with a_i = Σ_u M_p(i)[u] Ā[u,i], s_i = Σ_u Ā[u,i]  (paper Eq. 5)
        a = _sum_partials(PartA, b * NUM_MB * BLOCK_N, BLOCK_N, NUM_MB, offs_n, BLOCK_MB)
        s_safe = tl.where(is_token, _sum_partials(PartS, b * NUM_MB * BLOCK_N, BLOCK_N, NUM_MB, offs_n, BLOCK_MB), 1.0)
        ratio = tl.where(is_token, a / s_safe, 0.0)
    bce = _sum_partials(PartBCE, b * NUM_MB * BLOCK_P, BLOCK_P, NUM_MB, offs_p, BLOCK_MB)

    # (3) token loss: L_tok,b = (1/n_b) Σ_p (1/|T_p|) Σ_{i∈T_p} (1 - r_i)²
    err = tl.where(is_token, (1.0 - ratio) * (1.0 - ratio), 0.0)
    per_phrase_tok = tl.sum(onehot * err[:, None], axis=0) / tl.maximum(count, 1.0)
    token_loss = tl.sum(per_phrase_tok, axis=0) * inv_n
    # (4) pixel loss: L_pix,b = (1/n_b) Σ_p (1/Lq) Σ_u BCE(S_p[u], M_p[u])
    pixel_loss = tl.sum(tl.where(present, bce, 0.0), axis=0) * inv_n / Lq

    # (5) backward coefficients (without the 1/B_eff batch factor and the upstream gradients, applied later):
    #     g_i = ∂L_tok,b/∂r_i = -2 (1 - r_i) / (n_b |T_p|)
    #     mean map: ∂r_i/∂Ā[u,i] = (M_p[u] - r_i) / s_i and ∂Ā/∂P_h = 1/H  →  c_i = g_i / s_i
    #     per head: ∂r_i/∂P_h[u,i] = (M_p[u] - r_{h,i}) / (H s_{h,i})    →  c_{h,i} = g_i / s_{h,i}
    #     ∂L_pix,b/∂Ā[u,i] = pix_coef_p · (S_p[u] - M_p[u]) / max(S_p[u](1 - S_p[u]), 1e-12),  pix_coef_p = 1/(n_b Lq)
    count_of_token = tl.sum(onehot * count[None, :], axis=1)  # |T_{p(i)}|
    g = tl.where(is_token, -2.0 * (1.0 - ratio) * inv_n / tl.maximum(count_of_token, 1.0), 0.0)
    if PER_HEAD:
        tl.debug_barrier()  # the parked s_{h,i} above are read back by (possibly) other threads of this program
        for h in range(H):
            s_h = tl.load(TokCoef + (b * H + h) * BLOCK_N + offs_n)
            tl.store(TokCoef + (b * H + h) * BLOCK_N + offs_n, g / s_h)
    else:
        tl.store(Ratio + b * BLOCK_N + offs_n, ratio)
        tl.store(TokCoef + b * BLOCK_N + offs_n, g / s_safe)
    pix_coef = tl.where(present, inv_n / Lq, 0.0)
    tl.store(PixCoef + b * BLOCK_P + offs_p, pix_coef)
    tl.store(SampleStats + b * 3 + 0, token_loss)
    tl.store(SampleStats + b * 3 + 1, pixel_loss)
    tl.store(SampleStats + b * 3 + 2, (n_phrases > 0.0).to(tl.float32))


@triton.jit
def _grounding_batch_mean_kernel(
    SampleStats, TokenLoss, PixelLoss, InvBatch, B,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Batch mean over the B_eff samples with ≥ 1 phrase; 0 when B_eff = 0 (a per-sample loss is 0 without phrases)."""
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    token = tl.load(SampleStats + offs_b * 3 + 0, mask=b_ok, other=0.0)
    pixel = tl.load(SampleStats + offs_b * 3 + 1, mask=b_ok, other=0.0)
    has_phrase = tl.load(SampleStats + offs_b * 3 + 2, mask=b_ok, other=0.0)
    inv_batch = 1.0 / tl.maximum(tl.sum(has_phrase, axis=0), 1.0)  # 1 / B_eff
    tl.store(TokenLoss, tl.sum(token, axis=0) * inv_batch)
    tl.store(PixelLoss, tl.sum(pixel, axis=0) * inv_batch)
    tl.store(InvBatch, inv_batch)


@triton.jit
def _grounded_attention_bwd_kernel(
    Q, K, V, dOut, LSE,
    Masks, TokPhrase, PhraseMaps, Ratio, TokCoef, PixCoef, InvBatch, GradToken, GradPixel,  # GradX: ∂ℓ/∂L_x (fp32)
    dQ, dK, dV,  # dQ like q; dK/dV contiguous (B,H,Lk,D), or fp32 partials of split s at dK + s·stride_dkv_split
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    B, H, Lq, Lk, P, NUM_MB, MB_PER_SPLIT, stride_dkv_split,
    scale, scale_log2e, inv_H,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_PHRASES: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr,
    PER_HEAD: tl.constexpr,
):  # fmt: skip
    """One program = one (b, h), one range of query blocks (split s) and one chunk c of BLOCK_DK head-dim columns.

    All Lk keys are in the tile, so each query block's dS row is complete: the block's dQ (columns of chunk c) is
    written directly, and dK, dV (columns of chunk c) are accumulated in registers over the blocks. With one chunk
    (d ≤ BLOCK_DK, the common case) nothing is recomputed; for d = 160 (or fp32) the head dim is split so the
    dK/dV accumulators and the shared-memory operands stay bounded, and each chunk's program recomputes S and dP.
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    chunk = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_dc = chunk * BLOCK_DK + tl.arange(0, BLOCK_DK)  # this program's head-dim columns
    col_ok = offs_n < Lk
    dc_ok = offs_dc < D
    # K, V, dK, dV are contiguous (B, H, Lk, D) with D a compile-time constant: cheap, vectorisable addressing.
    # K_h, V_h are re-read every query block (L1/L2 resident) rather than pinned in registers.
    kv_rows = (b * H + h) * Lk * D + offs_n[:, None] * D

    if HAS_PHRASES:
        # (0) per-token / per-phrase gradient coefficients of this sample, times the upstream loss gradients
        #     g_tok = ∂ℓ/∂L_token, g_pix = ∂ℓ/∂L_pixel and the batch mean's 1/B_eff:
        #     G[u,i] = c1_i · M_{p(i)}[u] + c0_i + Σ_p onehot[i,p] · gpix[u,p]
        #       c1_i = g_tok/B_eff · (-2 (1 - r_i) / (n_b |T_p| s_i)),  c0_i = -c1_i · r_i
        #       (PER_HEAD: this head's c1_{h,i} and r_{h,i} instead, see the finalize kernel)
        #       gpix[u,p] = g_pix/B_eff · (S_p[u] - M_p[u]) / (n_b Lq · max(S_p[u](1 - S_p[u]), 1e-12)) · [0 ≤ S ≤ 1]
        offs_p = tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        tok_phrase = tl.load(TokPhrase + b * Lk + offs_n, mask=col_ok, other=-1)
        onehot = ((tok_phrase[:, None] == offs_p[None, :]) & p_ok[None, :]).to(tl.float32)  # (BLOCK_N, BLOCK_P)
        inv_batch = tl.load(InvBatch)
        grad_token = tl.load(GradToken) * inv_batch
        grad_pixel = tl.load(GradPixel) * inv_batch
        coef_row = (b * H + h) * BLOCK_N if PER_HEAD else b * BLOCK_N
        c1 = tl.load(TokCoef + coef_row + offs_n) * grad_token
        c0 = -c1 * tl.load(Ratio + coef_row + offs_n)
        pix_w = tl.load(PixCoef + b * BLOCK_P + offs_p) * grad_pixel

    # row-alignment hints as in the forward (q, dO, dQ)
    q_base = Q + tl.multiple_of(b * stride_qb + h * stride_qh, ROW_ALIGN)
    do_base = dOut + tl.multiple_of(b * stride_dob + h * stride_doh, ROW_ALIGN)
    dq_base = dQ + tl.multiple_of(b * stride_dqb + h * stride_dqh, ROW_ALIGN)
    dk_acc = tl.zeros((BLOCK_N, BLOCK_DK), dtype=tl.float32)
    dv_acc = tl.zeros((BLOCK_N, BLOCK_DK), dtype=tl.float32)
    mb_start = split * MB_PER_SPLIT
    mb_end = tl.minimum(mb_start + MB_PER_SPLIT, NUM_MB)
    for mb in range(mb_start, mb_end):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        q_rows = q_base + tl.multiple_of(offs_m * stride_qm, ROW_ALIGN)[:, None]
        do_rows = do_base + tl.multiple_of(offs_m * stride_dom, ROW_ALIGN)[:, None]
        lse = tl.load(LSE + (b * H + h) * Lq + offs_m, mask=row_ok, other=0.0)
        # this program's columns of Q, dO, K (operands of dQ, dK, dV below)
        q_c = tl.load(q_rows + offs_dc[None, :] * stride_qd, mask=row_ok[:, None] & dc_ok[None, :], other=0.0)
        do_c = tl.load(do_rows + offs_dc[None, :] * stride_dod, mask=row_ok[:, None] & dc_ok[None, :], other=0.0)
        k_c = tl.load(K + kv_rows + offs_dc[None, :], mask=col_ok[:, None] & dc_ok[None, :], other=0.0)
        if NUM_DK == 1:
            # (1a) raw scores Q_h K_hᵀ and dP_h = dO_h V_hᵀ from the single head-dim chunk
            v_c = tl.load(V + kv_rows + offs_dc[None, :], mask=col_ok[:, None] & dc_ok[None, :], other=0.0)
            scores = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION)
            dp = tl.dot(do_c, tl.trans(v_c), input_precision=DOT_PRECISION)
        else:
            # (1b) the same, accumulated over all head-dim chunks
            scores = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for c in tl.static_range(NUM_DK):
                offs_d = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
                qd_mask = row_ok[:, None] & (offs_d < D)[None, :]
                kv_mask = col_ok[:, None] & (offs_d < D)[None, :]
                q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
                do = tl.load(do_rows + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
                k = tl.load(K + kv_rows + offs_d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(V + kv_rows + offs_d[None, :], mask=kv_mask, other=0.0)
                scores += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                dp += tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)

        # (2) recompute P_h = 2^(s·scale·log2(e) - LSE); rows past Lq and columns past Lk are exactly 0
        p = tl.exp2(scores * scale_log2e - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        if HAS_PHRASES:
            # (3) loss gradient w.r.t. Ā on this block, G (BLOCK_M, BLOCK_N); ∂ℓ/∂P_h = G / H
            mask_up = tl.load(
                Masks + b * P * Lq + offs_p[None, :] * Lq + offs_m[:, None],
                mask=row_ok[:, None] & p_ok[None, :],
                other=0.0,
            )
            s_map = tl.load(
                PhraseMaps + b * P * Lq + offs_p[None, :] * Lq + offs_m[:, None],
                mask=row_ok[:, None] & p_ok[None, :],
                other=0.0,
            )
            # BCE backward as torch: (S - M) / max(S (1 - S), eps); clamp(S, 0, 1) passes gradient for 0 ≤ S ≤ 1
            gpix = (s_map - mask_up) / tl.maximum(s_map * (1.0 - s_map), BCE_EPS)
            gpix = tl.where((s_map >= 0.0) & (s_map <= 1.0) & row_ok[:, None], gpix * pix_w[None, :], 0.0)
            # (one-hot dots: exact for binary masks in tf32; gpix rounds to tf32 (2^-11) for 16-bit inputs, far
            #  below the bf16/fp16 rounding of the reference's own loss gradient, and much cheaper than fp32 FMAs)
            token_masks = tl.dot(mask_up, tl.trans(onehot), input_precision=DOT_PRECISION)  # M_{p(i)}[u]
            grad_abar = c1[None, :] * token_masks + c0[None, :]
            grad_abar += tl.dot(gpix, tl.trans(onehot), input_precision=DOT_PRECISION)
            dp += grad_abar * inv_H
        # (4) softmax backward over the full row: dS = P ⊙ (dP - Σ_j P[u,j] dP[u,j]), with dP already holding G/H
        delta = tl.sum(p * dp, axis=1)
        ds = p * (dp - delta[:, None])
        # (5) dQ = dS K · scale (complete for this block: all Lk keys are here)
        dq = tl.dot(ds.to(k_c.dtype), k_c, input_precision=DOT_PRECISION) * scale
        tl.store(
            dq_base + tl.multiple_of(offs_m * stride_dqm, ROW_ALIGN)[:, None] + offs_dc[None, :] * stride_dqd,
            dq.to(dQ.dtype.element_ty),
            mask=row_ok[:, None] & dc_ok[None, :],
        )
        # (6) dV += P_hᵀ dO,  dK += dSᵀ Q (· scale at the end)
        dv_acc += tl.dot(tl.trans(p.to(do_c.dtype)), do_c, input_precision=DOT_PRECISION)
        dk_acc += tl.dot(tl.trans(ds.to(q_c.dtype)), q_c, input_precision=DOT_PRECISION)

    # (7) store dK, dV (this split's partial when the query axis is split over programs)
    out_mask = col_ok[:, None] & dc_ok[None, :]
    dkv_offs = split * stride_dkv_split + kv_rows + offs_dc[None, :]
    tl.store(dK + dkv_offs, (dk_acc * scale).to(dK.dtype.element_ty), mask=out_mask)
    tl.store(dV + dkv_offs, dv_acc.to(dV.dtype.element_ty), mask=out_mask)


# ======================================================================================================================
# 2. Launchers
# ======================================================================================================================


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes; None picks a heuristic. Tests set small blocks to exercise partial tiles and splits."""

    block_m_fwd: int | None = None  # query rows per forward program (power of 2, ≥ 16)
    block_m_bwd: int | None = None  # query rows per backward loop step (power of 2, ≥ 16)
    block_d: int | None = None  # head-dim chunk (power of 2, ≥ 16); one backward program per chunk
    num_splits: int | None = None  # backward programs per (b, h) along the query axis (fp32 dK/dV partials if > 1)
    num_warps: int | None = None
    num_stages: int | None = None


@dataclass(frozen=True)
class _Blocks:
    BLOCK_N: int  # all Lk keys: one tile
    BLOCK_P: int  # phrase slots
    block_d: int  # head-dim chunk
    block_m_fwd: int
    block_m_bwd: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class _Launch:
    """One kernel launch as the launchers plan it: run by ``_run``, or compiled offline by the compile check (which
    plans with meta tensors and so compiles exactly the specialisation a GPU launch would)."""

    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4  # Triton's defaults
    num_stages: int = 3


def _run(launch: _Launch) -> None:
    if any(isinstance(a, torch.Tensor) and a.is_meta for a in launch.args):
        return  # meta tensors hold no data (memory planning, tcscale.memory): the launch is planned, not run
    launch.kernel[launch.grid](
        *launch.args, **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages
    )


def _pick_blocks(q: torch.Tensor, Lk: int, P: int, config: KernelConfig) -> _Blocks:
    """Heuristic block sizes, checked offline for sm_90 (Triton 3.8 AOT + ptxas -v, see
    kernels/grounded_attention_compile_check.py): in bf16/fp16 every SD shape fits the H100's 227 KiB of shared
    memory with ≤ 164 bytes of register spills; 16-bit d ≤ 128 is one head-dim chunk, d = 160 and fp32 use chunks
    of 64. fp32 is correct but spills heavily (its IEEE dots run on FMA units): not a training configuration.
    Untimed: tune on a GPU."""
    B, H, Lq, D = q.shape
    BLOCK_N = _pow2(Lk)
    BLOCK_D = _pow2(D)
    low_precision = q.dtype != torch.float32
    block_d = config.block_d or (BLOCK_D if low_precision and BLOCK_D <= 128 and BLOCK_N <= 128 else min(BLOCK_D, 64))
    _check_pow2("block_d", block_d)
    small_tiles = BLOCK_N <= 128 and low_precision  # fp32 dots run on FMA units: keep their tiles small
    block_m_fwd = config.block_m_fwd or (32 if small_tiles and block_d <= 64 else 16)
    if config.block_m_fwd is None:
        while block_m_fwd > 16 and B * _cdiv(Lq, block_m_fwd) < _num_sms(q.device):  # fill the SMs
            block_m_fwd //= 2
    block_m_bwd = config.block_m_bwd or (32 if small_tiles and block_d <= 128 else 16)
    _check_pow2("block_m_fwd", block_m_fwd)
    _check_pow2("block_m_bwd", block_m_bwd)
    single_chunk = D <= block_d
    if config.num_stages:
        num_stages = config.num_stages
    elif single_chunk and BLOCK_N <= 128:
        num_stages = 3 if low_precision and block_d <= 64 else 2
    else:  # chunked head dim (d = 160, fp32) or Lk > 128: shared memory is the limit
        num_stages = 1
    return _Blocks(BLOCK_N, _pow2(P), block_d, block_m_fwd, block_m_bwd, config.num_warps or 8, num_stages)


# Plain-Python integer helpers for the launchers: triton.cdiv / next_power_of_2 are constexpr-function wrappers
# costing microseconds per call on the host, and the launchers call them about 15 times per forward + backward.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0  # as triton.next_power_of_2


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, _next_pow2(n))


H100_SMS = 132


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "meta":  # offline planning (compile check): as on an H100
        return H100_SMS
    return 4  # interpreter: few programs keep CPU tests fast


def _row_align(*tensors: torch.Tensor) -> int:
    """Largest power of two ≤ 16 dividing every non-innermost stride of the tensors (in elements)."""
    g = 0
    for t in tensors:
        for stride in t.stride()[:-1]:
            g = math.gcd(g, stride)
    align = 16
    while g % align:
        align //= 2
    return align


def _check_pow2(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two ≥ 16, got {value}")


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phrase_masks: torch.Tensor,
    token_phrase: torch.Tensor,
    validate_values: bool,
    planning: bool = False,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, L, d), got {getattr(t, 'shape', type(t))}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, H={H}, Lk, d={D}) like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Lk = k.shape[2]
    if not 1 <= Lk <= MAX_LK:
        raise ValueError(f"k/v sequence length Lk must be in [1, {MAX_LK}] (one softmax tile), got {Lk}")
    if Lq < 1 or D < 1:
        raise ValueError(f"q must have Lq ≥ 1 and d ≥ 1, got {tuple(q.shape)}")
    if D > 256:
        raise ValueError(f"head dim d must be ≤ 256, got {D}")
    if phrase_masks.dim() != 3 or phrase_masks.shape[0] != B or phrase_masks.shape[2] != Lq:
        raise ValueError(f"phrase_masks must be (B={B}, P, Lq={Lq}), got shape {tuple(phrase_masks.shape)}")
    if phrase_masks.shape[1] > 128:
        raise ValueError(f"phrase_masks may hold at most 128 phrase slots, got {phrase_masks.shape[1]}")
    if tuple(token_phrase.shape) != (B, Lk):
        raise ValueError(f"token_phrase must be (B={B}, Lk={Lk}), got shape {tuple(token_phrase.shape)}")
    if token_phrase.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token_phrase must be an integer tensor (int64 phrase index or -1), got {token_phrase.dtype}")
    for name, t in (("phrase_masks", phrase_masks), ("token_phrase", token_phrase)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if q.device.type != "cuda" and not interpreter_enabled() and not planning:
        raise RuntimeError(f"fused grounded attention needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    if interpreter_enabled() and q.dtype == torch.bfloat16 and not planning:
        raise TypeError("bfloat16 is not supported under TRITON_INTERPRET=1 (the interpreter's bf16 tl.dot is wrong)")
    if validate_values and token_phrase.numel():
        lo, hi = int(token_phrase.min()), int(token_phrase.max())  # one host sync, like the PyTorch reference
        if lo < -1 or hi >= phrase_masks.shape[1]:
            raise ValueError(
                f"token_phrase values must be -1 or a phrase index < P={phrase_masks.shape[1]}, got range [{lo}, {hi}]"
            )


def _dense_last_dim(t: torch.Tensor) -> torch.Tensor:
    """q-sized tensors keep their strides (diffusers' transposed views); only a non-unit innermost stride is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def grounded_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phrase_masks: torch.Tensor,
    token_phrase: torch.Tensor,
    scale: float | None = None,
    config: KernelConfig | None = None,
    validate_values: bool = True,
    *,
    token_loss_heads: str = "mean_map",
    launch: Callable[[_Launch], None] = _run,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor | float | int]]:
    """Launch the forward kernels. Returns (out, token_loss, pixel_loss, saved) with ``saved`` the small tensors
    (and ints) the backward needs. ``launch`` receives each planned launch (default: run it)."""
    _check_inputs(q, k, v, phrase_masks, token_phrase, validate_values, planning=launch is not _run or q.is_meta)
    if token_loss_heads not in TOKEN_LOSS_HEADS:
        raise ValueError(f"token_loss_heads must be one of {TOKEN_LOSS_HEADS}, got {token_loss_heads!r}")
    per_head = token_loss_heads == "per_head"
    config = config or KernelConfig()
    # k, v are small (B·H·Lk·d): made contiguous so the kernels address them with a compile-time head dim
    q, k, v = _dense_last_dim(q), k.contiguous(), v.contiguous()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    P = phrase_masks.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    device = q.device

    blocks = _pick_blocks(q, Lk, P, config)
    BLOCK_N, BLOCK_P, block_m = blocks.BLOCK_N, blocks.BLOCK_P, blocks.block_m_fwd
    num_mb = _cdiv(Lq, block_m)
    has_phrases = P > 0

    # No conversion kernels and no zero-fills: fp32 masks and int64/int32 token_phrase are read as they are (the
    # trainer's dtypes), and every buffer below is completely written by the kernels. Launches per forward: 3.
    masks_f32 = phrase_masks.to(torch.float32).contiguous()  # (B, P, Lq); a no-op for the trainer's fp32 masks
    tok_phrase = token_phrase.contiguous()  # (B, Lk) int64 or int32, read by the kernels directly
    out = torch.empty_like(q)  # keeps q's layout (e.g. a transposed diffusers view stays cheap to transpose back)
    lse = torch.empty((B, H, Lq), device=device, dtype=torch.float32)
    f32 = dict(device=device, dtype=torch.float32)
    phrase_maps = torch.empty((B, P, Lq), **f32)
    # the forward partials in one allocation (fewer allocator calls on the host): token partials a, s of shape
    # (B, num_mb, HP, BLOCK_N) with HP = H per head or 1 for the mean map, BCE partials (B, num_mb, BLOCK_P)
    tok_part = B * num_mb * (H if per_head else 1) * BLOCK_N
    partials = torch.empty((2 * tok_part + B * num_mb * BLOCK_P,), **f32)
    part_a, part_s, part_bce = partials[:tok_part], partials[tok_part : 2 * tok_part], partials[2 * tok_part :]
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for fp16/bf16 operands

    launch(_Launch(
        _grounded_attention_fwd_kernel, (num_mb, B),
        (q, k, v, out, lse,
         masks_f32, tok_phrase, phrase_maps,
         part_a, part_s, part_bce,
         *q.stride(), *out.stride(),
         H, Lq, Lk, P, num_mb,
         scale * LOG2E, 1.0 / H),
        dict(D=D, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_DK=blocks.block_d, NUM_DK=_cdiv(D, blocks.block_d),
             BLOCK_P=BLOCK_P, HAS_PHRASES=has_phrases, DOT_PRECISION=dot_precision, ROW_ALIGN=_row_align(q, out),
             PER_HEAD=per_head),
        blocks.num_warps, blocks.num_stages,
    ))  # fmt: skip

    # finalize runs even with P = 0: it then writes zeros (no token belongs to a phrase; the unwritten partials are
    # never selected), so nothing needs a zero-fill
    # per-token ratio and coefficient (B, HP, BLOCK_N), per-phrase coefficient (B, BLOCK_P), sample stats (B, 3)
    hp = H if per_head else 1
    coefs = torch.empty((B * (2 * hp * BLOCK_N + BLOCK_P + 3),), **f32)
    ratio = coefs[: B * hp * BLOCK_N].view(B, hp, BLOCK_N)
    tok_coef = coefs[B * hp * BLOCK_N : 2 * B * hp * BLOCK_N].view(B, hp, BLOCK_N)
    pix_coef = coefs[2 * B * hp * BLOCK_N : B * (2 * hp * BLOCK_N + BLOCK_P)].view(B, BLOCK_P)
    sample_stats = coefs[B * (2 * hp * BLOCK_N + BLOCK_P) :].view(B, 3)
    launch(_Launch(
        _grounding_finalize_kernel, (B,),
        (part_a, part_s, part_bce, tok_phrase,
         ratio, tok_coef, pix_coef, sample_stats,
         H, Lq, Lk, P, num_mb),
        dict(BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P, BLOCK_MB=min(16, _next_pow2(num_mb)), PER_HEAD=per_head),
    ))  # fmt: skip
    token_loss = torch.empty((), **f32)
    pixel_loss = torch.empty((), **f32)
    inv_batch = torch.empty((1,), **f32)
    launch(_Launch(
        _grounding_batch_mean_kernel, (1,), (sample_stats, token_loss, pixel_loss, inv_batch, B),
        dict(BLOCK_B=_pow2(B, 2)),
    ))  # fmt: skip

    saved = dict(
        lse=lse, masks=masks_f32, token_phrase=tok_phrase, phrase_maps=phrase_maps,
        ratio=ratio, tok_coef=tok_coef, pix_coef=pix_coef, inv_batch=inv_batch, scale=scale, per_head=per_head,
    )  # fmt: skip
    return out, token_loss, pixel_loss, saved


def grounded_attention_backward(
    grad_out: torch.Tensor,
    grad_token: torch.Tensor,
    grad_pixel: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    saved: dict[str, torch.Tensor | float | int],
    config: KernelConfig | None = None,
    *,
    launch: Callable[[_Launch], None] = _run,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (dq, dk, dv) for upstream gradients on out and on the two scalar losses."""
    config = config or KernelConfig()
    q, k, v = _dense_last_dim(q), k.contiguous(), v.contiguous()  # small; copied only if the caller passed views
    grad_out = _dense_last_dim(grad_out)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    masks = saved["masks"]
    P = masks.shape[1]
    device = q.device
    blocks = _pick_blocks(q, Lk, P, config)
    BLOCK_N, BLOCK_P, block_m = blocks.BLOCK_N, blocks.BLOCK_P, blocks.block_m_bwd
    num_dc = _cdiv(D, blocks.block_d)  # one program per head-dim chunk
    num_mb = _cdiv(Lq, block_m)
    if config.num_splits is None:  # split the query axis until there are ~2 programs per SM
        num_splits = min(num_mb, max(1, _cdiv(2 * _num_sms(device), B * H * num_dc)))
    else:
        num_splits = max(1, min(config.num_splits, num_mb))
    mb_per_split = _cdiv(num_mb, num_splits)
    num_splits = _cdiv(num_mb, mb_per_split)

    dq = torch.empty_like(q)
    if num_splits == 1:
        dk, dv = torch.empty_like(k), torch.empty_like(v)  # contiguous like the saved k, v
        dk_buf, dv_buf, split_stride = dk, dv, 0
    else:  # fp32 partials (num_splits, 2, B, H, Lk, D) for dK, dV: one sum in split order below (deterministic)
        dkv_buf = torch.empty((num_splits, 2, B, H, Lk, D), device=device, dtype=torch.float32)
        dk_buf, dv_buf, split_stride = dkv_buf[:, 0], dkv_buf[:, 1], dkv_buf.stride(0)
    # the upstream loss gradients are read in place (0-dim fp32 tensors): no stacking kernel
    grad_token = grad_token.reshape(()).to(device=device, dtype=torch.float32)
    grad_pixel = grad_pixel.reshape(()).to(device=device, dtype=torch.float32)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"

    launch(_Launch(
        _grounded_attention_bwd_kernel, (B * H, num_splits, num_dc),
        (q, k, v, grad_out, saved["lse"],
         masks, saved["token_phrase"], saved["phrase_maps"], saved["ratio"], saved["tok_coef"], saved["pix_coef"],
         saved["inv_batch"], grad_token, grad_pixel,
         dq, dk_buf, dv_buf,
         *q.stride(), *grad_out.stride(), *dq.stride(),
         B, H, Lq, Lk, P, num_mb, mb_per_split, split_stride,
         saved["scale"], saved["scale"] * LOG2E, 1.0 / H),
        dict(D=D, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_DK=blocks.block_d, NUM_DK=_cdiv(D, blocks.block_d),
             BLOCK_P=BLOCK_P, HAS_PHRASES=P > 0, DOT_PRECISION=dot_precision,
             ROW_ALIGN=_row_align(q, grad_out, dq), PER_HEAD=saved["per_head"]),
        blocks.num_warps, blocks.num_stages,
    ))  # fmt: skip
    if num_splits > 1:
        dkv = dkv_buf.sum(0).to(k.dtype)  # (2, B, H, Lk, D): one reduction and one cast for both
        dk, dv = dkv[0], dkv[1]
    return dq, dk, dv


# ======================================================================================================================
# 3. Autograd
# ======================================================================================================================


class GroundedAttentionFunction(torch.autograd.Function):
    """(q, k, v) → (out, token_loss, pixel_loss); saves q, k, v, the row LSE and O(B·P·Lq + B·Lk) reductions."""

    @staticmethod
    def forward(ctx, q, k, v, phrase_masks, token_phrase, scale, config, validate_values, token_loss_heads):
        out, token_loss, pixel_loss, saved = grounded_attention_forward(
            q, k, v, phrase_masks, token_phrase, scale, config, validate_values, token_loss_heads=token_loss_heads
        )
        tensor_keys = [key for key, value in saved.items() if isinstance(value, torch.Tensor)]
        ctx.save_for_backward(q, k, v, *(saved[key] for key in tensor_keys))
        ctx.tensor_keys = tensor_keys
        ctx.others = {key: value for key, value in saved.items() if key not in tensor_keys}  # scale, per_head
        ctx.config = config
        return out, token_loss, pixel_loss

    @staticmethod
    @once_differentiable  # no double backward
    def backward(ctx, grad_out, grad_token, grad_pixel):
        q, k, v, *tensors = ctx.saved_tensors
        saved = dict(zip(ctx.tensor_keys, tensors), **ctx.others)
        dq, dk, dv = grounded_attention_backward(grad_out, grad_token, grad_pixel, q, k, v, saved, ctx.config)
        return dq, dk, dv, None, None, None, None, None, None


# ======================================================================================================================
# 4. Public function
# ======================================================================================================================


def cross_attention_with_grounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phrase_masks: torch.Tensor,
    token_phrase: torch.Tensor,
    scale: float | None = None,
    *,
    config: KernelConfig | None = None,
    validate_values: bool = True,
    token_loss_heads: str = "mean_map",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-attention fused with the TokenCompose token and pixel losses (docs/DESIGN.md §3, §4).

    Args:
        q: (B, H, Lq, d) queries; k, v: (B, H, Lk, d) keys/values, Lk ≤ 256; any strides (views are fine).
        phrase_masks: (B, P, Lq) phrase masks at this layer's resolution, values in {0, 1}.
        token_phrase: (B, Lk) int64 phrase index of each token, or -1.
        scale: softmax scale, default 1/√d.
        config: optional block sizes (tests, tuning).
        validate_values: check token_phrase ∈ [-1, P) (one host sync), as the PyTorch reference does.
        token_loss_heads: "mean_map" (paper Eq. 5, on the head-averaged map) or "per_head" (official code: the
            activation ratio per head, averaged over heads), as ``grounding_losses``.

    Returns:
        (out (B, H, Lq, d) in q's dtype, token_loss fp32 scalar, pixel_loss fp32 scalar); all three differentiable
        in q, k, v. The losses equal ``grounding_losses(softmax(q kᵀ·scale), phrase_masks, token_phrase,
        token_loss_heads=token_loss_heads)``.
    """
    if not (triton_available() or q.is_meta):  # meta tensors: allocations only, no launch (memory planning)
        raise RuntimeError(
            "kernels.cross_attention_with_grounding (attention.backend: fused) needs a CUDA GPU or the Triton CPU "
            "interpreter (set TRITON_INTERPRET=1 before importing kernels); use attention.backend: reference otherwise"
        )
    return GroundedAttentionFunction.apply(
        q, k, v, phrase_masks, token_phrase, scale, config, validate_values, token_loss_heads
    )
