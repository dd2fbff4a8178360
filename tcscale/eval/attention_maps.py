"""Per-phrase cross-attention heatmaps of a generation: the attention viewer, and the rendering validation logs.

    python -m tcscale.eval.attention_maps --model runs/demo/export --prompt "a photo of a red circle and a blue star"

writes `<out>/image.png`, `<out>/attention.png` (the image and one labelled heatmap per phrase, side by side) and
`<out>/phrase<i>_<phrase>.png`. A phrase is a maximal run of content words of the prompt ("a photo of a cat and a
wine glass" -> "cat", "wine glass"), aligned to its tokens like training captions. Its heatmap is the sum of its
tokens' head-averaged maps, summed over the sampler steps (conditional half of classifier-free guidance),
upsampled to the image and averaged over the grounded layers (mid + up blocks by default); normalised to [0, 1]
per phrase and drawn as a colour overlay with the phrase written on the tile.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from tcscale.attention.plan import GroundingPlan
from tcscale.attention.recorders import MapCapture

STOPWORDS = {"a", "an", "the", "of", "and", "with", "photo", "picture", "image", "in", "on", "at", "to", "is", "its"}
TILE = 256  # px: heatmap tiles are drawn at least this large, whatever the image size


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


def phrase_key_tokens(towers, family, prompt: str) -> list[tuple[str, list[int]]]:
    """(phrase, positions among the denoiser's text keys) for the prompt's phrases: `phrase_tokens` in the first
    tokenizer, then the family's keys of each phrase (`Family.key_token_phrase`: SD3 adds the phrase's T5 tokens,
    after the 77 CLIP keys). `towers`: a pipeline or components of `family`."""
    from tcscale.attention.config import AttentionConfig

    phrases = phrase_tokens(towers.tokenizer, prompt)
    ids = towers.tokenizer(
        prompt, padding="max_length", max_length=towers.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # fmt: skip
    token_phrase = torch.full(ids.shape, -1, dtype=torch.long)
    for p, (_, pos) in enumerate(phrases):
        token_phrase[0, pos] = p
    keys = family.key_token_phrase(towers, ids, token_phrase, AttentionConfig())[0]
    return [(text, torch.nonzero(keys == p).flatten().tolist()) for p, (text, _) in enumerate(phrases)]


def phrase_heat(maps: dict[str, torch.Tensor], positions: list[int], size: tuple[int, int]) -> torch.Tensor:
    """(H, W) heat of one phrase: Σ of its tokens' maps per layer ((Lq, Lk) each, square layers), upsampled to
    `size` (bilinear), averaged over layers."""
    per_layer = []
    for m in maps.values():
        side = int(round(m.shape[0] ** 0.5))
        heat = m[:, positions].sum(dim=1).reshape(1, 1, side, side).float()
        per_layer.append(F.interpolate(heat, size=size, mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(per_layer).mean(0)


def _colormap(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB in [0, 1] (matplotlib's 'inferno'; a plain red ramp if matplotlib is missing)."""
    try:
        from matplotlib import colormaps

        return colormaps["inferno"](x)[..., :3]
    except ImportError:
        return np.stack([x, 0.1 * x, 0.1 * x], axis=-1)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_attention(image: Image.Image, phrases: list[tuple[str, torch.Tensor]], tile: int = TILE) -> Image.Image:
    """The image, then one tile per (phrase, heat): the heat min-max normalised, as a colour overlay (60 %) on the
    image, the phrase written in a band above. Tiles are at least `tile` px (small images are upscaled)."""
    side = max(tile, image.width)
    scale = side / image.width
    height = int(round(image.height * scale))
    base_img = image.convert("RGB").resize((side, height), Image.BICUBIC)
    base = np.asarray(base_img, dtype=np.float32) / 255.0
    band = max(18, side // 10)
    font = _font(int(band * 0.7))
    tiles = [("image", base)]
    for text, heat in phrases:
        h = heat[None, None].float()
        h = F.interpolate(h, size=(height, side), mode="bilinear", align_corners=False)[0, 0].numpy()
        h = (h - h.min()) / (h.max() - h.min() + 1e-8)
        tiles.append((text, 0.4 * base + 0.6 * _colormap(h)))
    canvas = Image.new("RGB", (side * len(tiles), height + band), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (text, arr) in enumerate(tiles):
        canvas.paste(Image.fromarray((arr * 255).clip(0, 255).astype(np.uint8)), (i * side, band))
        draw.text((i * side + 4, band // 8), text, fill=(0, 0, 0), font=font)
    return canvas


@torch.no_grad()
def generate_with_maps(
    pipe,
    prompt: str,
    plan: GroundingPlan,
    *,
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
    generator: torch.Generator,
) -> tuple[Image.Image, dict[str, torch.Tensor]]:
    """One image (PIL) and the plan's layers' maps {layer: (Lq, Lk)} summed over steps (conditional half)."""
    from tcscale.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    family.observe(family.denoiser(pipe), plan)
    side = resolution // pipe.vae_scale_factor
    with MapCapture((side, side)) as capture:
        latents = pipe(
            prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="latent",
            **family.attention_call_kwargs(capture.kwargs),
        ).images
    vae = pipe.vae  # decoded in the VAE's own dtype (training keeps it fp32 beside a bf16 U-Net)
    decoded = vae.decode(family.unscale_latents(vae, latents.to(vae.dtype))).sample
    image = pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]
    return image, {k: v[-1].float().cpu() for k, v in capture.maps.items()}  # last row: the conditional half


def attention_figure(
    image: Image.Image, maps: dict[str, torch.Tensor], tokenizer, prompt: str, *, towers=None, family=None
) -> Image.Image | None:
    """`render_attention` of the prompt's phrases; None when no phrase aligns to tokens. With `towers` and `family`
    a phrase's heat reads all its text keys (`phrase_key_tokens`), otherwise its first tokenizer's tokens."""
    phrases = phrase_tokens(tokenizer, prompt) if family is None else phrase_key_tokens(towers, family, prompt)
    phrases = [(text, pos) for text, pos in phrases if pos]
    if not phrases:
        return None
    size = (image.height, image.width)
    return render_attention(image, [(text, phrase_heat(maps, pos, size)) for text, pos in phrases])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="diffusers pipeline dir or hub id (e.g. a tcscale export)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", default="attention_maps", help="output folder (default ./attention_maps)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resolution", type=int, default=None, help="px (default: the model's native size)")
    ap.add_argument("--scheduler", default="pndm", choices=["pndm", "ddim", "dpm", "euler", "model"])
    ap.add_argument("--blocks", nargs="+", default=["mid", "up"], help="U-Net blocks whose attn2 maps are averaged")
    args = ap.parse_args(argv)

    from tcscale.attention.plan import vae_scale_factor
    from tcscale.eval.config import EvalModelConfig, SamplerConfig
    from tcscale.eval.generation import EvalInputError, load_pipeline, native_resolution

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = load_pipeline(args.model, EvalModelConfig(pretrained=args.model), SamplerConfig(args.scheduler), device)
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tcscale.families import family_of_pipeline

    resolution = args.resolution or native_resolution(pipe)
    plan = GroundingPlan.build(
        pipe.unet, blocks=args.blocks, resolutions=None, image_resolution=resolution,
        scale_factor=vae_scale_factor(pipe.vae), layout=family_of_pipeline(pipe).layout,
    )  # fmt: skip
    print(
        f"generating {resolution} px, {args.steps} steps, maps of {len(plan.layers)} layers ({' '.join(args.blocks)})"
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    image, maps = generate_with_maps(
        pipe, args.prompt, plan, resolution=resolution, num_inference_steps=args.steps,
        guidance_scale=args.guidance, generator=gen,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "image.png")
    phrases = phrase_tokens(pipe.tokenizer, args.prompt)
    if not phrases:
        print(f"no phrase of {args.prompt!r} aligns to tokens; wrote {out / 'image.png'} only")
        return 0
    size = (image.height, image.width)
    heats = [(text, phrase_heat(maps, pos, size)) for text, pos in phrases]
    render_attention(image, heats).save(out / "attention.png")
    for i, (text, heat) in enumerate(heats):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
        render_attention(image, [(text, heat)]).save(out / f"phrase{i}_{slug}.png")
    print(f"wrote {out / 'image.png'}, {out / 'attention.png'} and {len(heats)} phrase tiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
