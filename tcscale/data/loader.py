"""The training loader: synthetic world or streamed WebDataset shards -> collated grounded batches.

`build_train_loader(...)` returns a `TrainLoader`: an infinite iterable of batches (a fixed
`data.steps_per_epoch` batches make one epoch on every rank, so ranks always take the same number
of steps), with `state_dict()` for the checkpoint's client state and `counters()` for tracking.

Determinism and resume
* synthetic: the batch at micro-step n on a rank is a pure function of (cfg, seed, rank,
  world_size, n, anchor): global sample slot g = first_slot(n, rank, world_size, B, anchor) + b picks
  sample perm_{seed, g // N}[g % N] of the N-sample world and its augmentation is seeded by (seed, g).
  `start_step = n` therefore resumes the exact stream, with any number of workers. The anchor
  (micro-step, slot), (0, 0) unless a resumed run changed its world size or micro-batch, makes the slots
  of micro-step `anchor[0]` start at slot `anchor[1]`: a resized world continues the one slot sequence
  where the old world stopped (no sample of the sequence skipped or repeated).
* webdataset: every worker seeds its shard order / shuffle buffer / augmentation from
  (seed, rank, worker, start_step) (and the pass index), so a resumed run draws a fresh,
  reproducible stream. With `data.resampled=False` a pass splits the shards (same order on every
  rank) exactly over ranks x workers — or, when there are fewer shards than ranks x workers, the
  samples, by position — so no sample is lost or duplicated within a pass.

Batches (B = micro_batch_size, P = max phrases in the batch, at least 1):
  pixel_values (B, 3, R, R) float32 in [-1, 1]     input_ids (B, 77) int64
  token_phrase (B, 77) int64, phrase slot or -1     layer_masks {(h, w): (B, P, h*w) float32 in {0, 1}}
  captions list[str], keys list[str]
  phrase_masks (B, P, R, R) float32 in {0, 1}: only when asked for (`full_masks`), or when no layer grid is given —
  a run with a grounding plan gets every grounded layer's masks ready and no full-resolution ones.
  target_sizes (B, 2) int64: each sample's (h, w) in pixels; original_sizes, crop_top_lefts (B, 2): SDXL's time ids.
  data.latents=cached: latent_mean, latent_logvar (B, C, R/f, R/f) float32 replace pixel_values
  (tcscale/data/latent_cache.py).
  data.buckets: R x R becomes the micro-batch's bucket (h, w), and each layer grid (s, s) becomes (h s / R, w s / R);
  every micro-batch holds one bucket (tcscale/data/buckets.py: how the synthetic sequence stays a pure function of
  the micro-step).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from tcscale.attention.masks import MaskRule
from tcscale.data.buckets import BucketedEpochs, bucket_sizes, layer_grids, nearest_bucket
from tcscale.data.config import DataConfig, DataConfigError
from tcscale.data.latent_cache import CacheKey, check_cacheable
from tcscale.data.samples import (
    Counters,
    ProcessSettings,
    RawSample,
    SampleProcessor,
    SkipSample,
    collate,
    decode_shard_sample,
)
from tcscale.data.synthetic import SyntheticWorld

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tcscale.attention.plan import GroundingPlan

log = logging.getLogger("tcscale.data")
_RENDER_CACHE_BYTES = 256 << 20  # synthetic samples are cached once rendered while the world fits in this


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (order matters), via numpy's SeedSequence hashing."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1
    )


# tags keep the derived streams apart
_TAG_SHARD_ORDER, _TAG_SHARD_PICK, _TAG_SHUFFLE, _TAG_AUG, _TAG_SYNTH_PERM, _TAG_SYNTH_AUG = range(101, 107)


def first_slot(step: int, rank: int, world_size: int, batch: int, anchor: tuple[int, int] = (0, 0)) -> int:
    """The global sample slot of the first sample of micro-step `step` on `rank`. Ranks interleave micro-batches,
    counted from `anchor` = (micro-step, slot): anchor_slot + ((step - anchor_step) * world_size + rank) * batch."""
    anchor_step, anchor_slot = anchor
    return anchor_slot + ((step - anchor_step) * world_size + rank) * batch


def resolve_shards(cfg: DataConfig) -> list[str]:
    """Expand `data.shards` (braces, '::' lists) and check that local shards exist."""
    if not cfg.shards:
        raise DataConfigError("data.shards is not set: source=webdataset needs a brace-named shard pattern")
    urls = list(wds.shardlists.expand_urls(cfg.shards))
    if not urls:
        raise DataConfigError(f"data.shards={cfg.shards!r} expands to no shard")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")] + [
        u[len("file://") :] for u in urls if u.startswith("file://")
    ]
    missing = [u for u in local if not os.path.isfile(u)]
    if local and len(missing) == len(local):
        raise DataConfigError(f"data.shards={cfg.shards!r} matches no file (first expanded name: {missing[0]})")
    if missing:
        raise DataConfigError(
            f"data.shards={cfg.shards!r}: {len(missing)} of {len(local)} shards are missing (first: {missing[0]})"
        )
    return urls


def _settings(cfg: DataConfig, layer_sizes, mask_rule: MaskRule | None, full_masks: bool | None) -> ProcessSettings:
    sizes = tuple((int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1])) for s in layer_sizes)
    buckets = tuple(bucket_sizes(cfg)) if cfg.buckets.enabled else ()
    for bucket in buckets:  # every grounded layer's grid is whole at every bucket (else: the key to change)
        layer_grids(sizes, cfg.resolution, bucket)
    return ProcessSettings(
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        max_phrases=cfg.max_phrases,
        min_phrases=cfg.min_phrases,
        layer_sizes=sizes,
        mask_rule=mask_rule or MaskRule(),
        full_masks=full_masks,
        latents=cfg.latents,
        buckets=buckets,
    )


class SyntheticSteps(Dataset):
    """Map-style: item n = the collated batch of micro-step n on this rank (pure function of its inputs)."""

    def __init__(
        self,
        cfg: DataConfig,
        processor: SampleProcessor,
        *,
        rank: int,
        world_size: int,
        batch: int,
        seed: int,
        collate_fn: Callable[[list[dict]], dict] = collate,
        anchor: tuple[int, int] = (0, 0),
    ):
        s = cfg.synthetic
        self.anchor = (int(anchor[0]), int(anchor[1]))
        self.collate_fn = collate_fn
        self.world = SyntheticWorld(s.num_samples, s.max_objects, s.seed, s.phrase, s.combos, s.min_objects)
        self.processor = processor
        self.resolution = cfg.resolution
        self.rank, self.world_size, self.batch, self.seed = rank, world_size, batch, seed
        self.sizes = [(int(hw[0]), int(hw[1])) for hw in s.sizes] or [(cfg.resolution, cfg.resolution)]
        per_sample = max(h * w for h, w in self.sizes) * (3 + s.max_objects)
        self._cache: dict[int, RawSample] | None = {} if per_sample * s.num_samples <= _RENDER_CACHE_BYTES else None
        self._perms: dict[int, np.ndarray] = {}
        self.epochs = None  # aspect-ratio buckets: the bucketed batch sequence (tcscale.data.buckets)
        buckets = getattr(processor, "settings", None) and processor.settings.buckets
        if buckets:
            bucket_of = [buckets.index(nearest_bucket(*self._size(i), list(buckets))) for i in range(len(self.world))]
            self.epochs = BucketedEpochs(bucket_of, batch, seed, self._perm)

    def __len__(self) -> int:  # effectively infinite
        return 2**62

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 4:
                self._perms.clear()
            perm = np.random.default_rng(derive_seed(self.seed, _TAG_SYNTH_PERM, epoch)).permutation(len(self.world))
            self._perms[epoch] = perm
        return perm

    def _size(self, index: int) -> tuple[int, int]:
        """(h, w) sample `index` is rendered at (data.synthetic.sizes, cycled; default data.resolution²)."""
        return self.sizes[index % len(self.sizes)]

    def _raw(self, index: int) -> RawSample:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        s = self.world.render(index, self._size(index))
        raw = RawSample(s.key, s.image, s.caption, s.phrases, s.masks, num_null=0)
        if self._cache is not None:
            self._cache[index] = raw
        return raw

    def global_slots(self, step: int) -> list[int]:
        first = first_slot(step, self.rank, self.world_size, self.batch, self.anchor)
        return list(range(first, first + self.batch))

    def __getitem__(self, step: int) -> dict:
        counters = Counters()
        samples = []
        n = len(self.world)
        slots = self.global_slots(step)
        if self.epochs is not None:  # one bucket per micro-batch: batch number slots[0] // B of the bucketed sequence
            indices = self.epochs.batch_indices(slots[0] // self.batch)
        else:
            indices = [int(self._perm(g // n)[g % n]) for g in slots]
        for g, index in zip(slots, indices):
            raw = self._raw(index)
            rng = np.random.default_rng(derive_seed(self.seed, _TAG_SYNTH_AUG, g))
            samples.append(self.processor(raw, rng, counters))
        batch = self.collate_fn(samples)
        batch["_counters"] = counters.take()
        return batch


class ShardStream(IterableDataset):
    """Iterable over collated batches read from WebDataset shards by one rank (split over its workers).

    `passes=None` streams forever (the training case); a finite `passes` ends after that many passes
    over the shards and emits the last partial batch (tests, evaluation).
    """

    def __init__(
        self,
        urls: list[str],
        processor: SampleProcessor,
        *,
        rank: int,
        world_size: int,
        batch: int,
        seed: int,
        start_step: int = 0,
        resampled: bool = True,
        shuffle_buffer: int = 256,
        passes: int | None = None,
        collate_fn: Callable[[list[dict]], dict] = collate,
    ):
        self.collate_fn = collate_fn
        self.urls = list(urls)
        self.processor = processor
        self.rank, self.world_size, self.batch, self.seed = rank, world_size, batch, seed
        self.start_step = start_step
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.passes = passes

    def _raw_samples(self, worker: int, num_workers: int, counters: Counters) -> Iterator[dict]:
        """Undecoded tar groups assigned to (rank, worker)."""

        def handler(exn: Exception) -> bool:
            counters["skipped/tar_read"] += 1
            _warn(f"data.shards: tar read error, rest of the shard skipped: {exn!r}")
            return True

        slot, nslots = self.rank * num_workers + worker, self.world_size * num_workers
        if self.resampled:
            rng = random.Random(derive_seed(self.seed, _TAG_SHARD_PICK, self.rank, worker, self.start_step))
            empty_in_a_row = 0
            for i in itertools.count():
                if self.passes is not None and i >= self.passes * len(self.urls):
                    return
                url = rng.choice(self.urls)
                got = 0
                for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=handler):
                    got += 1
                    yield sample
                empty_in_a_row = 0 if got else empty_in_a_row + 1
                if empty_in_a_row > 3 * len(self.urls) + 10:
                    raise RuntimeError(f"data.shards: {empty_in_a_row} shards in a row gave no sample (last: {url})")
            return
        for pass_idx in itertools.count():
            if self.passes is not None and pass_idx >= self.passes:
                return
            order = list(self.urls)
            random.Random(derive_seed(self.seed, _TAG_SHARD_ORDER, self.start_step, pass_idx)).shuffle(order)
            got = 0
            if len(order) >= nslots:
                for sample in wds.tariterators.tarfile_samples(
                    [{"url": u} for u in order[slot::nslots]], handler=handler
                ):
                    got += 1
                    yield sample
            else:  # fewer shards than readers: every reader reads all shards and keeps every nslots-th sample
                for j, sample in enumerate(
                    wds.tariterators.tarfile_samples([{"url": u} for u in order], handler=handler)
                ):
                    if j % nslots == slot:
                        got += 1
                        yield sample
            if got == 0:
                raise RuntimeError(
                    f"data.shards: rank {self.rank} worker {worker} got no sample in pass {pass_idx} "
                    f"({len(self.urls)} shards for {nslots} readers)"
                )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counters = Counters()
        raw = self._raw_samples(worker, num_workers, counters)
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, _TAG_SHUFFLE, self.rank, worker, self.start_step))
            raw = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(raw)
        aug = np.random.default_rng(derive_seed(self.seed, _TAG_AUG, self.rank, worker, self.start_step))
        pending: dict[tuple[int, int] | None, list[dict]] = {}  # one list per aspect-ratio bucket (None: no buckets)
        for sample in raw:
            try:
                decoded = decode_shard_sample(sample)
                item = self.processor(decoded, aug, counters)
            except SkipSample as skip:
                counters[f"skipped/{skip.reason}"] += 1
                _warn(f"data: sample skipped ({sample.get('__url__', '?')}): {skip}")
                continue
            group = pending.setdefault(item.get("bucket"), [])
            group.append(item)
            if len(group) == self.batch:
                batch = self.collate_fn(group)
                batch["_counters"] = counters.take()
                group.clear()
                yield batch
        for group in pending.values():
            if group:
                batch = self.collate_fn(group)
                batch["_counters"] = counters.take()
                yield batch


_warned = itertools.count(1)


def _warn(message: str) -> None:
    """Log the first 20 data problems of a process, then every 1000th (the counters keep the totals)."""
    n = next(_warned)
    if n <= 20 or n % 1000 == 0:
        log.warning("%s%s", message, " (further data warnings are sampled)" if n == 20 else "")


class _StepsFrom(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def _identity(x):
    return x


class TrainLoader:
    """Infinite iterable of collated batches for one rank; `len()` is data.steps_per_epoch.

    Iterating again continues where the previous iterator stopped (one underlying stream).
    `step` counts the micro-batches consumed; `epoch` = step // steps_per_epoch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        seed: int,
        start_step: int = 0,
        layer_sizes=(),
        mask_rule: MaskRule | None = None,
        full_masks: bool | None = None,
        processor: Callable[[RawSample, np.random.Generator, Counters], dict] | None = None,
        collate_fn: Callable[[list[dict]], dict] | None = None,
        anchor: tuple[int, int] = (0, 0),
    ):
        if cfg.source not in ("synthetic", "webdataset"):
            raise DataConfigError(f"data.source={cfg.source!r} is not one of ['synthetic', 'webdataset']")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        if cfg.steps_per_epoch <= 0:
            raise DataConfigError(f"data.steps_per_epoch must be > 0, got {cfg.steps_per_epoch}")
        if cfg.max_phrases <= 0:
            raise DataConfigError(f"data.max_phrases must be > 0, got {cfg.max_phrases}")
        check_cacheable(cfg)
        self.cfg = cfg
        self.rank, self.world_size, self.micro_batch_size, self.seed = rank, world_size, micro_batch_size, seed
        self.start_step = start_step
        self.step = start_step
        self.anchor = (int(anchor[0]), int(anchor[1]))  # synthetic slot sequence anchor (see the module docstring)
        self.settings = _settings(cfg, layer_sizes, mask_rule, full_masks)
        if cfg.source == "synthetic" and cfg.min_phrases > 0:
            # every synthetic image has >= 1 grounded object; skipping would break the pure step -> batch map
            warnings.warn("data.min_phrases applies to source=webdataset only; ignored for synthetic", stacklevel=2)
            self.settings.min_phrases = 0
        # another sample -> training-item processor and its collate function (e.g. object crops,
        # tcscale.data.crops); seeding, stepping and resume are the same
        self.processor = processor if processor is not None else SampleProcessor(tokenizer, self.settings)
        self.collate_fn = collate_fn if collate_fn is not None else collate
        self.urls = resolve_shards(cfg) if cfg.source == "webdataset" else []
        self._counters = Counters()
        self._stream: Iterator[dict] | None = None
        self._stream_start = start_step
        if cfg.source == "synthetic":
            self.steps = SyntheticSteps(
                cfg, self.processor, rank=rank, world_size=world_size, batch=micro_batch_size, seed=seed,
                collate_fn=self.collate_fn, anchor=self.anchor,
            )  # fmt: skip

    def expect_latent_cache(self, key: CacheKey) -> None:
        """data.latents=cached: every sample's cached latents must carry `key` (the run's VAE, resolution and crop
        policy), else the stream stops with a `LatentCacheMismatch` naming both. Call before iterating."""
        self.settings.latent_key = key

    # -- iteration -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.cfg.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.step // self.cfg.steps_per_epoch

    def _make_stream(self, start: int) -> Iterator[dict]:
        cfg = self.cfg
        workers = cfg.num_workers
        extra = {"prefetch_factor": cfg.prefetch_factor} if workers > 0 else {}
        extra["pin_memory"] = torch.cuda.is_available()
        if cfg.source == "synthetic":
            if workers == 0:
                return (self.steps[n] for n in itertools.count(start))
            dl = DataLoader(
                self.steps,
                batch_size=None,
                sampler=_StepsFrom(start),
                num_workers=workers,
                collate_fn=_identity,
                **extra,
            )
            return iter(dl)
        ds = ShardStream(
            self.urls,
            self.processor,
            rank=self.rank,
            world_size=self.world_size,
            batch=self.micro_batch_size,
            seed=self.seed,
            start_step=start,
            resampled=cfg.resampled,
            shuffle_buffer=cfg.shuffle_buffer,
            collate_fn=self.collate_fn,
        )
        return iter(DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_identity, **extra))

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> dict:
        if self._stream is None:
            self._stream_start = self.step
            self._stream = self._make_stream(self.step)
        batch = next(self._stream)
        self._counters.update(batch.pop("_counters", {}))
        self.step += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later iteration starts a fresh stream at the current step)."""
        stream, self._stream = self._stream, None
        if stream is not None and hasattr(stream, "_shutdown_workers"):
            stream._shutdown_workers()

    # -- checkpoint + tracking ---------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Samples seen, samples skipped by reason (`skipped/<reason>`), phrases kept / dropped by reason."""
        out = dict.fromkeys(getattr(self.processor, "counter_names", ("samples_seen", "phrases_kept")), 0)
        out.update(self._counters)
        return dict(sorted(out.items()))

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "source": self.cfg.source,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "micro_batch_size": self.micro_batch_size,
            "num_workers": self.cfg.num_workers,
            "steps_per_epoch": self.cfg.steps_per_epoch,
            "resampled": self.cfg.resampled,
            "step": self.step,
            "epoch": self.epoch,
            "stream_start_step": self._stream_start,
            "anchor": list(self.anchor),
            "counters": dict(self._counters),
            "data_config": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpointed state: same micro-step, counters carried on."""
        for key in ("seed", "world_size", "micro_batch_size"):
            if state.get(key) != getattr(self, key):
                warnings.warn(
                    f"data loader state: {key} was {state.get(key)} in the checkpoint, now {getattr(self, key)}; "
                    "the data stream will differ from the uninterrupted run",
                    stacklevel=2,
                )
        self.step = int(state["step"])
        self._counters = Counters(state.get("counters", {}))
        self._stream = None


def build_train_loader(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    seed: int,
    start_step: int = 0,
    plan: GroundingPlan | None = None,
    layer_sizes: list[tuple[int, int]] = (),
    mask_rule: MaskRule | None = None,
    full_masks: bool | None = None,
    anchor: tuple[int, int] = (0, 0),
) -> TrainLoader:
    """The trainer's dataset entry point (see the module docstring).

    `start_step` = micro-batches this rank already consumed. Masks: `plan` (the run's `GroundingPlan`) gives the
    layer grids and the mask rule; without one, `layer_sizes` / `mask_rule` give them directly (benchmarks,
    tests). `full_masks` keeps the full-resolution masks in the batch too (default: only without layer grids).
    `anchor`: where the synthetic slot sequence of this world starts (micro-step, slot); see the module docstring.
    """
    if plan is not None:
        layer_sizes, mask_rule = plan.layer_sizes, plan.mask_rule
    return TrainLoader(
        cfg,
        tokenizer,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        seed=seed,
        start_step=start_step,
        layer_sizes=layer_sizes,
        mask_rule=mask_rule,
        full_masks=full_masks,
        anchor=anchor,
    )
