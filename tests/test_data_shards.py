"""Shards -> loader: exact coverage over ranks x workers, importers, corrupt inputs, config errors."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from dataprep.importers.coco import import_coco
from dataprep.importers.tokencompose import import_tokencompose
from dataprep.synthetic_shards import write_synthetic_shards
from dataprep.writer import encode_masks, encode_record, write_shards
from tcscale.data import DataConfig, DataConfigError, build_train_loader
from tcscale.data.loader import ShardStream, resolve_shards
from tcscale.data.samples import ProcessSettings, SampleProcessor
from tcscale.models.tokenizer import sd_clip_tokenizer
from tests.helpers.data import PHOTO_SAMPLES, make_coco_dir, make_tokencompose_dir, records

R = 32


@pytest.fixture(scope="module")
def tokenizer():
    return sd_clip_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return SampleProcessor(tokenizer, ProcessSettings(resolution=R, layer_sizes=((4, 4),), full_masks=True))


def _one_pass(urls, processor, *, world_size=2, workers=2, batch=3, seed=0, shuffle=4) -> list[dict]:
    """All batches of one pass (resampling off) over every rank, each rank with `workers` workers."""
    out = []
    for rank in range(world_size):
        ds = ShardStream(
            urls,
            processor,
            rank=rank,
            world_size=world_size,
            batch=batch,
            seed=seed,
            resampled=False,
            shuffle_buffer=shuffle,
            passes=1,
        )
        out += list(DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=lambda x: x))
    return out


def _check_tokens_and_masks(batch, tokenizer, phrases_of: dict[str, list[str]]):
    """Each slot's tokens spell the phrase that slot's mask belongs to (no mask shifted against its tokens)."""
    for i, key in enumerate(batch["keys"]):
        want = phrases_of[key]
        got = [tokenizer.decode(batch["input_ids"][i, batch["token_phrase"][i] == p]).strip() for p in range(len(want))]
        assert got == [w.lower() for w in want], key
        assert (batch["token_phrase"][i] < len(want)).all()
        assert batch["phrase_masks"][i, : len(want)].flatten(1).sum(1).gt(0).all()
        assert batch["phrase_masks"][i, len(want) :].sum() == 0


# 8 shards: split by shard; 6 shards: uneven split by shard; 3 shards < 4 readers: split by sample position
@pytest.mark.parametrize("samples_per_shard", [3, 4, 8])
def test_synthetic_shards_one_pass_no_loss_no_duplicate(tmp_path, processor, samples_per_shard):
    s = write_synthetic_shards(str(tmp_path), 23, 40, 64, samples_per_shard=samples_per_shard, progress=False)
    urls = resolve_shards(DataConfig(source="webdataset", shards=str(tmp_path / s["shards"])))
    keys = [k for b in _one_pass(urls, processor) for k in b["keys"]]
    assert Counter(keys) == Counter(f"synth1234_{i:08d}" for i in range(23))


def test_tokencompose_import_through_loader_exact_pass(tmp_path, tokenizer, processor):
    meta = make_tokencompose_dir(tmp_path / "official", copies=2)  # 8 images
    s = import_tokencompose(meta, tmp_path / "shards", samples_per_shard=3, progress=False)
    assert s["samples"] == 8 and s["import_problems"] == {} and 0 < s["null_rate"] < 0.5
    urls = resolve_shards(DataConfig(source="webdataset", shards=str(tmp_path / "shards" / s["shards"])))
    assert len(urls) == 3  # fewer shards than 2 ranks x 2 workers: the pass is split by sample position
    batches = _one_pass(urls, processor)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(f"{c * 1000 + j:012d}" for c in range(2) for j in range(4))
    phrases_of = {
        f"{c * 1000 + j:012d}": [p for p, box in ph if box is not None]
        for c in range(2)
        for j, (_, _, ph) in enumerate(PHOTO_SAMPLES)
    }
    for b in batches:
        _check_tokens_and_masks(b, tokenizer, phrases_of)
        assert b["layer_masks"][(4, 4)].shape == (len(b["keys"]), b["phrase_masks"].shape[1], 16)


def test_coco_import_grounds_named_categories(tmp_path, tokenizer):
    inst, caps, images = make_coco_dir(tmp_path / "coco")
    s = import_coco(inst, images, tmp_path / "shards", captions=caps, samples_per_shard=2, progress=False)
    assert s["samples"] == 3 and s["phrases"] == 3 and s["null_phrases"] == 0
    cfg = DataConfig(
        source="webdataset",
        shards=str(tmp_path / "shards" / s["shards"]),
        resolution=R,
        resampled=False,
        shuffle_buffer=1,
    )
    batch = next(iter(build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=3, seed=0)))
    _check_tokens_and_masks(
        batch, tokenizer, {"000000000001_100": ["cat"], "000000000002_102": ["cups"], "000000000003_103": ["woman"]}
    )
    # the chair is annotated but not named in the caption: no phrase; two cups -> one union mask
    i = batch["keys"].index("000000000002_102")
    assert batch["phrase_masks"].shape[1] == 1 and batch["phrase_masks"][i, 0].mean() > 0.3


def _corrupt_shards(tmp_path) -> tuple[str, list[str], dict[str, list[str]]]:
    """Shard 0: good / corrupt jpg / good / mask count / good / mask size / good / missing npz / good.
    Shard 1: good samples, then the tar is cut in the middle."""
    recs = records(14)
    good, phrases_of = [], {}
    with wds.TarWriter(str(tmp_path / "bad-000000.tar"), encoder=False) as tar:
        for i, rec in enumerate(recs[:9]):
            sample, _ = encode_record(rec)
            if i == 1:
                sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 3]  # truncated JPEG
            elif i == 3:
                meta = json.loads(sample["json"])
                meta["phrases"][1]["mask"] = 5  # names a mask the npz does not hold
                sample["json"] = json.dumps(meta).encode()
            elif i == 5:
                n = json.loads(sample["json"])["num_masks"]
                sample["masks.npz"] = encode_masks([np.ones((10, 10), np.uint8)] * n, 10, 10)
            elif i == 7:
                del sample["masks.npz"]
            else:
                good.append(rec.key)
                phrases_of[rec.key] = [p for p, m in zip(rec.phrases, rec.masks) if m is not None]
            tar.write(sample)
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as tar:
        for rec in recs[9:]:
            tar.write(encode_record(rec)[0])
    data = buf.getvalue()
    # keep the first 3 samples whole: cut inside the 4th sample's image
    cut = data.find(recs[12].key.encode()) + 2000
    (tmp_path / "bad-000001.tar").write_bytes(data[:cut])
    for rec in recs[9:12]:
        good.append(rec.key)
        phrases_of[rec.key] = [p for p, m in zip(rec.phrases, rec.masks) if m is not None]
    return str(tmp_path / "bad-{000000..000001}.tar"), good, phrases_of


def test_corrupt_inputs_are_skipped_and_counted(tmp_path, tokenizer, processor):
    pattern, good, phrases_of = _corrupt_shards(tmp_path)
    urls = resolve_shards(DataConfig(source="webdataset", shards=pattern))
    ds = ShardStream(
        urls, processor, rank=0, world_size=1, batch=2, seed=0, resampled=False, shuffle_buffer=1, passes=1
    )
    counts: Counter = Counter()
    keys = []
    for batch in ds:
        counts.update(batch.pop("_counters"))
        keys += batch["keys"]
        _check_tokens_and_masks(batch, tokenizer, phrases_of)
    assert sorted(keys) == sorted(good)
    assert counts["skipped/decode_image"] == 1 and counts["skipped/mask_count"] == 1
    assert counts["skipped/mask_size"] == 1 and counts["skipped/missing_part"] >= 1  # the sample without npz
    assert counts["skipped/tar_read"] >= 1 and counts["samples_seen"] == len(good)
    # through the trainer's loader with workers: the run goes on and the counters reach the main process
    cfg = DataConfig(source="webdataset", shards=pattern, resolution=R, num_workers=2, shuffle_buffer=4)
    loader = build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=2, seed=0)
    it = iter(loader)
    for _ in range(12):
        batch = next(it)
        _check_tokens_and_masks(batch, tokenizer, phrases_of)
    c = loader.counters()
    assert c["samples_seen"] == 24 and sum(v for k, v in c.items() if k.startswith("skipped/")) > 0
    assert loader.state_dict()["step"] == 12


def test_webdataset_stream_is_reproducible_and_batches_have_the_contract_shapes(tmp_path, tokenizer):
    s = write_synthetic_shards(str(tmp_path), 12, 48, 64, samples_per_shard=4, progress=False)
    cfg = DataConfig(
        source="webdataset",
        shards=str(tmp_path / s["shards"]),
        resolution=R,
        shuffle_buffer=6,
        random_flip=True,
        center_crop=False,
    )
    kw = dict(
        rank=1, world_size=2, micro_batch_size=3, seed=5, start_step=7, layer_sizes=[(4, 4), (2, 2)], full_masks=True
    )
    a, b = iter(build_train_loader(cfg, tokenizer, **kw)), iter(build_train_loader(cfg, tokenizer, **kw))
    for _ in range(5):
        x, y = next(a), next(b)
        assert x["keys"] == y["keys"] and torch.equal(x["pixel_values"], y["pixel_values"])
    assert x["pixel_values"].shape == (3, 3, R, R) and x["input_ids"].shape == (3, 77)
    p = x["phrase_masks"].shape[1]
    assert x["token_phrase"].shape == (3, 77) and x["layer_masks"][(2, 2)].shape == (3, p, 4)
    c = iter(build_train_loader(cfg, tokenizer, **{**kw, "start_step": 8}))
    assert [next(c)["keys"] for _ in range(3)] != [next(iter(build_train_loader(cfg, tokenizer, **kw)))["keys"]] * 3


def test_missing_shards_are_a_clear_config_error(tmp_path, tokenizer):
    kw = dict(rank=0, world_size=1, micro_batch_size=1, seed=0)
    with pytest.raises(DataConfigError, match="data.shards"):
        build_train_loader(DataConfig(source="webdataset"), tokenizer, **kw)
    with pytest.raises(DataConfigError, match="data.shards.*matches no file"):
        build_train_loader(DataConfig(source="webdataset", shards=str(tmp_path / "x-{000..003}.tar")), tokenizer, **kw)
    write_shards(records(1), lambda items: list(items), tmp_path, prefix="y", samples_per_shard=1, progress=False)
    with pytest.raises(DataConfigError, match="1 of 2 shards are missing"):
        build_train_loader(
            DataConfig(source="webdataset", shards=str(tmp_path / "y-{000000..000001}.tar")), tokenizer, **kw
        )
