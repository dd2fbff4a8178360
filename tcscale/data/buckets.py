"""Aspect-ratio buckets: which (h, w) an image is trained at, and micro-batches that each hold one bucket.

The bucket list (`bucket_sizes`) is `data.buckets.sizes` or generated (`generate_buckets`): for each short side, the
longest long side (multiples of `data.buckets.step`) within `area` (default data.resolution², the native area of
SD1.x/2.x at 512 / 768 px; SDXL at 1024 px gets the ~1 MP list 1024², 1088x960, 1152x896, 1216x832, 1344x768 and
their transposes) and aspect ratio `max_aspect`. An image goes to the bucket nearest its
aspect ratio (in log ratio, `nearest_bucket`); the loader crops the largest window of that ratio (centred, or at a
random offset) and resizes image and masks together to the bucket's size (tcscale/data/transforms.py), and the cache
stage encodes that same crop. The grounded layers' mask grids follow: a layer of side s at the square resolution R
sees (h·s/R, w·s/R) cells at bucket (h, w) (`layer_grids`).

Batching (every rank's micro-batch has `micro_batch_size` samples, all of one bucket, so shapes agree within
a batch and the engine sees equal batch sizes on every rank):
* synthetic source: the batch sequence is a pure function of (seed, epoch) — `BucketedEpochs`: an epoch's sample
  permutation, split stably by bucket, cut into full micro-batches (a bucket's remainder waits for the next epoch's
  permutation, i.e. is dropped from this one), the batches shuffled. Micro-step n of rank r takes batch number
  first_slot(n, r, world, B, anchor) // B, so a resume (also on another world size with the same micro-batch) replays
  exactly;
* shards: each reader keeps one pending list per bucket and emits a bucket's micro-batch when it is full (a resumed
  run draws a fresh stream, as the unbucketed shard loader does).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from tcscale.data.config import DataConfig, DataConfigError


def generate_buckets(area: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """For each short side s (a multiple of `step`), the long side l: the largest multiple of `step` with
    s * l <= area, kept when l / s <= max_aspect; both orientations, sorted by h / w."""
    out = set()
    short = step
    while short * short <= area:
        long = (area // short) // step * step
        if long >= short and long / short <= max_aspect:
            out |= {(short, long), (long, short)}
        short += step
    return sorted(out, key=lambda hw: hw[0] / hw[1])


def bucket_sizes(data: DataConfig) -> list[tuple[int, int]]:
    """The run's buckets (see the module docstring); DataConfigError naming the key when there are none."""
    b = data.buckets
    if b.sizes:
        sizes = [tuple(int(v) for v in hw) for hw in b.sizes]
        bad = [hw for hw in sizes if len(hw) != 2 or min(hw) <= 0 or hw[0] % b.step or hw[1] % b.step]
        if bad:
            raise DataConfigError(f"data.buckets.sizes: {list(bad[0])} is not [h, w] with sides multiples of "
                                  f"data.buckets.step={b.step}")  # fmt: skip
        return sorted(set(sizes), key=lambda hw: hw[0] / hw[1])
    sizes = generate_buckets(b.area or data.resolution**2, b.step, b.max_aspect)
    if not sizes:
        raise DataConfigError(
            f"data.buckets: no bucket with sides multiples of step={b.step} fits area "
            f"{b.area or data.resolution**2} within max_aspect={b.max_aspect}"
        )
    return sizes


def nearest_bucket(height: int, width: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (log ratio; ties: the first in `sizes`)."""
    r = math.log(height / width)
    return min(sizes, key=lambda hw: abs(math.log(hw[0] / hw[1]) - r))


def layer_grids(
    layer_sizes: tuple[tuple[int, int], ...], resolution: int, target: tuple[int, int]
) -> dict[tuple[int, int], tuple[int, int]]:
    """{square-resolution layer grid: its grid at `target` (h, w) pixels}; DataConfigError when a bucket side is not
    a whole number of a layer's cells."""
    out = {}
    for gh, gw in layer_sizes:
        ph, pw = resolution / gh, resolution / gw  # pixels per cell of the layer
        h, w = target[0] / ph, target[1] / pw
        if h != int(h) or w != int(w):
            raise DataConfigError(
                f"data.buckets: bucket {target[0]}x{target[1]} is not a whole number of {ph:g}-pixel cells of a "
                f"{gh}x{gw} grounded layer; use sides that are multiples of {math.lcm(int(ph), int(pw))} "
                "(data.buckets.step)"
            )
        out[(gh, gw)] = (int(h), int(w))
    return out


class BucketedEpochs:
    """The synthetic source's bucketed batch sequence: batch j -> the world indices of its samples (see the module
    docstring). `bucket_of[i]` is sample i's bucket number."""

    def __init__(self, bucket_of: list[int], batch: int, seed: int, perm):
        self.bucket_of = np.asarray(bucket_of)
        self.batch = batch
        self.seed = seed
        self.perm = perm  # epoch -> permutation of the world's indices (the loader's seeded one)
        counts = np.bincount(self.bucket_of)
        self.per_epoch = int(sum(c // batch for c in counts))
        if self.per_epoch == 0:
            raise DataConfigError(
                f"data.buckets: no bucket holds a full micro-batch of {batch} samples of the synthetic world "
                f"(samples per bucket: {counts.tolist()})"
            )

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, one instance per loader
    def epoch_batches(self, epoch: int) -> tuple[tuple[int, ...], ...]:
        from tcscale.data.loader import _TAG_SYNTH_PERM, derive_seed

        batches = []
        order = self.perm(epoch)
        for b in np.unique(self.bucket_of):
            members = [int(i) for i in order if self.bucket_of[i] == b]
            batches += [tuple(members[k : k + self.batch]) for k in range(0, len(members) - self.batch + 1, self.batch)]
        rng = np.random.default_rng(derive_seed(self.seed, _TAG_SYNTH_PERM, epoch, 1))
        return tuple(batches[k] for k in rng.permutation(len(batches)))

    def batch_indices(self, number: int) -> tuple[int, ...]:
        epoch, pos = divmod(number, self.per_epoch)
        return self.epoch_batches(epoch)[pos]
