"""The dataprep CLI end to end on real photos with the tiny CLIP / flair / Grounding DINO / SAM-HQ models:
stages one at a time, WebDataset shards read back, a rerun after a simulated kill completing only what is missing."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from PIL import Image

from tests.helpers.dataprep_models import PHOTOS, TinyModels

ROOT = Path(__file__).resolve().parents[1]


def _launcher():
    spec = importlib.util.spec_from_file_location("dataprep_launcher", ROOT / "launchers" / "dataprep.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(tiny: TinyModels, root: Path, input_path: Path) -> Path:
    cfg = {
        "input": str(input_path),
        "work_dir": str(root / "work"),
        "out_dir": str(root / "shards"),
        "samples_per_shard": 2,
        "device": "cpu",
        "progress": False,
        "caption_choice": {"model": str(tiny.clip_dir), "batch_size": 2},
        "noun_phrases": {"model": str(tiny.flair_tagger)},
        "grounding": {
            "detector_checkpoint": str(tiny.gdino_checkpoint),
            "text_encoder": str(tiny.bert_dir),
            "detector_image_size": 224,
            "detector_max_size": 400,
            "max_detections": 3,
            "segmenter_type": tiny.sam_model_type,
            "segmenter_checkpoint": str(tiny.sam_checkpoint),
            "batch_size": 2,
        },
    }
    path = root / "dataprep_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_dataprep_models, write_photos):
    """Stages run one at a time through the CLI: caption choice + noun phrases, then grounding, then shards."""
    tiny = tiny_dataprep_models
    root = tmp_path_factory.mktemp("dataprep_e2e")
    photos = write_photos(root / "images")
    lines = [{"image": p.name, "captions": PHOTOS[p.stem][1], "license": "skimage"} for p in photos]
    (root / "images" / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = _config(tiny, root, root / "images")
    launcher = _launcher()
    assert launcher.main(["--config", str(config), "--stages", "caption_choice,noun_phrases"]) == 0
    assert launcher.main(["--config", str(config), "--stages", "grounding"]) == 0
    assert launcher.main(["--config", str(config), "--stages", "shards"]) == 0
    return root, config, launcher


def _read_shards(out_dir: Path) -> dict[str, dict]:
    samples = {}
    for s in wds.WebDataset(str(out_dir / "grounded-{000000..000001}.tar"), shardshuffle=False):
        meta = json.loads(s["json"])
        with np.load(io.BytesIO(s["masks.npz"])) as z:
            shape = tuple(int(v) for v in z["shape"])
            masks = np.unpackbits(z["masks_packed"], axis=-1, count=shape[-1]).reshape(shape)
        samples[s["__key__"]] = {"meta": meta, "jpg": s["jpg"], "masks": masks, "url": s["__url__"]}
    return samples


def test_shards_read_back_with_webdataset(prepared) -> None:
    root, _, _ = prepared
    samples = _read_shards(root / "shards")
    assert sorted(samples) == ["astronaut", "chelsea", "coffee"]
    assert samples["coffee"]["url"].endswith("grounded-000001.tar")  # item order -> shard index
    nouns = {}
    for shard in (0, 1):
        for it in map(json.loads, (root / "work" / "grounding" / f"grounded-{shard:06d}.jsonl").open()):
            nouns[it["key"]] = it
    num_masks = 0
    for key, s in samples.items():
        meta, masks = s["meta"], s["masks"]
        image_path = root / "images" / f"{key}.jpg"
        assert s["jpg"] == image_path.read_bytes()  # the original JPEG bytes, untouched
        with Image.open(image_path) as im:
            size = (im.height, im.width)
        assert meta["caption"] in PHOTOS[key][1]
        assert [p["text"] for p in meta["phrases"]] == nouns[key]["phrases"]
        assert all(p["text"] in meta["caption"] for p in meta["phrases"])
        non_null = [p["mask"] for p in meta["phrases"] if p["mask"] is not None]
        assert non_null == list(range(len(non_null))) and meta["num_masks"] == len(non_null)
        assert masks.shape == (len(non_null), *size) and (meta["height"], meta["width"]) == size
        for p in meta["phrases"]:  # the shard's masks are the grounding stage's masks
            if p["mask"] is not None:
                assert masks[p["mask"]].any()
        prov = meta["provenance"]
        assert (prov["box_threshold"], prov["text_threshold"]) == (0.25, 0.25)
        assert prov["segmenter"] == "SAM-HQ vit_tiny" and prov["multimask_output"] is False
        assert (prov["caption_scores"] is None) == (len(PHOTOS[key][1]) == 1)
        assert meta["source"]["license"] == "skimage" and meta["source"]["id"] == key
        num_masks += len(non_null)
    assert num_masks > 0  # random models still ground something: the mask path is exercised
    summary = json.loads((root / "shards" / "grounded-summary.json").read_text())
    assert summary["samples"] == 3 and summary["shards_present"] == 2


def test_rerun_after_kill_completes_only_missing(prepared, monkeypatch, capsys) -> None:
    root, config, launcher = prepared
    work, out = root / "work", root / "shards"
    before = _read_shards(out)
    shard0 = out / "grounded-000000.tar"
    shard0_mtime = shard0.stat().st_mtime_ns
    astronaut_npz = work / "grounding" / "grounded-000000" / "astronaut.npz"
    astronaut_mtime = astronaut_npz.stat().st_mtime_ns

    # simulate a task killed while grounding shard 1 (array task 1): no shard, no stage output, no item cache,
    # temp files left behind; and shard 0 killed mid-grounding before its stage file was renamed into place
    (out / "grounded-000001.tar").unlink()
    (out / "grounded-000001.tar.stats.json").unlink()
    (out / ".grounded-000001.tar.tmp-4242").write_bytes(b"partial")
    shutil.rmtree(work / "grounding" / "grounded-000001")
    (work / "grounding" / "grounded-000001.jsonl").unlink()
    (work / "grounding" / ".grounded-000001.jsonl.abc.tmp").write_text("{partial")
    (work / "grounding" / "grounded-000000.jsonl").unlink()
    (work / "grounding" / "grounded-000000" / "chelsea.npz").unlink()

    # the requeued array task 1 runs all stages: only grounding of shard 1 and its shard are redone
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    capsys.readouterr()
    assert launcher.main(["--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["shards"] == [1] and report["slurm_array_task"] == "1"
    assert report["models_loaded"] == ["grounding_dino", "sam_hq"]  # CLIP / flair outputs were reused
    assert not (out / ".grounded-000001.tar.tmp-4242").exists()
    assert shard0.stat().st_mtime_ns == shard0_mtime
    after = _read_shards(out)
    assert after["coffee"]["meta"] == before["coffee"]["meta"]  # same models, same input -> same sample
    assert np.array_equal(after["coffee"]["masks"], before["coffee"]["masks"])

    # grounding of shard 0 alone: only the missing item is recomputed
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert launcher.main(["--config", str(config), "--stages", "grounding", "--shards", "0"]) == 0
    assert astronaut_npz.stat().st_mtime_ns == astronaut_mtime
    assert (work / "grounding" / "grounded-000000" / "chelsea.npz").is_file()
    regrounded = {it["key"]: it for it in map(json.loads, (work / "grounding" / "grounded-000000.jsonl").open())}
    assert regrounded["chelsea"]["grounding"]["mask_index"] == [p["mask"] for p in before["chelsea"]["meta"]["phrases"]]

    # everything done: a rerun loads no model and writes nothing
    capsys.readouterr()
    assert launcher.main(["--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["models_loaded"] == []
    summary = json.loads((out / "grounded-summary.json").read_text())
    assert summary["shards_written_this_run"] == 0 and summary["shards_skipped_existing"] == 2


def test_cli_plan_and_missing_stage_output(prepared, tmp_path: Path, capsys) -> None:
    root, config, launcher = prepared
    assert launcher.main(["--config", str(config), "--plan", "shards_per_task=2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan == {"num_items": 3, "num_shards": 2, "shards_per_task": 2, "array": "0-0"}
    fresh = [f"work_dir={tmp_path / 'w'}", f"out_dir={tmp_path / 'o'}"]
    assert launcher.main(["--config", str(config), "--stages", "shards", *fresh]) == 2
    err = capsys.readouterr().err
    assert "stage 'noun_phrases' output" in err or "stage 'grounding' output" in err
    assert "grounded-000000.jsonl is missing" in err
    assert launcher.main(["--config", str(config), "grounding.box_thresh=0.1"]) == 2
    assert "grounding.box_thresh" in capsys.readouterr().err
    # the work_dir was started with samples_per_shard=2: resuming it with 3 would misnumber every shard
    assert launcher.main(["--config", str(config), "--stages", "shards", "samples_per_shard=3"]) == 2
    err = capsys.readouterr().err
    assert "grounded-manifest.json: samples_per_shard was 2 when this work_dir was started, now 3" in err
