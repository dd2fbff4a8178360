"""Paper or official code (docs/FIDELITY.md): every option does what its source defines, and the presets set them.

Each reference below is written from its source's definition, not from tcscale's code:

* TokenCompose's official loss, transcribed from the definition of ``get_grounding_loss_by_layer``
  (mlpc-ucsd/TokenCompose, train/src/loss_utils.py): maps laid out (B·H, res, res, 77); masks resized to res×res
  (bilinear) and binarised with > 0; token loss per layer and word, the activation ratio averaged over the first
  axis (batch × heads) before squaring, summed over layers, divided by the number of words; pixel loss on the map
  averaged over the first axis and then over the group's layers, BCE per word on the summed token maps, divided by
  the number of words. Batch 1 throughout (the official code asserts it).
* The official loader's soft 512-px mask: PIL bilinear resize of the 0/255 mask, divided by its maximum.
* The two 3×3 kernels: the Gaussian density exp(−x²/2σ²) (paper) and Attend-and-Excite's GaussianSmoothing,
  Π_axes exp(−((x − mean) / (2σ))²) (official), each normalised to sum 1.
* The official SepEn latent: z₀ = 0.18215·N(0, I) noised with DDPM's q(z_t | z₀) on SD's scaled-linear schedule.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tcscale.attention.masks import MaskRule
from tcscale.attention.plan import GroundingPlan
from tcscale.attention.recorders import GroupedLossRecorder, ProbsRecorder
from tcscale.config import ConfigError, load_config, save_config
from tcscale.data.samples import Counters, ProcessSettings, RawSample, SampleProcessor
from tcscale.losses import grounding_losses, grounding_losses_grouped, sepen_losses
from tcscale.losses.sepen import gaussian_kernel_3x3
from tcscale.models.architectures import build_tiny_components, sd_noise_scheduler
from tcscale.objectives import OBJECTIVES, BuildContext
from tcscale.objectives import sepen as sepen_mod
from tcscale.objectives import tokencompose as tc_mod
from tcscale.objectives.sepen_prompts import SepEnPromptSampler, pair_concepts

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
LK = 77


# ---------------------------------------------------------------------------------------------------------
# TokenCompose: the official loss definition, transcribed (float64, loops over words and tokens)
# ---------------------------------------------------------------------------------------------------------
def official_grounding_loss_by_layer(seg_masks, word_token_idx, res, attn_maps):
    """One (place, resolution) group. seg_masks: per word a (1, R, R) full-resolution mask; word_token_idx: per word
    its token positions; attn_maps: the group's layers, each (B·H, res, res, 77). Returns (token, pixel) floats."""
    masks = []
    for m in seg_masks:
        small = F.interpolate(m[None].double(), size=(res, res), mode="bilinear", align_corners=False)[0]
        masks.append((small.squeeze(0) > 0.0).double())  # (res, res)
    token_loss = 0.0
    for attn in attn_maps:
        bh = attn.shape[0]
        for w, positions in enumerate(word_token_idx):
            word_loss = 0.0
            for i in positions:
                token_map = attn[:, :, :, i].double().reshape(bh, res, res)
                activation = (token_map * masks[w]).reshape(bh, -1).sum(-1) / token_map.reshape(bh, -1).sum(-1)
                word_loss += (1.0 - activation.mean().item()) ** 2
            token_loss += word_loss / len(positions)
    token_loss /= len(word_token_idx)

    layer_means = [attn.double().reshape(-1, res, res, attn.shape[-1]).mean(0) for attn in attn_maps]
    group_map = torch.stack(layer_means).sum(0) / len(layer_means)  # (res, res, 77)
    pixel_loss = 0.0
    for w, positions in enumerate(word_token_idx):
        word_map = torch.stack([group_map[..., i] for i in positions]).sum(0)
        pixel_loss += F.binary_cross_entropy(word_map, masks[w]).item()  # nn.BCELoss: mean over pixels
    return token_loss, pixel_loss / len(word_token_idx)


def official_layout(probs: torch.Tensor) -> torch.Tensor:
    """tcscale's (1, H, Lq, Lk) -> the official (B·H, res, res, Lk) of a batch-1 layer."""
    _, H, Lq, Lk = probs.shape
    res = math.isqrt(Lq)
    return probs.reshape(H, res, res, Lk)


