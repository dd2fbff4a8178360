"""Loader throughput on CPU: samples/s per worker for 512-px training samples with ~3 masks each.

Builds COCO-like shards (real photos from scikit-image resized to 640 x 480 / 480 x 640 JPEGs,
captions and noun phrases of the official TokenCompose metadata when present, 3 elliptic masks per
image, bit-packed), then measures
  * the per-stage cost of one sample (tar read excluded): JPEG decode, mask decode, tokenize +
    align, crop + resize of image and masks, layer masks for SD1.4's grids (8, 16, 32, 64), collate;
  * end-to-end samples/s of one worker (the `ShardStream` a DataLoader worker runs, in process);
  * samples/s of the trainer's loader with data.num_workers workers (on a machine shared with
    others this is noisy; the per-worker number is the one to compare).
Results are appended to benchmarks/results/loader_cpu.json with CPU, versions and date.

    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py [--samples 64] [--resolution 512] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from dataprep.record import GroundedRecord  # noqa: E402
from dataprep.writer import write_shards  # noqa: E402
from tcscale.data import DataConfig, build_train_loader  # noqa: E402
from tcscale.data.loader import ShardStream  # noqa: E402
from tcscale.data.samples import ProcessSettings, SampleProcessor, collate, decode_masks, decode_shard_sample  # noqa: E402
from tcscale.models.tokenizer import sd_clip_tokenizer  # noqa: E402

SHARED = Path(os.environ.get("TCSCALE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
METADATA = SHARED / "data" / "tokencompose_coco" / "metadata.jsonl"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
SD14_LAYERS = ((8, 8), (16, 16), (32, 32), (64, 64))


def _captions(n: int) -> list[tuple[str, list[str]]]:
    out = []
    if METADATA.is_file():
        with open(METADATA) as f:
            for line in f:
                row = json.loads(line)
                phrases = [p for p, m in row["attn_list"] if m is not None][:3]
                if len(phrases) >= 2:
                    out.append((row["text"], phrases))
                if len(out) >= n:
                    break
    while len(out) < n:
        out.append(("a cat on a sofa next to a coffee cup", ["cat", "sofa", "coffee cup"]))
    return out


def _records(n: int, seed: int = 0) -> list[GroundedRecord]:
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [np.asarray(getattr(skimage.data, p)())[..., :3] for p in PHOTOS]
    recs = []
    for i, (caption, phrases) in enumerate(_captions(n)):
        w, h = (640, 480) if i % 3 else (480, 640)
        img = Image.fromarray(np.ascontiguousarray(photos[i % len(photos)])).convert("RGB").resize((w, h))
        masks = []
        for _ in phrases:
            m = Image.new("L", (w, h), 0)
            cx, cy, rx, ry = (
                rng.uniform(0.2, 0.8) * w,
                rng.uniform(0.2, 0.8) * h,
                rng.uniform(40, 200),
                rng.uniform(40, 200),
            )
            ImageDraw.Draw(m).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
            masks.append(np.asarray(m))
        recs.append(GroundedRecord(f"bench_{i:05d}", img, caption, phrases, masks, {"dataset": "bench"}, {}))
    return recs


def _stage_times(urls: list[str], processor: SampleProcessor, resolution: int) -> dict[str, float]:
    """Median CPU milliseconds per sample of each stage (samples read from the shards first)."""
    raw = [s for u in urls for s in wds.tariterators.tarfile_samples([{"url": u}])]
    t: dict[str, list[float]] = {
        k: []
        for k in (
            "decode_jpeg",
            "decode_masks",
            "full_decode_and_checks",
            "tokenize_align",
            "process_total",
            "collate_per_sample",
        )
    }
    rng = np.random.default_rng(0)
    processed = []
    for s in raw:
        t0 = time.process_time()
        with Image.open(io.BytesIO(s["jpg"])) as im:
            np.asarray(im.convert("RGB"))
        t1 = time.process_time()
        decode_masks(s["masks.npz"])
        t2 = time.process_time()
        d = decode_shard_sample(s)
        t3 = time.process_time()
        processor.aligner._captions.clear()
        processor.aligner._phrases.clear()
        processor.aligner.align(d.caption, d.phrases)
        t4 = time.process_time()
        processor.aligner._captions.clear()
        processor.aligner._phrases.clear()
        processed.append(processor(d, rng, Counter()))
        t5 = time.process_time()
        t["decode_jpeg"].append(t1 - t0)
        t["decode_masks"].append(t2 - t1)
        t["full_decode_and_checks"].append(t3 - t2)
        t["tokenize_align"].append(t4 - t3)
        t["process_total"].append(t5 - t4)
    for i in range(0, len(processed) - 3, 4):
        t0 = time.process_time()
        collate(processed[i : i + 4])
        t["collate_per_sample"].append((time.process_time() - t0) / 4)
    out = {k: round(1e3 * float(np.median(v)), 3) for k, v in t.items()}
    out["transform_and_layer_masks"] = round(out["process_total"] - out["tokenize_align"], 3)
    return out


def _throughput(iterable, batch: int, warmup: int, measure: int, windows: int = 3) -> tuple[list[float], list[float]]:
    """samples/s in `windows` consecutive windows of `measure` batches (after `warmup` batches), by wall clock
    and by this process's CPU time (the latter does not count time spent waiting for a core on a loaded machine)."""
    it = iter(iterable)
    for _ in range(warmup):
        next(it)
    wall, cpu = [], []
    for _ in range(windows):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(measure):
            next(it)
        wall.append(round(measure * batch / (time.perf_counter() - t0), 2))
        cpu.append(round(measure * batch / (time.process_time() - c0), 2))
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64, help="distinct samples in the benchmark shards")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="workers for the trainer-loader measurement")
    ap.add_argument("--measure", type=int, default=40, help="batches timed per measurement")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    tok = sd_clip_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        recs = _records(args.samples)
        summary = write_shards(
            recs, lambda items: list(items), tmp, prefix="bench", samples_per_shard=16, progress=False
        )
        pattern = str(Path(tmp) / summary["shards"])
        urls = list(wds.shardlists.expand_urls(pattern))
        shard_bytes = sum(os.path.getsize(u) for u in urls)
        settings = ProcessSettings(resolution=args.resolution, layer_sizes=SD14_LAYERS)
        processor = SampleProcessor(tok, settings)
        stages = _stage_times(urls, processor, args.resolution)
        stream = ShardStream(
            urls, processor, rank=0, world_size=1, batch=args.batch, seed=0, resampled=True, shuffle_buffer=16
        )
        per_worker, per_worker_cpu = _throughput(stream, args.batch, 3, args.measure)
        cfg = DataConfig(
            source="webdataset", shards=pattern, resolution=args.resolution, num_workers=args.workers, shuffle_buffer=16
        )
        loader = build_train_loader(
            cfg, tok, rank=0, world_size=1, micro_batch_size=args.batch, seed=0, layer_sizes=list(SD14_LAYERS)
        )
        with_workers, _ = _throughput(loader, args.batch, 3 * max(1, args.workers), args.measure)
        loader.close()  # stop the workers before the shards' folder goes away
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": "cpu",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "note": "2-core machine shared with other users (see loadavg); OMP_NUM_THREADS=1, torch threads 1",
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "webdataset": wds.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
        },
        "setup": {
            "samples": args.samples,
            "image_sizes": "640x480 and 480x640 JPEG q95",
            "masks_per_sample": 3,
            "mask_format": "packbits npz",
            "resolution": args.resolution,
            "batch": args.batch,
            "layer_sizes": [list(s) for s in SD14_LAYERS],
            "bytes_per_sample": shard_bytes // args.samples,
        },
        "stage_cpu_ms_per_sample_median": stages,
        "samples_per_s_one_worker": float(np.median(per_worker)),
        "samples_per_s_one_worker_windows": per_worker,
        "ms_per_sample_one_worker": round(1e3 / float(np.median(per_worker)), 2),
        "samples_per_s_one_worker_by_cpu_time": float(np.median(per_worker_cpu)),
        "ms_cpu_per_sample_one_worker": round(1e3 / float(np.median(per_worker_cpu)), 2),
        f"samples_per_s_trainer_loader_{args.workers}_workers": float(np.median(with_workers)),
        f"samples_per_s_trainer_loader_{args.workers}_workers_windows": with_workers,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    runs.append(result)
    out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
