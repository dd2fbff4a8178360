"""Grounding mIoU of a denoiser on held-out grounded data: noise real latents, one forward, read the maps.

For each held-out sample and each chosen timestep t: the image's VAE latent (the distribution's mode), noised to t
with a seed of (eval seed, sample key, t) by the model's family (DDPM: the scheduler's forward process; flow matching,
SD3: σ = t / T); one denoiser forward with the caption under a `MapCapture` on the layers of a `GroundingPlan` (a
U-Net's attn2, an MMDiT's joint attention read as image queries x text keys, docs/MMDIT.md); per phrase, the sum of
its tokens' head-averaged maps per layer (as TokenCompose's pixel loss forms S_p; SD3: its CLIP and T5 tokens);
then `tcscale.eval.grounding_iou` (upsampled, averaged over layers, normalised, thresholded) against the sample's
full-resolution masks. Reported: the mean over every (sample, phrase, timestep), per layer and per timestep. The same
function serves the evaluation launcher and the trainer's live grounding curve.

Data: held-out WebDataset shards through the loader's own sample processing (crop, alignment), one pass, no
shuffling; or the synthetic world's held-out split (images that each show one colour/shape combination never
trained on).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from tcscale.attention.plan import GroundingPlan, layer_size
from tcscale.attention.recorders import MapCapture
from tcscale.eval.grounding_iou import grounding_iou


@dataclass
class GroundingEvalConfig:
    """Held-out grounding mIoU (evaluation `grounding`, training `validation.grounding`)."""

    enabled: bool = False
    source: Literal["synthetic", "webdataset"] = "webdataset"  # held-out grounded data
    shards: str | None = None  # brace-named held-out shards (source=webdataset)
    synthetic_split: Literal["train", "held_out"] = "held_out"  # source=synthetic: which colour/shape combos
    synthetic_seed: int = 4321  # source=synthetic: world seed (differs from training's)
    synthetic_max_objects: int = 3  # source=synthetic: objects per image, min..max
    synthetic_min_objects: int = 2  # source=synthetic: fewest objects per image (compositions)
    num_samples: int = 64  # held-out samples evaluated
    resolution: int | None = None  # image side fed to the U-Net; null: the sampler's resolution
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500])  # noise levels of the one forward
    blocks: list[str] = field(default_factory=lambda: ["mid", "up"])  # layers whose maps are averaged
    resolutions: list[int] | None = None  # keep layers of these latent sides (null: all of `blocks`)
    threshold: float = 0.4  # on per-phrase min-max normalised maps (DAAM's tau)
    batch_size: int = 8


def noise_seed(seed: int, key: str, timestep: int) -> int:
    digest = hashlib.sha256(f"{seed}/{key}/{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def phrase_layer_maps(maps: dict[str, torch.Tensor], token_phrase: torch.Tensor, latent_hw: tuple[int, int]):
    """Per sample, {layer: (P_b, h, w)} phrase maps S_p = Σ_{i∈T_p} Ā[:, i] from captured (B, Lq, Lk) maps, and the
    sample's phrase slots (those some token points at)."""
    out = []
    for b in range(token_phrase.shape[0]):
        slots = sorted(int(p) for p in torch.unique(token_phrase[b]) if p >= 0)
        layers = {}
        for name, m in maps.items():
            h, w = layer_size(m.shape[1], latent_hw)
            per = [m[b][:, token_phrase[b] == p].sum(dim=1).reshape(h, w) for p in slots]
            layers[name] = torch.stack(per) if per else torch.zeros(0, h, w)
        out.append((slots, layers))
    return out


@torch.no_grad()
def text_conditioning(text, batch: dict, *, family: str, dtype: torch.dtype, device: torch.device | str):
    """The U-Net's text inputs of a batch (a `tcscale.models.conditioning.Conditioning`), encoded by `family`
    (tcscale.families). `text`: what holds the frozen text side — tcscale's `SDComponents` or a diffusers pipeline
    (SDXL's two towers included) — or, for a one-tower family, the text encoder itself."""
    from types import SimpleNamespace

    from tcscale.models.conditioning import batch_conditioning

    towers = text if hasattr(text, "text_encoder") else SimpleNamespace(text_encoder=text)
    return batch_conditioning(towers, batch, dtype=dtype, device=device, family=family)


