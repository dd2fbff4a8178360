"""Importers: the official TokenCompose release layout and mask encodings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from dataprep.importers.tokencompose import import_tokencompose, load_binary_mask
from tcscale.data.samples import decode_masks
from tests.helpers.data import make_tokencompose_dir


def _samples(folder: Path, pattern: str) -> dict[str, dict]:
    urls = wds.shardlists.expand_urls(str(folder / pattern))
    return {s["__key__"]: s for u in urls for s in wds.tariterators.tarfile_samples([{"url": u}])}


def test_official_release_layout_rgba_and_rescaled_masks(tmp_path):
    # the release: coco_gsam_img/train/{metadata.jsonl, *.jpg} beside coco_gsam_seg/<id>/mask_*.png,
    # metadata mask paths starting with "seg/"
    train = tmp_path / "coco_gsam_img" / "train"
    meta = make_tokencompose_dir(train, copies=1)
    (train / "seg").rename(tmp_path / "coco_gsam_img" / "coco_gsam_seg")
    seg = tmp_path / "coco_gsam_img" / "coco_gsam_seg"
    # one mask stored RGBA at half size (same aspect), one at a wrong aspect ratio
    cup = seg / "000000000001" / "mask_000000000001_coffee_cup.png"
    m = np.asarray(Image.open(cup)) > 0
    rgba = np.zeros((*m.shape, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = m * 255, 255
    Image.fromarray(rgba).resize((m.shape[1] // 2, m.shape[0] // 2), Image.NEAREST).save(cup)
    saucer = seg / "000000000001" / "mask_000000000001_saucer.png"
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(saucer)
    s = import_tokencompose(meta, tmp_path / "shards", samples_per_shard=10, progress=False)
    assert s["samples"] == 4 and s["import_problems"] == {"mask_resized": 1, "mask_size_mismatch": 1}
    sample = _samples(tmp_path / "shards", s["shards"])["000000000001"]
    meta1 = json.loads(sample["json"])
    assert [p["mask"] for p in meta1["phrases"]] == [0, None, 1]  # coffee cup, saucer (bad aspect), chest
    masks = decode_masks(sample["masks.npz"])
    assert masks.shape == (2, 400, 600)
    assert abs(int(masks[0].sum()) - int(m.sum())) <= 0.02 * m.sum()  # resized back to the image's size


def test_mask_first_channel_nonzero_is_foreground(tmp_path):
    p = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1], [2, 255]], np.uint8)).save(p)
    mask, resized = load_binary_mask(p, (2, 2))
    assert mask.tolist() == [[0, 1], [1, 1]] and not resized