def words_of(token_phrase: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """Per phrase slot present in the (77,) row, its token positions (the official word_token_idx_ls)."""
    slots = sorted(int(p) for p in torch.unique(token_phrase) if p >= 0)
    return [torch.nonzero(token_phrase == p).flatten().tolist() for p in slots], slots


def tiny_tokencompose(tmp_path, *overrides):
    cfg = load_config(
        TINY,
        [f"output_dir={tmp_path}", "deepspeed.train_micro_batch_size_per_gpu=1", "tracking.enabled=false", *overrides],
    )
    comps = build_tiny_components(cfg.model.tiny, cfg.data.resolution)
    ctx = BuildContext(cfg, comps, torch.float32, torch.device("cpu"), micro_batch_size=1)
    return cfg, comps, OBJECTIVES["tokencompose"].build(cfg.objective.tokencompose, ctx)


def test_official_step_equals_transcription_of_the_official_loss(tmp_path):
    from tcscale.data import build_train_loader

    cfg, comps, obj = tiny_tokencompose(
        tmp_path,
        "objective.tokencompose.token_loss_heads=per_head",
        "objective.tokencompose.pixel_loss_reduction=per_resolution",
    )
    loader = build_train_loader(
        cfg.data, comps.tokenizer, rank=0, world_size=1, micro_batch_size=1, seed=0, plan=obj.plan, full_masks=True
    )
    batch = loader.next_batch()
    with torch.no_grad():
        out = obj(obj.module, batch, torch.Generator().manual_seed(5))  # a real TokenCompose step
        nb = obj.noised(batch, torch.Generator().manual_seed(5))  # the same inputs again: the same maps
        with ProbsRecorder(tuple(nb.latents.shape[-2:])) as rec:
            obj.module(nb.noisy, nb.timesteps, nb.text, cross_attention_kwargs=rec.kwargs)
    probs = {r.name: r.probs for r in rec.records}
    words, slots = words_of(batch["token_phrase"][0])
    assert words, "the sample has no grounded phrase"
    seg = [batch["phrase_masks"][0, p][None] for p in slots]  # binary 64-px masks (mask_full_res=binary)

    groups = obj.plan.groups()
    assert set(groups) == {"mid_4", "up_4", "up_8"} and len(groups["up_8"]) == 2
    official = {
        name: official_grounding_loss_by_layer(
            seg, words, obj.plan.side_of(layers[0]), [official_layout(probs[n]) for n in layers]
        )
        for name, layers in groups.items()
    }
    # the step's terms: Σ over the groups, as the official training loop sums get_grounding_loss_by_layer
    assert out.terms["token"].item() == pytest.approx(sum(t for t, _ in official.values()), rel=1e-5)
    assert out.terms["pixel"].item() == pytest.approx(sum(p for _, p in official.values()), rel=1e-5)
    # and group by group, through the recorder the objective uses
    with torch.no_grad(), obj.recorder(tuple(nb.latents.shape[-2:]), batch) as grouped:
        obj.module(nb.noisy, nb.timesteps, nb.text, cross_attention_kwargs=grouped.kwargs)
    assert isinstance(grouped, GroupedLossRecorder)
    values = grouped.group_losses()
    assert set(values) == set(groups)
    for name, (token, pixel) in official.items():
        assert values[name]["token"].item() == pytest.approx(token, rel=1e-5), name
        assert values[name]["pixel"].item() == pytest.approx(pixel, rel=1e-5), name
    # the paper reduction differs: Σ of the per-layer pixel losses (the official one counts each group once)
    per_layer = sum(
        grounding_losses(probs[n], batch["layer_masks"][(obj.plan.side_of(n),) * 2], batch["token_phrase"])["pixel"]
        for n in obj.plan.layers
    ).item()
    assert per_layer > 1.5 * out.terms["pixel"].item()


def test_grouped_recorder_gradients_survive_activation_checkpointing(grounded_unet, grounding_inputs):
    unet, plan = grounded_unet()
    latents, t, text, masks, token_phrase = grounding_inputs()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        unet.train()
        with GroupedLossRecorder((8, 8), token_phrase, groups=plan.groups(), phrase_masks=masks) as rec:
            unet(latents, t, text, cross_attention_kwargs=rec.kwargs)
        n_layers = len(rec.layer_probs)
        (rec.total("token") + rec.total("pixel")).backward()
        assert len(rec.layer_probs) == n_layers == len(plan.layers)  # the recompute recorded nothing
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    key = f"{plan.layers[0]}.to_k.weight"
    assert plain.keys() == ckpt.keys() and ckpt[key].abs().sum() > 0
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], rtol=1e-4, atol=1e-7), name