def grounding_records(
    unet,
    vae,
    text,
    scheduler,
    plan: GroundingPlan,
    batches: Iterable[dict],
    *,
    timesteps: list[int],
    family: str,
    threshold: float = 0.4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    attention=None,
) -> list[dict]:
    """One record per (sample, phrase, timestep): {"key", "phrase", "timestep", "iou", "layers": {layer: iou}}.
    `unet` is the family's denoiser (an SD3 transformer included); `batches` are the loader's batches with
    full-resolution `phrase_masks` (full_masks=True); `text` the text side (`text_conditioning`: the components /
    pipeline, or a text encoder) encoded by `family` (tcscale.families: it noises, runs the denoiser and says which
    text keys a phrase owns); `attention`: the run's `attention` section where the family reads it (SD3's
    `joint_tokens`), default its defaults."""
    from tcscale.attention.config import AttentionConfig
    from tcscale.families import family_named

    fam = family_named(family)
    attention = attention if attention is not None else AttentionConfig()
    fam.observe(unet, plan)
    was_training = unet.training
    unet.eval()
    dtype = next(unet.parameters()).dtype
    records: list[dict] = []
    try:
        for batch in batches:
            pixels = batch["pixel_values"].to(device, vae.dtype)
            latents = fam.scale_latents(vae, vae.encode(pixels).latent_dist.mode())
            cond = text_conditioning(text, batch, family=family, dtype=dtype, device=device)
            token_phrase = fam.key_token_phrase(text, batch["input_ids"], batch["token_phrase"], attention).cpu()
            masks = batch["phrase_masks"]
            hw = tuple(latents.shape[-2:])
            for t in timesteps:
                noise = torch.stack(
                    [
                        torch.randn(
                            latents.shape[1:], generator=torch.Generator().manual_seed(noise_seed(seed, key, t))
                        )
                        for key in batch["keys"]
                    ]
                ).to(device)
                tt, noisy = fam.noise_at(scheduler, latents, noise, t)
                with MapCapture(hw) as capture:
                    fam.denoise(unet, noisy.to(dtype), tt, cond, capture.kwargs)
                maps = {k: v.float().cpu() for k, v in capture.maps.items()}
                for b, (slots, layers) in enumerate(phrase_layer_maps(maps, token_phrase, hw)):
                    if not slots:
                        continue
                    out = grounding_iou(layers, masks[b, slots], threshold=threshold)
                    for j, p in enumerate(slots):
                        records.append(
                            {
                                "key": batch["keys"][b],
                                "phrase": int(p),
                                "timestep": int(t),
                                "iou": float(out["iou"][j]),
                                "layers": {name: float(v[j]) for name, v in out["per_layer"].items()},
                            }
                        )
    finally:
        unet.train(was_training)
    return records


def summarize_grounding(records: list[dict], prefix: str = "grounding") -> dict[str, float]:
    """{prefix/miou, prefix/miou_t<T>, prefix/layer/<layer>, prefix/phrases} over the records."""
    if not records:
        raise ValueError("grounding: no phrase to score (held-out samples without aligned phrases?)")
    out = {f"{prefix}/miou": float(np.mean([r["iou"] for r in records])), f"{prefix}/phrases": float(len(records))}
    for t in sorted({r["timestep"] for r in records}):
        out[f"{prefix}/miou_t{t}"] = float(np.mean([r["iou"] for r in records if r["timestep"] == t]))
    for name in records[0]["layers"]:
        out[f"{prefix}/layer/{name}"] = float(np.mean([r["layers"][name] for r in records]))
    return out


def grounding_batches(
    source: str,
    tokenizer,
    *,
    resolution: int,
    num_samples: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    shards: str | None = None,
    synthetic_split: str = "held_out",
    synthetic_seed: int = 4321,
    max_objects: int = 3,
    min_objects: int = 1,
    phrase: str = "colour_shape",
) -> Iterator[dict]:
    """This rank's share (every world_size-th sample) of the first `num_samples` held-out samples, as loader
    batches with full-resolution masks. Deterministic: no shuffling, centre crop, no flip."""
    from tcscale.data.config import DataConfig
    from tcscale.data.samples import Counters, ProcessSettings, SampleProcessor, collate

    processor = SampleProcessor(tokenizer, ProcessSettings(resolution=resolution, full_masks=True))
    rng = np.random.default_rng(0)  # unused by a centre crop without flip; the processor's signature needs one
    counters = Counters()
    if source == "synthetic":
        from tcscale.data.samples import RawSample
        from tcscale.data.synthetic import SyntheticWorld

        world = SyntheticWorld(num_samples, max_objects, synthetic_seed, phrase, synthetic_split, min_objects)
        raw_samples = (
            RawSample(s.key, s.image, s.caption, s.phrases, s.masks, num_null=0)
            for s in (world.render(i, resolution) for i in range(rank, num_samples, world_size))
        )
    else:
        from tcscale.data.loader import ShardStream, resolve_shards

        urls = resolve_shards(DataConfig(source="webdataset", shards=shards))
        stream = ShardStream(
            urls, processor, rank=rank, world_size=world_size, batch=batch_size, seed=0, resampled=False,
            shuffle_buffer=0, passes=1,
        )  # fmt: skip
        per_rank = math.ceil(num_samples / world_size)
        left = per_rank
        for batch in stream:
            batch.pop("_counters", None)
            if left <= 0:
                return
            if len(batch["keys"]) > left:
                batch = {k: (v[:left] if not isinstance(v, dict) else v) for k, v in batch.items()}
            left -= len(batch["keys"])
            yield batch
        return
    for chunk in iter(lambda: list(itertools.islice(raw_samples, batch_size)), []):
        yield collate([processor(raw, rng, counters) for raw in chunk])
