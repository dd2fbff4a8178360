"""Cached VAE latents in the shards: what a cache holds, whose it is, and how a sample's latent is read back.

The latent cache stage (`dataprep/stages/latents.py`) encodes each sample's image with the run's VAE, through the same
crop-and-resize the loader applies (`tcscale.data.transforms`), and adds one member to the sample's tar group:

    KEY.latents.npz   mean   (V, C, h, w) float32   the VAE posterior's mean, unscaled (no scaling_factor)
                      logvar (V, C, h, w) float32   its log-variance (clamped to [-30, 20] as diffusers does)
                      flip   (V,) bool              variant v is the horizontally flipped image's (False / True)
                      key    () str                 the cache key (JSON, `CacheKey`) the latents were written under

Variants: the loader draws one of at most two geometric transforms per sample when `data.center_crop` is true:
the centre crop, and (`data.random_flip`) its mirror image; with aspect-ratio buckets (`data.buckets`), the centred
window of the image's bucket, resized to the bucket's size (the latents then have the bucket's shape / 8). The
flipped image's latent is not the mirror of the latent (the VAE is not equivariant to flips), so both are encoded.
A random crop (`data.center_crop=false`) has one variant per offset and cannot be cached (the config check refuses
it).

Training still samples: the loader hands the mean and log-variance on, and the objective draws
``latent = (mean + exp(logvar / 2) * eps) * scaling_factor`` with eps from the micro-step's generator, through
diffusers' own `DiagonalGaussianDistribution`, exactly as `vae.encode(x).latent_dist.sample(generator)` does.

Identity (`CacheKey`): a hash of the VAE (its config and every weight, `vae_identity`), the training resolution and
the crop policy. A run with `data.latents: cached` computes its own key and refuses a cache written under another
one with one line naming both (`LatentCacheMismatch`, a `DataConfigError`: exit 2 through the launcher).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from tcscale.data.config import DataConfig, DataConfigError, check_cacheable  # noqa: F401 - re-exported

LATENTS_PART = "latents.npz"  # the tar member suffix of a sample's cached latents
CACHE_FORMAT = 1


class LatentCacheMismatch(DataConfigError):
    """A shard's cached latents were written under another cache key than the run's (another VAE, resolution or
    crop policy)."""


def vae_identity(vae: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of a VAE's config (public keys, JSON) and every tensor of its state dict (name,
    dtype, shape, bytes), in name order: equal for the same weights however they were loaded."""
    h = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    """Whose latents a cache holds: the VAE, the training image side and how images were cropped."""

    vae: str  # vae_identity(...)
    resolution: int  # data.resolution (pixels)
    crop: str = "center"  # the only cacheable crop policy
    buckets: str = "none"  # aspect-ratio buckets the crops were shaped by ("none": square resolution x resolution)

    def describe(self) -> str:
        extra = "" if self.buckets == "none" else f", buckets {self.buckets}"
        return f"VAE {self.vae} at {self.resolution} px, {self.crop} crop{extra}"

    def to_json(self) -> str:
        return json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CacheKey:
        d = json.loads(text)
        d.pop("format", None)
        return cls(**d)


def cache_key(data: DataConfig, vae: torch.nn.Module) -> CacheKey:
    """The key a run's data section and VAE give (the stage writes it, the loader checks it)."""
    return CacheKey(vae=vae_identity(vae), resolution=int(data.resolution), crop="center", buckets=buckets_id(data))


def buckets_id(data: DataConfig) -> str:
    """The bucket list as the cache key records it ("none" when buckets are off)."""
    if not data.buckets.enabled:
        return "none"
    from tcscale.data.buckets import bucket_sizes

    return ",".join(f"{h}x{w}" for h, w in bucket_sizes(data))


# -- one sample's member ----------------------------------------------------------------------------------------
def encode_member(key: CacheKey, mean: np.ndarray, logvar: np.ndarray, flips: list[bool]) -> bytes:
    """The `latents.npz` bytes of one sample (V variants)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        mean=np.ascontiguousarray(mean, dtype=np.float32),
        logvar=np.ascontiguousarray(logvar, dtype=np.float32),
        flip=np.asarray(flips, dtype=bool),
        key=np.asarray(key.to_json()),
    )
    return buf.getvalue()


@dataclass
class CachedLatents:
    key: CacheKey
    mean: np.ndarray  # (V, C, h, w) float32
    logvar: np.ndarray
    flip: np.ndarray  # (V,) bool

    def variant(self, flip: bool, sample_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each (C, h, w) float32, of the flipped or unflipped crop."""
        hits = np.flatnonzero(self.flip == bool(flip))
        if hits.size == 0:
            raise DataConfigError(
                f"sample {sample_key}: its cached latents hold no {'flipped' if flip else 'unflipped'} variant "
                "(data.random_flip=true needs a cache written with it)"
            )
        v = int(hits[0])
        return torch.from_numpy(self.mean[v].copy()), torch.from_numpy(self.logvar[v].copy())


def decode_member(data: bytes) -> CachedLatents:
    """`latents.npz` bytes -> CachedLatents (no pickle: every array is numeric or a unicode string)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return CachedLatents(
            CacheKey.from_json(str(npz["key"])), np.asarray(npz["mean"]), np.asarray(npz["logvar"]), npz["flip"]
        )


def check_key(found: CacheKey, expected: CacheKey | None, where: str) -> None:
    """Raise LatentCacheMismatch (one line naming both) when a cache was written under another key."""
    if expected is not None and found != expected:
        raise LatentCacheMismatch(
            f"data.latents=cached: {where} holds latents of {found.describe()}; this run needs "
            f"{expected.describe()} (rerun python -m dataprep.stages.latents with this run's config)"
        )


def check_shards(data: DataConfig, expected: CacheKey) -> None:
    """Read the first sample of the first shard and check its cache key (the run's early, one-line refusal)."""
    import webdataset as wds

    from tcscale.data.loader import resolve_shards

    url = resolve_shards(data)[0]
    for sample in wds.tariterators.tarfile_samples([{"url": url}]):
        if LATENTS_PART not in sample:
            raise DataConfigError(
                f"data.latents=cached: {url} sample {sample.get('__key__', '?')} has no {LATENTS_PART} (shards "
                "written by python -m dataprep.stages.latents hold one per sample)"
            )
        check_key(decode_member(sample[LATENTS_PART]).key, expected, url)
        return
    raise DataConfigError(f"data.latents=cached: {url} holds no sample")


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw of the VAE posterior N(mean, exp(logvar)), through diffusers' `DiagonalGaussianDistribution` (the
    same draw `vae.encode(x).latent_dist.sample(generator)` makes from the same parameters and generator). A point
    mass (log-variance -inf everywhere: tcscale.models.space_to_depth's exact latent) is its mean, with no draw."""
    if logvar.device.type != "meta" and torch.isneginf(logvar).all():  # (the memory planner runs on "meta")
        return mean
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).sample(generator)