def random_group(B=1, H=8, side=16, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    attns = [
        (torch.randn(B, H, side * side, LK, generator=g, dtype=torch.float64) * 3).softmax(-1) for _ in range(layers)
    ]
    full = torch.zeros(B, 2, 64, 64)
    full[:, 0, 8:40, 4:30] = 1
    full[:, 1, 30:, 20:60] = 1
    token_phrase = torch.full((B, LK), -1, dtype=torch.long)
    token_phrase[:, [2, 3]] = 0
    token_phrase[:, 6] = 1
    return attns, full, token_phrase


@pytest.mark.parametrize("heads", ["mean_map", "per_head"])
def test_grouped_losses_match_the_official_definition_and_the_per_layer_sum(heads):
    attns, full, token_phrase = random_group()
    masks = MaskRule().apply(full, (16, 16))  # (1, 2, 256): bilinear, > 0
    out = grounding_losses_grouped(
        attns, masks, token_phrase, token_loss_heads=heads, pixel_loss_reduction="per_resolution"
    )
    token, pixel = official_grounding_loss_by_layer(
        [full[0, 0][None], full[0, 1][None]], [[2, 3], [6]], 16, [official_layout(a) for a in attns]
    )
    assert out["pixel"].item() == pytest.approx(pixel, rel=1e-10)
    if heads == "per_head":
        assert out["token"].item() == pytest.approx(token, rel=1e-10)
    else:  # the paper's ratio on the head-averaged map is not the official mean of per-head ratios
        assert out["token"].item() != pytest.approx(token, rel=1e-6)
    layered = grounding_losses_grouped(attns, masks, token_phrase, token_loss_heads=heads)
    singles = [grounding_losses(a, masks, token_phrase, token_loss_heads=heads) for a in attns]
    assert layered["token"].item() == pytest.approx(out["token"].item(), rel=1e-12)
    assert layered["pixel"].item() == pytest.approx(sum(s["pixel"].item() for s in singles), rel=1e-12)


def test_grouped_losses_batch_is_the_mean_over_samples():
    attns, full, token_phrase = random_group(B=2, seed=3)
    masks = MaskRule().apply(full, (16, 16))
    both = grounding_losses_grouped(attns, masks, token_phrase, pixel_loss_reduction="per_resolution")
    each = [
        grounding_losses_grouped(
            [a[b : b + 1] for a in attns],
            masks[b : b + 1],
            token_phrase[b : b + 1],
            pixel_loss_reduction="per_resolution",
        )["pixel"].item()
        for b in range(2)
    ]
    assert both["pixel"].item() == pytest.approx(sum(each) / 2, rel=1e-12)


def test_grouped_losses_refuse_bad_input():
    attns, full, token_phrase = random_group()
    masks = MaskRule().apply(full, (16, 16))
    with pytest.raises(ValueError, match="pixel_loss_reduction"):
        grounding_losses_grouped(attns, masks, token_phrase, pixel_loss_reduction="per_group")
    with pytest.raises(ValueError, match="empty"):
        grounding_losses_grouped([], masks, token_phrase)
    with pytest.raises(ValueError, match=r"attns\[1\]"):
        grounding_losses_grouped([attns[0], attns[1][:, :, :100]], masks, token_phrase)


def test_fused_backend_with_per_resolution_is_refused_in_one_line(tmp_path):
    for overrides in (
        ["objective.tokencompose.pixel_loss_reduction=per_resolution"],
        ["objective.tokencompose.fidelity=official"],
    ):
        with pytest.raises(ConfigError) as err:
            load_config(TINY, [f"output_dir={tmp_path}", "attention.backend=fused", *overrides])
        message = str(err.value)
        assert "\n" not in message
        assert "attention.backend=fused" in message and "objective.tokencompose.pixel_loss_reduction" in message
    cfg = load_config(
        TINY,
        [
            "attention.backend=fused",
            "objective.tokencompose.fidelity=official",
            "objective.tokencompose.pixel_loss_reduction=per_layer",
        ],
    )
    assert cfg.objective.tokencompose.token_loss_heads == "per_head"  # the fused kernel serves per_head


# ---------------------------------------------------------------------------------------------------------
# The 512-px mask: binary before the layer resize (tcscale) or soft (official loader)
# ---------------------------------------------------------------------------------------------------------
def pil_resized(mask01: np.ndarray, resolution: int) -> torch.Tensor:
    """A square 0/1 mask as the official loader reads it: PIL bilinear resize of the 0/255 image, ToTensor."""
    im = Image.fromarray((mask01 * 255).astype(np.uint8)).resize((resolution, resolution), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im).astype(np.float64) / 255.0)


