"""Latent cache stage: copy grounded shards, adding each sample's VAE latent distribution.

    python -m dataprep.stages.latents --config configs/sd14_tokencompose.yaml --out data/cached \\
        data.shards='data/tc/grounded-{000000..000009}.tar' [--shards 0-4] [key=value ...]
    # then train with data.shards='data/cached/grounded-{000000..000009}.tar' data.latents=cached

The training config names everything the cache depends on, so the stage reads the run's own: `model` (the VAE, loaded
through the family as the trainer loads it), `data.resolution`, `data.center_crop` (must be true) and
`data.random_flip` (true: the flipped variant is cached too), `data.buckets` (each image at its aspect-ratio
bucket's size, tcscale/data/buckets.py). Each input shard `<name>.tar` becomes
`<out>/<name>.tar` with every member kept and `KEY.latents.npz` added; a sample the loader could not use (a missing
part, an undecodable image or masks) is copied without latents and counted (the loader skips it either way).

Array-job conventions as the other dataprep stages (dataprep/pipeline.py): `--shards "0-9,12"` picks shard indices of
the expanded `data.shards` list; without it a SLURM array task t takes shards [t*n, (t+1)*n) (`--shards-per-task n`),
otherwise all. A shard is written under a temporary name and renamed when complete, and a finished shard is skipped,
so a killed or requeued task redoes only the missing ones. `<out>/latents-<first>-<last>.json` records the cache
key and the counts of the shards a run wrote.

Cost: one VAE encoder forward per sample and variant (the encoder only; the decoder is never run). Samples are
encoded one at a time with their variants batched (at most 2): simple and exact; a GPU would fill better with
batches of equal-shaped samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from dataprep.pipeline import DataprepConfigError, shard_indices
from tcscale.data.buckets import bucket_sizes, nearest_bucket
from tcscale.data.config import DataConfig, DataConfigError
from tcscale.data.latent_cache import LATENTS_PART, CacheKey, cache_key, encode_member
from tcscale.data.samples import SkipSample, decode_shard_sample
from tcscale.data.transforms import crop_params, transform_image_and_masks


class LatentEncoder:
    """A sample's image -> its latent posterior for each variant the loader may draw (see the module docstring)."""

    def __init__(self, vae: torch.nn.Module, data: DataConfig, device: torch.device):
        self.vae = vae.to(device, torch.float32).eval().requires_grad_(False)
        self.data = data
        self.device = device
        self.flips = [False, True] if data.random_flip else [False]
        self.key: CacheKey = cache_key(data, self.vae)
        self.buckets = bucket_sizes(data) if data.buckets.enabled else []

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> bytes:
        h, w = image.shape[:2]
        bucket = nearest_bucket(h, w, self.buckets) if self.buckets else None  # the loader's bucket of this image
        target = bucket or (self.data.resolution, self.data.resolution)
        pixels = []
        for flip in self.flips:  # the loader's crop (tcscale.data.samples.SampleProcessor), then the flip it drew
            params = crop_params(h, w, center_crop=True, random_flip=False, target=bucket)
            params.flip = flip
            pv, _ = transform_image_and_masks(image, np.zeros((0, h, w), np.uint8), target, params)
            pixels.append(pv)
        dist = self.vae.encode(torch.stack(pixels).to(self.device)).latent_dist
        return encode_member(self.key, dist.mean.float().cpu().numpy(), dist.logvar.float().cpu().numpy(), self.flips)


def cache_shard(src: str, dst: Path, encoder: LatentEncoder) -> Counter:
    """Write `dst` (temp name, then rename): every sample of `src` with its latents added. Returns the counts."""
    counts: Counter = Counter()
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with wds.TarWriter(str(tmp), encoder=False, mtime=0.0) as tar:
            for sample in wds.tariterators.tarfile_samples([{"url": src}]):
                out = {k: v for k, v in sample.items() if k != "__url__" and k != LATENTS_PART}
                try:
                    raw = decode_shard_sample(sample)
                    out[LATENTS_PART] = encoder(raw.image)
                    counts["cached"] += 1
                except SkipSample as exc:
                    counts[f"not_cached/{exc.reason}"] += 1
                tar.write(out)
        os.replace(tmp, dst)  # the shard exists only once complete
    finally:
        tmp.unlink(missing_ok=True)
    return counts


def run(cfg, out_dir: str | os.PathLike, shards: str | None = None, shards_per_task: int = 1,
        device: str = "auto", progress: bool = True) -> dict:  # fmt: skip
    """Cache the latents of this run's shards of `cfg.data.shards` (a TrainConfig) into `out_dir`; the summary."""
    from tcscale.data.loader import resolve_shards
    from tcscale.models.sd import load_components

    data = cfg.data
    if not data.center_crop:
        raise DataConfigError("data.center_crop=false: a random crop has one latent per offset and cannot be cached")
    urls = resolve_shards(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise DataConfigError(f"data.shards={data.shards!r}: two shards share a file name; the cache keeps names")
    wanted = shard_indices(shards, len(urls), shards_per_task)
    todo = [i for i in wanted if not (out / names[i]).is_file()]
    if any(Path(urls[i]).resolve() == (out / names[i]).resolve() for i in wanted):
        raise DataConfigError(f"--out {out} is the folder of the input shards: write the cache elsewhere")
    summary: dict = {"written": [], "skipped": [names[i] for i in wanted if i not in todo], "counts": {}}
    if todo:  # the VAE loads only when there is work (a finished rerun loads nothing)
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))  # fmt: skip
        encoder = LatentEncoder(load_components(cfg.model, data.resolution).vae, data, dev)
        summary["key"] = json.loads(encoder.key.to_json())
        counts: Counter = Counter()
        for n, i in enumerate(todo):
            t0 = time.perf_counter()
            got = cache_shard(urls[i], out / names[i], encoder)
            counts.update(got)
            summary["written"].append(names[i])
            if progress:
                print(f"latents: {names[i]} ({n + 1}/{len(todo)}): {dict(got)} in {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr)  # fmt: skip
        summary["counts"] = dict(counts)
        side = out / f"latents-{wanted[0]:06d}-{wanted[-1]:06d}.json"
        tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, side)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the training config (model, data.shards, data.resolution)")
    ap.add_argument("--out", required=True, help="output folder of the cached shards")
    ap.add_argument(
        "--shards", default=None, help='shard indices, e.g. "0-9,12" (default: SLURM array range, else all)'
    )
    ap.add_argument("--shards-per-task", type=int, default=1, help="shards per SLURM array task (default 1)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides of the training config")
    args = ap.parse_args(argv)
    from tcscale.config import ConfigError, load_config
    from tcscale.models.sd import ModelLoadError

    try:
        cfg = load_config(args.config, args.overrides)
        summary = run(cfg, args.out, args.shards, args.shards_per_task, args.device)
    except (ConfigError, DataConfigError, DataprepConfigError, ModelLoadError) as exc:
        print(f"latents: {exc}", file=sys.stderr)
        return 2
    print(f"latents: {len(summary['written'])} shard(s) written, {len(summary['skipped'])} already there; "
          f"{summary['counts']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
