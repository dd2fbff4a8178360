"""Validation images and per-phrase cross-attention heatmaps, logged to MLflow by rank 0.

Collective: every rank runs the same generation (under ZeRO-3 each U-Net forward gathers the
partitioned weights from all ranks), rank 0 logs. Heatmaps, one per phrase of the prompt, come from a `MapCapture`
on the grounding plan's layers: the head-averaged maps, summed over sampler steps (conditional half of the
classifier-free-guidance batch), upsampled to the image and averaged over layers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tcscale.attention.plan import GroundingPlan, vae_scale_factor
from tcscale.attention.processors import observe
from tcscale.attention.recorders import MapCapture
from tcscale.config import TrainConfig

STOPWORDS = {"a", "an", "the", "of", "and", "with", "photo", "picture", "image", "in", "on", "at", "to", "is", "its"}


def prompt_phrases(prompt: str) -> list[str]:
    """The prompt's phrases for heatmaps: maximal runs of non-stopwords, broken at punctuation, in order
    ("a photo of a cat and a wine glass" -> ["cat", "wine glass"])."""
    phrases, run = [], []
    for raw in prompt.replace(",", " , ").replace(".", " . ").split():
        word = raw.lower()
        if word in STOPWORDS or word in {",", "."}:
            if run:
                phrases.append(" ".join(run))
            run = []
        else:
            run.append(raw)
    if run:
        phrases.append(" ".join(run))
    return list(dict.fromkeys(phrases))


def phrase_tokens(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """(phrase, token positions) for the prompt's phrases, aligned like training captions."""
    from tcscale.data.align import PhraseAligner

    phrases = prompt_phrases(prompt)
    alignment = PhraseAligner(tokenizer).align(prompt, phrases)
    return [(p, pos) for p, pos in zip(phrases, alignment.positions) if pos]


def heatmap_grid(
    image: Image.Image, maps: dict[str, torch.Tensor], phrases: list[tuple[str, list[int]]]
) -> Image.Image:
    """The image followed by one overlay per phrase: the sum of its tokens' maps (normalised to [0, 1]) in red."""
    W, H = image.size
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    per_layer = []
    for m in maps.values():  # (Lq, Lk) summed over steps
        side = int(round(m.shape[0] ** 0.5))
        grid = m.T.reshape(1, m.shape[1], side, side).float()
        per_layer.append(F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)[0])
    avg = torch.stack(per_layer).mean(0)  # (Lk, H, W)
    tiles = [base]
    for _, positions in phrases:
        heat = avg[positions].sum(0)
        heat = ((heat - heat.min()) / (heat.max() - heat.min() + 1e-8)).numpy()[..., None]
        tiles.append(0.5 * base + 0.5 * heat * np.array([1.0, 0.1, 0.1], dtype=np.float32))
    return Image.fromarray((np.concatenate(tiles, axis=1) * 255).clip(0, 255).astype(np.uint8))


@torch.no_grad()
def generate(unet, comps, prompt: str, cfg: TrainConfig, device: torch.device, capture: bool = False):
    """One validation image (PIL) and, with capture, the grounded layers' maps {layer: (Lq, Lk)}."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        tokenizer=comps.tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(comps.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    side = cfg.data.resolution // pipe.vae_scale_factor
    gen = torch.Generator(device=device).manual_seed(cfg.validation.seed)
    with MapCapture((side, side)) as capture_maps:
        latents = pipe(
            prompt,
            height=cfg.data.resolution,
            width=cfg.data.resolution,
            num_inference_steps=cfg.validation.num_inference_steps,
            guidance_scale=cfg.validation.guidance_scale,
            generator=gen,
            output_type="latent",
            cross_attention_kwargs=capture_maps.kwargs if capture else None,
        ).images
    vae = comps.vae
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    pil = pipe.image_processor.postprocess(image.float(), output_type="pil")[0]
    maps = {k: v[-1].cpu() for k, v in capture_maps.maps.items()} if capture else None  # last row: conditional half
    return pil, maps


def run_validation(unet, comps, cfg: TrainConfig, plan: GroundingPlan | None, tracker, step: int, env) -> None:
    """Images and per-phrase heatmaps for `validation.prompts`. The maps are those of the objective's grounded
    layers, or (an objective that grounds nothing, e.g. LDM-only) of the layers `attention` selects."""
    if plan is None:
        plan = GroundingPlan.from_config(unet, cfg.attention, cfg.data.resolution, vae_scale_factor(comps.vae))
    observe(unet, plan)
    was_training = unet.training
    unet.eval()
    capture = True
    try:
        for i, prompt in enumerate(cfg.validation.prompts):
            image, maps = generate(unet, comps, prompt, cfg, env.device, capture)
            if not env.is_rank0:
                continue
            tracker.log_image(image, f"validation/step{step:06d}/prompt{i}.png")
            if maps:
                phrases = phrase_tokens(comps.tokenizer, prompt)
                if phrases:
                    grid = heatmap_grid(image, maps, phrases)
                    tracker.log_image(grid, f"validation/step{step:06d}/prompt{i}_attention.png")
                    tracker.log_dict(
                        {"prompt": prompt, "phrases": [p for p, _ in phrases]},
                        f"validation/step{step:06d}/prompt{i}_attention.json",
                    )
    finally:
        unet.train(was_training)