def line_sample(caption="a red line and a blue block") -> RawSample:
    mask = np.zeros((2, 256, 256), np.uint8)
    mask[0, :, 109] = 1  # a 1-px line: a quarter of a pixel at 64 px, lost by the 0.5 binarisation
    mask[1, 160:224, 32:96] = 1  # a block: the same either way (up to its edges)
    image = np.zeros((256, 256, 3), np.uint8)
    return RawSample("k", image, caption, ["red line", "blue block"], mask, num_null=0)


@pytest.mark.parametrize("full_res", ["binary", "soft"])
def test_mask_full_res_rule_against_the_official_loader(full_res, sd_tokenizer):
    raw = line_sample()
    settings = ProcessSettings(
        resolution=64, layer_sizes=((8, 8), (16, 16)), mask_rule=MaskRule(full_res=full_res), full_masks=True
    )
    sample = SampleProcessor(sd_tokenizer, settings)(raw, np.random.default_rng(0), Counters())
    # the full-resolution masks the batch carries (evaluation IoU reads them) are binary whatever the rule
    assert set(sample["phrase_masks"].unique().tolist()) <= {0.0, 1.0}
    for p in range(2):
        resized = pil_resized(raw.masks[p], 64)
        # official: divided by its max (attn_gt / attn_gt.max()); tcscale: at least half of a pixel covered
        full = resized / resized.max() if full_res == "soft" else (resized >= 0.5).double()
        for side in (8, 16):
            small = F.interpolate(full[None, None], size=(side, side), mode="bilinear", align_corners=False)
            expected = (small > 0).double().flatten()
            got = sample["layer_masks"][(side, side)][p].double()
            assert torch.equal(got, expected), (full_res, p, side)
    line = sample["layer_masks"][(8, 8)][0]
    assert (line.sum() > 0) == (full_res == "soft")  # the thin line survives only the soft rule


def test_mask_full_res_travels_through_the_plan_to_the_loader(tmp_path, sd_tokenizer):
    from tcscale.data import build_train_loader

    cfg, comps, obj = tiny_tokencompose(tmp_path, "objective.tokencompose.fidelity=official")
    assert obj.plan.mask_rule == MaskRule("bilinear", 0.0, "soft")
    loader = build_train_loader(cfg.data, sd_tokenizer, rank=0, world_size=1, micro_batch_size=1, seed=0, plan=obj.plan)
    assert loader.settings.mask_rule.full_res == "soft"
    paper = GroundingPlan.from_config(obj.module, cfg.attention, cfg.data.resolution, 8)
    assert paper.mask_rule.full_res == "binary"
    with pytest.raises(ValueError, match="full_res"):
        MaskRule(full_res="grey")


# ---------------------------------------------------------------------------------------------------------
# SepEn: kernel, latent, prompts, pair
# ---------------------------------------------------------------------------------------------------------
def paper_kernel(sigma):
    w = [[math.exp(-(x * x + y * y) / (2 * sigma**2)) for x in (-1, 0, 1)] for y in (-1, 0, 1)]
    s = sum(map(sum, w))
    return torch.tensor([[v / s for v in row] for row in w], dtype=torch.float64)


def attend_and_excite_kernel(sigma):
    """GaussianSmoothing of Attend-and-Excite: per axis exp(−((x − mean) / (2·std))²), product, normalised."""
    grid = [0.0, 1.0, 2.0]
    mean = 1.0
    w = [
        [math.exp(-(((gy - mean) / (2 * sigma)) ** 2)) * math.exp(-(((gx - mean) / (2 * sigma)) ** 2)) for gx in grid]
        for gy in grid
    ]
    s = sum(map(sum, w))
    return torch.tensor([[v / s for v in row] for row in w], dtype=torch.float64)


