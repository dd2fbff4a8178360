"""Import the official TokenCompose training data (metadata.jsonl + images + seg/ masks) into shards.

The official format, one JSON object per line:

    {"file_name": "000000000142.jpg", "text": "Plate with a piece of bread, ...",
     "attn_list": [["piece", "seg/000000000142/mask_000000000142_piece.png"], ["camera", null], ...]}

`file_name` is relative to the image folder (default: the folder holding metadata.jsonl). A mask
path is looked up under the mask root (default: that same folder) and, as the official loader does,
with its leading `seg` replaced by `../coco_gsam_seg` (the release ships `coco_gsam_img/train/` beside
`coco_gsam_seg/`). As in the official loader a mask's first channel is used (RGBA masks) and every
nonzero pixel is foreground. A mask at another size than its image is resized to it (nearest) when
the aspect ratios agree within 1 % (counted as `mask_resized`); otherwise, or when the file is
missing or unreadable, the phrase becomes a null phrase (counted). An item whose image is missing
or unreadable produces no record (counted).

    python -m dataprep.importers.tokencompose --metadata train/metadata.jsonl --out data/tc \
        [--images DIR] [--masks DIR] [--samples-per-shard 1000]
"""

from __future__ import annotations

import argparse
import io
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dataprep.record import GroundedRecord
from dataprep.writer import write_shards
from tcscale.data.metadata import MetadataRow, read_tokencompose_metadata

PROVENANCE = {
    "importer": "tokencompose_official",
    "detector": "Grounding DINO (official TokenCompose release)",
    "segmenter": "SAM (official TokenCompose release)",
    "noun_parser": "official TokenCompose release",
}


def sample_key(file_name: str) -> str:
    """'000000000142.jpg' -> '000000000142' (dots and slashes become '_': webdataset keys have no dots)."""
    stem = file_name.rsplit(".", 1)[0] if "." in Path(file_name).name else file_name
    return re.sub(r"[^A-Za-z0-9_\-]", "_", stem)


OFFICIAL_SEG = ("seg", "../coco_gsam_seg")  # the official loader's replacement for mask paths not found as given


def load_binary_mask(path: Path, size_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, bool]:
    """(H x W uint8 {0, 1} mask, resized?) from a mask image: first channel, nonzero = foreground.

    With `size_hw`, a mask of another size with the same aspect ratio (within 1 %) is resized (nearest);
    a different aspect ratio raises ValueError.
    """
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    mask = (arr != 0).astype(np.uint8)
    if size_hw is None or mask.shape == tuple(size_hw):
        return mask, False
    (h, w), (mh, mw) = size_hw, mask.shape
    if abs((mw / mh) / (w / h) - 1.0) > 0.01:
        raise ValueError(f"mask {path} is {mh}x{mw}, image is {h}x{w}")
    return np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST)), True


class TokenComposeImporter:
    """Callable for `write_shards`: a shard's metadata rows -> records. `counts` tallies problems."""

    def __init__(self, image_root: str | Path, mask_root: str | Path, provenance: dict | None = None):
        self.image_root = Path(image_root)
        self.mask_root = Path(mask_root)
        self.data_dir = self.image_root
        self.provenance = {**PROVENANCE, **(provenance or {})}
        self.counts: Counter = Counter()

    def record(self, row: MetadataRow) -> GroundedRecord | None:
        img_path = self.image_root / row.file_name
        try:
            data = img_path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # full decode: a truncated file fails here, not in the loader
                hw = (im.height, im.width)
        except (OSError, ValueError) as exc:
            self.counts["image_unreadable"] += 1
            print(f"tokencompose import: {img_path} skipped: {exc}")
            return None
        phrases, masks = [], []
        for text, rel in row.attn_list:
            mask = None
            if rel is not None:
                path = self.mask_path(str(rel))
                if path is None:
                    self.counts["mask_missing"] += 1
                else:
                    try:
                        mask, resized = load_binary_mask(path, hw)
                        if resized:
                            self.counts["mask_resized"] += 1
                    except ValueError:
                        self.counts["mask_size_mismatch"] += 1
                    except OSError:
                        self.counts["mask_unreadable"] += 1
            phrases.append(text)
            masks.append(mask)
        stem = Path(row.file_name).stem
        return GroundedRecord(
            key=sample_key(row.file_name),
            image=data,
            caption=row.text,
            phrases=phrases,
            masks=masks,
            source={
                "dataset": "tokencompose_coco",
                "file_name": row.file_name,
                "image_id": int(stem) if stem.isdigit() else stem,
                "metadata_line": row.line,
            },
            provenance=self.provenance,
        )

    def mask_path(self, rel: str) -> Path | None:
        """Where a metadata mask path lives: under the mask root, else the official `../coco_gsam_seg` layout."""
        candidates = [self.mask_root / rel]
        if rel.startswith(OFFICIAL_SEG[0] + "/"):
            candidates.append(self.data_dir / (OFFICIAL_SEG[1] + rel[len(OFFICIAL_SEG[0]) :]))
        return next((c for c in candidates if c.is_file()), None)

    def __call__(self, rows: Sequence[dict]) -> Iterator[GroundedRecord | None]:
        for row in rows:
            yield self.record(row)


def import_tokencompose(
    metadata: str | Path,
    out: str | Path,
    *,
    image_root: str | Path | None = None,
    mask_root: str | Path | None = None,
    samples_per_shard: int = 1000,
    prefix: str = "tokencompose",
    shard_ids=None,
    progress: bool = True,
) -> dict:
    metadata = Path(metadata)
    rows = list(read_tokencompose_metadata(metadata))
    keys = Counter(sample_key(r.file_name) for r in rows)
    dup = [k for k, n in keys.items() if n > 1]
    if dup:
        raise ValueError(f"{metadata}: {len(dup)} file names map to the same sample key (first: {dup[0]})")
    importer = TokenComposeImporter(image_root or metadata.parent, mask_root or metadata.parent)
    importer.data_dir = metadata.parent  # the official loader resolves ../coco_gsam_seg from here
    summary = write_shards(
        rows,
        importer,
        out,
        prefix=prefix,
        samples_per_shard=samples_per_shard,
        shard_ids=shard_ids,
        progress=progress,
        run_info={"importer": "tokencompose", "metadata": str(metadata), "problems": dict(importer.counts)},
    )
    summary["import_problems"] = dict(importer.counts)
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadata", required=True, help="TokenCompose metadata.jsonl")
    ap.add_argument("--out", required=True, help="output shard folder")
    ap.add_argument("--images", default=None, help="image folder (default: the metadata's folder)")
    ap.add_argument("--masks", default=None, help="root of the mask paths (default: the metadata's folder)")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--prefix", default="tokencompose")
    args = ap.parse_args(argv)
    s = import_tokencompose(
        args.metadata,
        args.out,
        image_root=args.images,
        mask_root=args.masks,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
    )
    print(f"{s['samples']} samples, null rate {s['null_rate']:.3f}, problems {s['import_problems']}: {s['shards']}")


if __name__ == "__main__":
    main()
