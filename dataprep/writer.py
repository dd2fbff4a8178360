"""Write `GroundedRecord`s into WebDataset shards: idempotent, resumable at shard granularity.

The item list is cut into fixed shards (`samples_per_shard` items each, in order), so shard i
always holds the records made from items [i*k, (i+1)*k). A rerun — after a crash, a SLURM
preemption, or to add missing shards — skips every shard whose final `.tar` exists and builds only
the missing ones; the caller's (expensive) record function never runs for a finished shard.

Each shard is written with `webdataset.TarWriter` to a temporary name in the output folder and
renamed into place (`os.replace`, atomic) only once complete, so a shard file that exists is
whole. (`webdataset.ShardWriter` rotates shards by running count/size while streaming, which can
rename via its `opener`/`post` hooks but cannot map items to shards up front, and so cannot skip
finished shards without redoing the work.) Per shard, a `<shard>.stats.json` sidecar holds its
counts; each run writes `summary-<UTC time>.json` and `summary.json` (samples, phrases, null rate,
mask-area histogram, shards written/skipped, records failed by reason).

`manifest.json` pins the item count, shard size and prefix: rerunning with different ones is an
error naming the parameter, since it would silently reshuffle items between shards.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dataprep.record import GroundedRecord, RecordError

T = TypeVar("T")
AREA_BINS = (0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # mask area / image area
MASK_FORMATS = ("packbits", "uint8")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_pattern(prefix: str, num_shards: int) -> str:
    """Brace pattern of all shards, for `data.shards`."""
    return f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def encode_masks(masks: list[np.ndarray], height: int, width: int, mask_format: str = "packbits") -> bytes:
    """Stack masks P x H x W and save as npz: `masks_packed` (np.packbits along W) + `shape`, or `masks` uint8."""
    stack = np.zeros((len(masks), height, width), dtype=np.uint8)
    for p, m in enumerate(masks):
        stack[p] = m != 0
    buf = io.BytesIO()
    if mask_format == "packbits":
        np.savez_compressed(buf, masks_packed=np.packbits(stack, axis=-1), shape=np.array(stack.shape, np.int64))
    elif mask_format == "uint8":
        np.savez_compressed(buf, masks=stack)
    else:
        raise ValueError(f"mask_format {mask_format!r} is not one of {list(MASK_FORMATS)}")
    return buf.getvalue()


def encode_image(image: Image.Image | np.ndarray | bytes, quality: int = 95) -> bytes:
    """JPEG bytes: JPEG input passes through untouched; anything else is encoded once."""
    if isinstance(image, bytes | bytearray):
        if bytes(image[:3]) == b"\xff\xd8\xff":
            return bytes(image)
        with Image.open(io.BytesIO(image)) as im:
            image = im.convert("RGB")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_record(rec: GroundedRecord, mask_format: str = "packbits", jpeg_quality: int = 95) -> tuple[dict, dict]:
    """A validated record -> (TarWriter sample dict, stats of this sample)."""
    rec.validate()
    height, width = rec.image_size()
    phrases, masks, areas = [], [], []
    for text, mask in zip(rec.phrases, rec.masks):
        if mask is None:
            phrases.append({"text": text, "mask": None})
            continue
        phrases.append({"text": text, "mask": len(masks)})
        masks.append(mask)
        areas.append(float(np.count_nonzero(mask)) / (height * width))
    meta = {
        "caption": rec.caption,
        "phrases": phrases,
        "source": rec.source,
        "provenance": rec.provenance,
        "width": width,
        "height": height,
        "num_masks": len(masks),
        "mask_format": mask_format,
    }
    sample = {
        "__key__": rec.key,
        "jpg": encode_image(rec.image, jpeg_quality),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        "masks.npz": encode_masks(masks, height, width, mask_format),
    }
    stats = {"phrases": len(phrases), "null_phrases": len(phrases) - len(masks), "areas": areas}
    return sample, stats


def _empty_stats() -> dict[str, Any]:
    return {"samples": 0, "phrases": 0, "null_phrases": 0, "area_hist": [0] * (len(AREA_BINS) - 1), "failed": {}}


def write_shard(
    path: str | os.PathLike,
    records: Iterable[GroundedRecord | None],
    *,
    mask_format: str = "packbits",
    jpeg_quality: int = 95,
    on_record: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write one shard atomically (temp name in the same folder, then rename) and its stats sidecar.

    A record that is None or fails validation is not written; it is counted under `failed` by reason.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    stats = _empty_stats()
    failed: Counter = Counter()
    seen: set[str] = set()
    try:
        with wds.TarWriter(str(tmp), encoder=False, mtime=0.0) as tar:
            for rec in records:
                if on_record is not None:
                    on_record()
                if rec is None:
                    failed["no_record"] += 1
                    continue
                if rec.key in seen:
                    failed["duplicate_key"] += 1
                    continue
                try:
                    sample, st = encode_record(rec, mask_format, jpeg_quality)
                except (RecordError, OSError, ValueError) as exc:
                    failed[type(exc).__name__] += 1
                    tqdm.write(f"dataprep: record {getattr(rec, 'key', '?')} not written ({path.name}): {exc}")
                    continue
                seen.add(rec.key)
                tar.write(sample)
                stats["samples"] += 1
                stats["phrases"] += st["phrases"]
                stats["null_phrases"] += st["null_phrases"]
                hist = np.histogram(np.clip(st["areas"], 0.0, 1.0), bins=AREA_BINS)[0] if st["areas"] else None
                if hist is not None:
                    stats["area_hist"] = [a + int(b) for a, b in zip(stats["area_hist"], hist)]
        stats["failed"] = dict(failed)
        side = path.with_name(path.name + ".stats.json")
        side_tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
        side_tmp.write_text(json.dumps(stats))
        os.replace(side_tmp, side)
        os.replace(tmp, path)  # the shard exists only once complete
    finally:
        if tmp.exists():
            tmp.unlink()
    return stats


def check_or_start_manifest(
    manifest: Path, want: dict[str, Any], *, started: str, hint: str, error: type[Exception] = ValueError
) -> None:
    """Refuse to resume into ``manifest``'s folder with other parameters than it was started with; start it if new.

    ``started`` ("these shards were started") and ``hint`` (what to do instead) go in the error."""
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        for key, value in want.items():
            if have.get(key) != value:
                raise error(f"{manifest}: {key} was {have.get(key)!r} when {started}, now {value!r}; {hint}")
        return
    manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text(json.dumps(want, indent=1))
    os.replace(tmp, manifest)


def write_shards(
    items: Sequence[T],
    make_records: Callable[[Sequence[T]], Iterable[GroundedRecord | None]],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "grounded",
    samples_per_shard: int = 1000,
    shard_ids: Iterable[int] | None = None,
    mask_format: str = "packbits",
    jpeg_quality: int = 95,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the shards of `items` that do not exist yet; return (and save) the run summary.

    Args:
        items: the work list (image ids, metadata lines, ...), in a fixed order across reruns.
        make_records: called once per missing shard with that shard's items; yields one record (or None
            for an item that produced nothing) per item; may batch internally (GPU stages).
        out_dir: output folder (created).
        prefix: shard file prefix: `<prefix>-000000.tar`.
        samples_per_shard: items per shard (pick it so shards are 0.5-1 GB).
        shard_ids: only these shard indices (SLURM array tasks split the shards); default all.
        mask_format: "packbits" (np.packbits along W) or "uint8".
        progress: tqdm bar over items of the shards written in this run.
        run_info: extra fields for the summary (stage names, thresholds, command line).
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format {mask_format!r} is not one of {list(MASK_FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(items)
    num_shards = max(1, math.ceil(n / samples_per_shard))
    check_or_start_manifest(
        out / f"{prefix}-manifest.json",
        {"prefix": prefix, "num_items": n, "samples_per_shard": samples_per_shard},
        started="these shards were started",
        hint="use a new output folder or the same parameters",
    )
    wanted = sorted(set(range(num_shards) if shard_ids is None else shard_ids))
    bad = [i for i in wanted if not 0 <= i < num_shards]
    if bad:
        raise ValueError(f"shard_ids {bad[:5]} out of range 0..{num_shards - 1}")
    todo = [i for i in wanted if not (out / shard_name(prefix, i)).exists()]
    # Leftovers of a killed run, for the shards this run writes only: array tasks share out_dir, and another
    # task may be writing its own shards' temp files right now.
    for i in todo:
        for stale in out.glob(f".{shard_name(prefix, i)}*.tmp-*"):
            stale.unlink(missing_ok=True)
    t0 = time.time()
    bar = tqdm(
        total=sum(len(range(i * samples_per_shard, min(n, (i + 1) * samples_per_shard))) for i in todo),
        disable=not progress,
        desc=f"shards -> {out}",
        unit="sample",
    )
    for i in todo:
        chunk = items[i * samples_per_shard : (i + 1) * samples_per_shard]
        write_shard(
            out / shard_name(prefix, i),
            make_records(chunk),
            mask_format=mask_format,
            jpeg_quality=jpeg_quality,
            on_record=lambda: bar.update(1),
        )
    bar.close()
    summary = summarize(out, prefix, num_shards)
    summary.update(
        {
            "shards_written_this_run": len(todo),
            "shards_skipped_existing": len(wanted) - len(todo),
            "seconds": round(time.time() - t0, 3),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run_info": run_info or {},
        }
    )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name in (f"{prefix}-summary-{stamp}.json", f"{prefix}-summary.json"):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, out / name)
    return summary


def summarize(out_dir: str | os.PathLike, prefix: str, num_shards: int) -> dict[str, Any]:
    """Totals over the shards present (from their stats sidecars)."""
    out = Path(out_dir)
    total = _empty_stats()
    failed: Counter = Counter()
    present = 0
    for i in range(num_shards):
        side = out / (shard_name(prefix, i) + ".stats.json")
        if not (out / shard_name(prefix, i)).exists() or not side.exists():
            continue
        present += 1
        st = json.loads(side.read_text())
        for key in ("samples", "phrases", "null_phrases"):
            total[key] += st[key]
        total["area_hist"] = [a + b for a, b in zip(total["area_hist"], st["area_hist"])]
        failed.update(st.get("failed", {}))
    return {
        "shards": shard_pattern(prefix, num_shards),
        "num_shards": num_shards,
        "shards_present": present,
        "samples": total["samples"],
        "phrases": total["phrases"],
        "null_phrases": total["null_phrases"],
        "null_rate": total["null_phrases"] / total["phrases"] if total["phrases"] else 0.0,
        "mask_area_hist": {"bins": list(AREA_BINS), "counts": total["area_hist"]},
        "failed": dict(failed),
    }