def loop_enhance(attn, objects, kernel):
    """L_en = 1 − min_k max_u (G ∗ A_k)[u] of one sample, reflect padding, in Python loops."""
    H, Lq = attn.shape[1], attn.shape[2]
    side = math.isqrt(Lq)
    peaks = []
    for tokens in objects:
        A = [
            [
                sum(float(attn[0, h, y * side + x, i]) for h in range(H) for i in tokens) / (H * len(tokens))
                for x in range(side)
            ]
            for y in range(side)
        ]

        def at(y, x, A=A):
            y = -y if y < 0 else (2 * (side - 1) - y if y >= side else y)
            x = -x if x < 0 else (2 * (side - 1) - x if x >= side else x)
            return A[y][x]

        smooth = [
            sum(float(kernel[dy + 1, dx + 1]) * at(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
            for y in range(side)
            for x in range(side)
        ]
        peaks.append(max(smooth))
    return 1.0 - min(peaks)


def test_sepen_kernels_and_their_enhance_loss():
    paper, official = paper_kernel(0.5), attend_and_excite_kernel(0.5)
    torch.testing.assert_close(gaussian_kernel_3x3(0.5, dtype=torch.float64), paper, rtol=0, atol=1e-15)
    torch.testing.assert_close(
        gaussian_kernel_3x3(0.5, kernel="official", dtype=torch.float64), official, rtol=0, atol=1e-15
    )
    assert paper[1, 1].item() == pytest.approx(0.6193, abs=1e-4)
    assert official[1, 1].item() == pytest.approx(0.3319, abs=1e-4)

    g = torch.Generator().manual_seed(0)
    attn = (torch.randn(1, 8, 256, LK, generator=g, dtype=torch.float64) * 3).softmax(-1)
    objects = [[[2], [5, 6]]]
    en = {k: sepen_losses([attn], objects, kernel=k)["en"].item() for k in ("paper", "official")}
    assert en["paper"] == pytest.approx(loop_enhance(attn, objects[0], paper), rel=1e-12)
    assert en["official"] == pytest.approx(loop_enhance(attn, objects[0], official), rel=1e-12)
    assert en["official"] > en["paper"]  # the wider kernel flattens the peaks: L_en grows
    sep = {k: sepen_losses([attn], objects, kernel=k)["sep"].item() for k in ("paper", "official")}
    assert sep["paper"] == sep["official"]  # L_sep is not smoothed
    with pytest.raises(ValueError, match="kernel"):
        sepen_losses([attn], objects, kernel="gauss")


def sd_alphas_cumprod() -> list[float]:
    """SD's scaled-linear DDPM schedule from its definition: β = linspace(√0.00085, √0.012, 1000)², ᾱ = Π(1 − β)."""
    lo, hi, n = math.sqrt(0.00085), math.sqrt(0.012), 1000
    out, prod = [], 1.0
    for s in range(n):
        beta = (lo + (hi - lo) * s / (n - 1)) ** 2
        prod *= 1.0 - beta
        out.append(prod)
    return out


@pytest.mark.parametrize("t", [0, 50, 999])
def test_sepen_latent_official_is_scaled_noise_noised_to_t(t):
    abar = sd_alphas_cumprod()[t]
    shape = (32, 4, 32, 32)
    sched = sd_noise_scheduler("epsilon")
    ts = torch.full((shape[0],), t, dtype=torch.long)
    z, got_t = sepen_mod.sepen_latents("official", shape, sched, torch.Generator().manual_seed(1), timesteps=ts)
    assert torch.equal(got_t, ts)
    expected_std = math.sqrt(abar * 0.18215**2 + (1.0 - abar))
    assert z.std().item() == pytest.approx(expected_std, rel=0.01)
    assert abs(z.mean().item()) < 0.01
    pure, _ = sepen_mod.sepen_latents("pure_noise", shape, sched, torch.Generator().manual_seed(1), timesteps=ts)
    assert pure.std().item() == pytest.approx(1.0, rel=0.01)
    if t == 0:
        assert expected_std == pytest.approx(0.1844, abs=1e-4)


def tiny_sepen(tmp_path, *overrides):
    cfg = load_config(
        TINY, [f"output_dir={tmp_path}", "objective.name=sepen", "objective.sepen.map_resolution=8", *overrides]
    )
    comps = build_tiny_components(cfg.model.tiny, cfg.data.resolution)
    ctx = BuildContext(cfg, comps, torch.float32, torch.device("cpu"), micro_batch_size=4)
    return cfg, comps, OBJECTIVES["sepen"].build(cfg.objective.sepen, ctx)


def test_sepen_objective_uses_the_latent_and_prompt_options(tmp_path):
    cfg, comps, obj = tiny_sepen(tmp_path, "objective.sepen.fidelity=official", "objective.sepen.pair_index=3")
    z, t = obj._noise_and_t(4, torch.Generator().manual_seed(2))
    ref, ref_t = sepen_mod.sepen_latents(
        "official", (4, 4, 8, 8), comps.noise_scheduler, torch.Generator().manual_seed(2)
    )
    assert torch.equal(z, ref) and torch.equal(t, ref_t)
    a, b = pair_concepts()[3]
    for p in obj.batch(0)["prompts"]:
        assert p.text in (f"a photo of {a} and {b}", f"a photo of {b} and {a}")
    out = obj(obj.module, obj.batch(0), torch.Generator().manual_seed(0))
    assert set(out.terms) == {"sep", "en"} and torch.isfinite(out.loss)


def test_sepen_prompt_styles(sd_tokenizer):
    def texts(style, source):
        sampler = SepEnPromptSampler.from_concepts(source, style=style, seed=3, tokenizer=sd_tokenizer)
        prompts = [p for step in range(12) for p in sampler.multi(step, 0, 8)]
        for p in prompts:  # token positions still point at the nouns
            for noun, pos in zip(p.objects, p.token_positions):
                ids = sd_tokenizer(p.text, padding="max_length", max_length=77).input_ids
                assert sd_tokenizer.decode([ids[i] for i in pos]).strip() == noun
        return prompts

    article = r"(a|an)"
    for p in texts("paper", "pairs"):
        assert re.fullmatch(rf"(a photo of )?{article} {p.objects[0]} and {article} {p.objects[1]}", p.text), p.text
    for p in texts("official_pairs", "pairs"):
        assert p.text == f"a photo of {p.objects[0]} and {p.objects[1]}"
    large = texts("official_large", "large")
    for p in large:
        assert re.fullmatch(rf"a photo of a {p.objects[0]} (and|with) a {p.objects[1]}", p.text), p.text
    assert {p.text.split()[4 + len(p.objects[0].split())] for p in large} == {"and", "with"}
    assert any(n[0] in "aeiou" for p in large for n in p.objects)  # "a apple": the official template keeps "a"
    with pytest.raises(ValueError, match="2 objects"):
        SepEnPromptSampler.from_concepts("large", style="official_large", num_objects=(2, 3), tokenizer=sd_tokenizer)


def test_sepen_prompts_option_maps_to_the_setting_template():
    sep = sepen_mod.resolve_sepen(sepen_mod.SepEnConfig(fidelity="official"))
    assert sepen_mod.prompt_style(sep) == "official_pairs"
    sep.concepts = "large"
    assert sepen_mod.prompt_style(sep) == "official_large"
    assert sepen_mod.prompt_style(sepen_mod.resolve_sepen(sepen_mod.SepEnConfig())) == "paper"


# ---------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------
PRESETS = {"tokencompose": tc_mod.FIDELITY_PRESETS, "sepen": sepen_mod.FIDELITY_PRESETS}


@pytest.mark.parametrize("objective", ["tokencompose", "sepen"])
@pytest.mark.parametrize("fidelity", ["paper", "official"])
def test_preset_resolves_every_option_and_round_trips(objective, fidelity, tmp_path):
    spec = OBJECTIVES[objective]
    defaults = spec.config()
    assert all(getattr(defaults, option) is None for option in PRESETS[objective][fidelity])  # "from the preset"
    cfg = load_config(TINY, [f"objective.name={objective}", f"objective.{objective}.fidelity={fidelity}"])
    section = getattr(cfg.objective, objective)
    assert {o: getattr(section, o) for o in PRESETS[objective][fidelity]} == PRESETS[objective][fidelity]
    save_config(cfg, tmp_path / "config.yaml")  # what the trainer writes into the run directory
    text = (tmp_path / "config.yaml").read_text()
    for option, value in PRESETS[objective][fidelity].items():
        assert re.search(rf"^    {option}: {value}$", text, re.M), option
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "objective, option, value",
    [
        ("tokencompose", "token_loss_heads", "mean_map"),
        ("tokencompose", "mask_full_res", "binary"),
        ("sepen", "kernel", "paper"),
        ("sepen", "latent", "pure_noise"),
    ],
)
def test_explicit_option_overrides_the_preset(objective, option, value):
    cfg = load_config(
        TINY,
        [
            f"objective.name={objective}",
            f"objective.{objective}.fidelity=official",
            f"objective.{objective}.{option}={value}",
        ],
    )
    section = getattr(cfg.objective, objective)
    assert getattr(section, option) == value
    others = {o: v for o, v in PRESETS[objective]["official"].items() if o != option}
    assert {o: getattr(section, o) for o in others} == others


def test_builders_resolve_a_section_that_skipped_the_check():
    tc = tc_mod.resolve_tokencompose(tc_mod.TokenComposeConfig(fidelity="official", token_loss_heads="mean_map"))
    assert (tc.token_loss_heads, tc.pixel_loss_reduction, tc.mask_full_res) == ("mean_map", "per_resolution", "soft")
    raw = tc_mod.TokenComposeConfig()
    tc_mod.resolve_tokencompose(raw)
    assert raw.token_loss_heads is None  # a copy: the given section is untouched


def test_fidelity_doc_lists_every_option():
    doc = (REPO / "docs" / "FIDELITY.md").read_text()
    for objective, presets in PRESETS.items():
        assert f"objective.{objective}.fidelity" in doc
        for option in presets["official"]:
            assert f"objective.{objective}.{option}" in doc, option
    for key in ("objective.sepen.pair_index", "objective.sepen.lambda_sep", "sepen_pairs.sbatch"):
        assert key in doc


# ---------------------------------------------------------------------------------------------------------
# One model per pair: the sbatch array recipe
# ---------------------------------------------------------------------------------------------------------
SEPEN_PAIRS = REPO / "launchers" / "slurm" / "sepen_pairs.sbatch"


def run_pairs_script(tmp_path, env_extra, *args):
    standin = tmp_path / "train_standin.sh"
    standin.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STANDIN_OUT"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"TCSCALE_TRAIN_SBATCH": str(standin), "TCSCALE_ROOT": str(REPO), "STANDIN_OUT": str(tmp_path / "argv")})
    env.update(env_extra)
    return subprocess.run(["bash", str(SEPEN_PAIRS), *args], env=env, capture_output=True, text=True, timeout=30)


def test_sepen_pairs_array_task_trains_its_pair(tmp_path):
    header = [line for line in SEPEN_PAIRS.read_text().splitlines() if line.startswith("#SBATCH")]
    assert f"#SBATCH --array=0-{len(pair_concepts()) - 1}" in header
    assert "#SBATCH --gpus-per-node=1" in header  # one GPU per pair: train.sbatch starts one rank per GPU
    done = run_pairs_script(
        tmp_path,
        {"SLURM_ARRAY_TASK_ID": "7", "TCSCALE_PAIRS_OUTPUT": "runs/pairs"},
        "configs/sd14_sepen_pairs.yaml",
        "max_steps=200",
    )
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[0] == "configs/sd14_sepen_pairs.yaml" and argv[1] == "max_steps=200"
    assert {"objective.sepen.pair_index=7", "output_dir=runs/pairs/pair07", "run_name=sd14_sepen_pairs_pair07"} <= set(
        argv
    )
    cfg = load_config(REPO / argv[0], argv[1:])  # what train.sbatch hands the trainer validates
    assert cfg.objective.sepen.pair_index == 7 and cfg.max_steps == 200

    missing = run_pairs_script(tmp_path, {})
    assert missing.returncode == 2 and "SLURM_ARRAY_TASK_ID" in missing.stderr
    bad = run_pairs_script(tmp_path, {"SLURM_ARRAY_TASK_ID": "x"})
    assert bad.returncode == 2
