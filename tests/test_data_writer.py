"""Shard writer: contract of a sample, temp-then-rename, resume after a kill, manifest, summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds

from dataprep.record import GroundedRecord, RecordError
from dataprep.synthetic_shards import synthetic_records, write_synthetic_shards
from dataprep.writer import shard_name, write_shards
from tcscale.data.samples import decode_masks
from tcscale.data.synthetic import SyntheticWorld


class Killed(Exception):
    """Stands in for a SIGKILL / preemption in the middle of a shard."""


WORLD = SyntheticWorld(num_samples=20, max_objects=3, seed=9)


def _make(calls: list):
    def make(items):
        calls.append(list(items))
        return synthetic_records(WORLD, items, (40, 56))

    return make


def _keys(path) -> list[str]:
    return [s["__key__"] for s in wds.tariterators.tarfile_samples([{"url": str(path)}])]


def test_sample_contract(tmp_path):
    rec = synthetic_records(WORLD, [0], (40, 56))[0]
    rec.phrases.append("grey background")
    rec.masks.append(None)
    write_shards([rec], lambda items: list(items), tmp_path, prefix="c", samples_per_shard=4, progress=False)
    (sample,) = list(wds.tariterators.tarfile_samples([{"url": str(tmp_path / "c-000000.tar")}]))
    assert set(sample) >= {"__key__", "jpg", "json", "masks.npz"}
    meta = json.loads(sample["json"])
    n = len(rec.phrases) - 1
    assert meta["phrases"][-1] == {"text": "grey background", "mask": None}
    assert [p["mask"] for p in meta["phrases"][:-1]] == list(range(n))
    assert meta["source"]["dataset"] == "synthetic_shapes" and "segmenter" in meta["provenance"]
    masks = decode_masks(sample["masks.npz"])
    assert masks.shape == (n, 40, 56) and np.array_equal(masks, np.stack(rec.masks[:-1]))
    summary = json.loads((tmp_path / "c-summary.json").read_text())
    assert summary["samples"] == 1 and summary["null_phrases"] == 1 and sum(summary["mask_area_hist"]["counts"]) == n


def test_rerun_writes_only_missing_shards_and_clears_temp_files(tmp_path):
    calls: list = []
    s = write_shards(list(range(20)), _make(calls), tmp_path, prefix="w", samples_per_shard=6, progress=False)
    assert s["num_shards"] == 4 and s["samples"] == 20 and s["shards_written_this_run"] == 4 and len(calls) == 4
    assert s["shards"] == "w-{000000..000003}.tar"
    before = _keys(tmp_path / shard_name("w", 2))
    # a killed run: shard 2 never renamed into place, a temp file left behind
    (tmp_path / shard_name("w", 2)).unlink()
    (tmp_path / ".w-000002.tar.tmp-4242").write_bytes(b"partial")
    calls.clear()
    s = write_shards(list(range(20)), _make(calls), tmp_path, prefix="w", samples_per_shard=6, progress=False)
    assert calls == [list(range(12, 18))]  # only the missing shard's items were processed
    assert s["shards_written_this_run"] == 1 and s["shards_skipped_existing"] == 3 and s["samples"] == 20
    assert _keys(tmp_path / shard_name("w", 2)) == before
    assert not list(tmp_path.glob(".*tmp*"))
    calls.clear()
    s = write_shards(list(range(20)), _make(calls), tmp_path, prefix="w", samples_per_shard=6, progress=False)
    assert calls == [] and s["shards_written_this_run"] == 0
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(list(range(20)), _make(calls), tmp_path, prefix="w", samples_per_shard=5, progress=False)


def test_crash_inside_a_shard_leaves_no_partial_shard(tmp_path):
    kill = [True]

    def make(items):
        for i, rec in enumerate(synthetic_records(WORLD, items, (32, 32))):
            # while a shard is being written only its temp file exists
            assert not (tmp_path / shard_name("k", items[0] // 5)).exists()
            assert list(tmp_path.glob(f".k-{items[0] // 5:06d}.tar.tmp-*"))
            if kill[0] and items[0] == 5 and i == 3:
                raise Killed  # "killed" in the middle of shard 1
            yield rec

    with pytest.raises(Killed):
        write_shards(list(range(15)), make, tmp_path, prefix="k", samples_per_shard=5, progress=False)
    assert (tmp_path / shard_name("k", 0)).exists() and not (tmp_path / shard_name("k", 1)).exists()
    assert not list(tmp_path.glob(".*tmp*"))
    kill[0] = False
    s = write_shards(list(range(15)), make, tmp_path, prefix="k", samples_per_shard=5, progress=False, shard_ids=[1])
    assert s["shards_present"] == 2 and s["shards_written_this_run"] == 1  # an array task did shard 1 only
    s = write_synthetic_shards(str(tmp_path / "cli"), 7, 32, 48, samples_per_shard=3, progress=False)
    assert s["samples"] == 7 and s["num_shards"] == 3


def test_bad_records_are_counted_not_written(tmp_path):
    good = synthetic_records(WORLD, [0, 1], (32, 32))
    with pytest.raises(RecordError, match="no dots"):
        GroundedRecord("a.b", good[0].image, "c", [], []).validate()
    bad_size = GroundedRecord("bad_size", good[0].image, "a red thing", ["thing"], [np.ones((8, 8), np.uint8)])
    bad_count = GroundedRecord("bad_count", good[0].image, "a red thing", ["thing", "other"], [None])
    s = write_shards(
        [good[0], bad_size, None, bad_count, good[1]],
        lambda items: list(items),
        tmp_path,
        prefix="b",
        samples_per_shard=10,
        progress=False,
    )
    assert s["samples"] == 2 and s["failed"] == {"RecordError": 2, "no_record": 1}
    assert _keys(tmp_path / "b-000000.tar") == [good[0].key, good[1].key]
