"""Data section of the run config (owned by the grounded-data loader)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

PhraseMode = Literal["colour_shape", "shape"]  # synthetic world: grounded phrase "red circle" | "circle"
PHRASE_MODES: tuple[str, ...] = get_args(PhraseMode)
LatentSource = Literal["images", "cached"]  # encode the batch images with the VAE each step | read cached latents
LATENT_SOURCES: tuple[str, ...] = get_args(LatentSource)
ComboSplit = Literal["train", "held_out"]  # synthetic world: training combinations only | one held-out per image
COMBO_SPLITS: tuple[str, ...] = get_args(ComboSplit)


class DataConfigError(ValueError):
    """The data section is unusable; the message names the key (e.g. `data.shards`)."""


@dataclass
class SyntheticDataConfig:
    num_samples: int = 64  # distinct samples in the synthetic shapes world (the stream cycles over them)
    max_objects: int = 3  # objects per image, 1..max_objects (at most 6, shapes are distinct per image)
    min_objects: int = 1  # fewest objects per image (evaluation worlds use 2: compositions)
    seed: int = 1234  # world seed: same seed, same images, captions and masks
    phrase: PhraseMode = "colour_shape"  # grounded phrase per object: "red circle" | "circle"
    combos: ComboSplit = "train"  # "held_out": every image shows one held-out colour/shape combination (eval)
    # image [h, w] of sample i is sizes[i % len(sizes)] (mixed aspect ratios, for buckets); empty: data.resolution²
    sizes: list[list[int]] = field(default_factory=list)


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (tcscale/data/buckets.py): each image is cropped to the bucket nearest its aspect ratio
    and resized to the bucket's size; each micro-batch holds one bucket."""

    enabled: bool = False  # false: every image centre- (or randomly) cropped to data.resolution squared
    sizes: list[list[int]] = field(default_factory=list)  # explicit [h, w] buckets in pixels; empty: generated
    area: int = 0  # generated buckets' target area in pixels² (0: data.resolution²; SDXL at 1024: ~1 MP)
    step: int = 64  # bucket sides are multiples of this (a multiple of the VAE factor x the U-Net's downsampling)
    max_aspect: float = 2.0  # generated buckets: longest / shortest side at most this


@dataclass
class DataConfig:
    source: Literal["synthetic", "webdataset"] = "synthetic"  # shapes world (exact masks, in memory) | shards
    # brace-named shard URL(s), e.g. data/grounded-{000000..000127}.tar; a "pipe:CMD" URL runs CMD in a shell
    # (webdataset's convention): a config from elsewhere is as trusted as a script
    shards: str | None = None
    resolution: int = 64  # training image side in pixels (512 for SD1.4, 768 for SD2.1)
    center_crop: bool = True  # resize shorter side then center crop (paper); False: random crop
    random_flip: bool = False  # horizontal flip of image and masks together
    # images: the VAE encodes each batch | cached: read the latents the cache stage wrote into the shards
    # (python -m dataprep.stages.latents; tcscale/data/latent_cache.py): the trainer keeps no VAE
    latents: LatentSource = "images"
    max_phrases: int = 16  # phrases kept per sample (extra ones are dropped and counted)
    min_phrases: int = 0  # samples with fewer aligned phrases are skipped and counted (0: keep all; LDM loss only)
    # fraction of training captions replaced by the empty caption, so the model learns the unconditional branch that
    # classifier-free guidance (sampling at guidance_scale > 1) subtracts; in [0, 1), drawn per sample from the step's
    # seed (resumes replay it). TokenCompose grounds only the kept captions (a dropped one has no phrases: L_LDM
    # alone); SepEn reads no captions and refuses it
    caption_dropout: float = 0.0
    shuffle_buffer: int = 256  # samples in the shuffle buffer of the streaming loader (per worker)
    resampled: bool = True  # webdataset: draw shards with replacement per worker (False: each pass splits the
    # shards exactly over ranks x workers, so no sample is lost or duplicated within a pass)
    num_workers: int = 0  # DataLoader worker processes per rank
    prefetch_factor: int = 2  # batches prefetched per worker (num_workers > 0)
    steps_per_epoch: int = 1000  # fixed number of batches per epoch on every rank
    buckets: BucketConfig = field(default_factory=BucketConfig)  # aspect-ratio buckets (off by default)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


def check_cacheable(data: DataConfig) -> None:
    """`data.latents: cached` needs what the cache can hold: shards and the centre crop. Raises DataConfigError."""
    if data.latents != "cached":
        return
    if data.source != "webdataset":
        raise DataConfigError(
            "data.latents=cached needs data.source=webdataset (shards written by the latent cache stage, "
            "python -m dataprep.stages.latents); the synthetic world is rendered on the fly"
        )
    if not data.center_crop:
        raise DataConfigError(
            "data.latents=cached needs data.center_crop=true: a random crop has one latent per offset and cannot be "
            "cached"
        )
