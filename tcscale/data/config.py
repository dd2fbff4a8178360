"""Data section of the run config (owned by the grounded-data loader)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SyntheticDataConfig:
    num_samples: int = 64  # distinct samples in the synthetic shapes world (the stream cycles over them)
    max_objects: int = 3  # objects per image, 1..max_objects
    seed: int = 1234  # world seed: same seed, same images, captions and masks


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" (shapes world with exact masks, generated in memory) | "webdataset"
    shards: str | None = None  # brace-named shard URL(s) for source=webdataset, e.g. data/grounded-{000000..000127}.tar
    resolution: int = 64  # training image side in pixels (512 for SD1.4, 768 for SD2.1)
    center_crop: bool = True  # resize shorter side then center crop (paper); False: random crop
    random_flip: bool = False  # horizontal flip of image and masks together
    max_phrases: int = 16  # phrases kept per sample (extra ones are dropped and counted)
    shuffle_buffer: int = 256  # samples in the shuffle buffer of the streaming loader
    num_workers: int = 0  # DataLoader worker processes per rank
    steps_per_epoch: int = 1000  # fixed number of batches per epoch on every rank
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
