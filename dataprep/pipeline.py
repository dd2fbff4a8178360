"""Grounded-data pipeline: captions -> chosen caption -> noun phrases -> Grounded-SAM masks -> WebDataset shards.

Input (one of):
* a jsonl file, one image per line: {"id": str, "image": path, "captions": [str, ...]}; "caption" (one string)
  may replace "captions"; relative image paths are relative to the jsonl's folder; other fields are kept as the
  sample's `source`;
* a folder holding images and `captions.jsonl` with the same lines, where "id" may be left out (image file stem)
  and "file_name" may stand for "image".

The item list keeps the input's order and is cut into shards of `samples_per_shard` items: shard i holds items
[i*k, (i+1)*k), for the stage outputs and for the WebDataset shards alike (`dataprep.writer.write_shards`).
A run handles a set of shards (`shards: "0-9,12"`, or one SLURM array task's range, or all). Per shard each stage
writes `<work_dir>/<stage>/<prefix>-<shard>.jsonl` (temp name + rename); grounding also keeps one npz per item under
`<work_dir>/grounding/<prefix>-<shard>/`. Stages run all together or one at a time; a stage reuses the previous
stage's shard file and skips shards whose own output exists, and the writer skips finished `.tar` shards, so a
rerun after a kill does only what is missing. Models load lazily, once per process, only if some work needs them.

    python launchers/dataprep.py --config configs/dataprep_coco.yaml input=data/coco.jsonl out_dir=data/shards
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING
from PIL import Image

from dataprep.record import GroundedRecord
from dataprep.stages.caption_choice import CaptionChoiceConfig, ClipCaptionScorer, choose_captions
from dataprep.stages.common import Item, StageError, read_jsonl, write_jsonl_atomic
from dataprep.stages.grounding import (
    GroundingConfig,
    GroundingDinoDetector,
    SamHqSegmenter,
    ground_items,
    load_masks,
)
from dataprep.stages.noun_phrases import (
    FlairPosTagger,
    NounPhrasesConfig,
    TaggerNounPhraseExtractor,
    extract_noun_phrases,
)
from dataprep.writer import MASK_FORMATS, check_or_start_manifest, write_shards
from tcscale.config import merge_structured

log = logging.getLogger(__name__)

STAGES = ("caption_choice", "noun_phrases", "grounding", "shards")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


class DataprepConfigError(ValueError):
    """A dataprep config file or override is invalid; the message names the key."""


@dataclass
class DataprepConfig:
    input: str = MISSING  # image-caption jsonl, or a folder with images + captions.jsonl
    work_dir: str = MISSING  # per-stage intermediate outputs (jsonl per shard, grounding npz per item)
    out_dir: str = MISSING  # WebDataset shards
    prefix: str = "grounded"  # shard file prefix: <prefix>-000000.tar
    samples_per_shard: int = 1000  # items per shard (0.5-1 GB shards at COCO sizes)
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # subset of STAGES, run in pipeline order
    shards: str | None = None  # shard indices to process, e.g. "0-9,12"; null -> SLURM array range, else all
    shards_per_task: int = 1  # under a SLURM array job: task t processes shards [t*n, (t+1)*n)
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    mask_format: str = "packbits"  # masks.npz encoding: "packbits" | "uint8"
    jpeg_quality: int = 95  # only for inputs that are not JPEG already (JPEG bytes are stored untouched)
    progress: bool = True  # tqdm bars
    caption_choice: CaptionChoiceConfig = field(default_factory=CaptionChoiceConfig)
    noun_phrases: NounPhrasesConfig = field(default_factory=NounPhrasesConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DataprepConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, strict (an unknown key is an error naming it)."""
    return validate(merge_structured(DataprepConfig, path, tuple(overrides), DataprepConfigError))


def validate(cfg: DataprepConfig) -> DataprepConfig:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown or not cfg.stages:
        raise DataprepConfigError(f"config key 'stages': {unknown or '[]'} not in {list(STAGES)}")
    if cfg.samples_per_shard <= 0:
        raise DataprepConfigError(f"config key 'samples_per_shard' must be > 0, got {cfg.samples_per_shard}")
    if cfg.shards_per_task <= 0:
        raise DataprepConfigError(f"config key 'shards_per_task' must be > 0, got {cfg.shards_per_task}")
    if cfg.mask_format not in MASK_FORMATS:
        raise DataprepConfigError(f"config key 'mask_format': {cfg.mask_format!r} not in {list(MASK_FORMATS)}")
    g = cfg.grounding
    for name in ("box_threshold", "text_threshold"):
        if not 0.0 <= getattr(g, name) < 1.0:
            raise DataprepConfigError(f"config key 'grounding.{name}' must be in [0, 1), got {getattr(g, name)}")
    for name in ("caption_choice.batch_size", "noun_phrases.batch_size", "grounding.batch_size"):
        section, key = name.split(".")
        if getattr(getattr(cfg, section), key) < 1:
            raise DataprepConfigError(f"config key '{name}' must be >= 1")
    if cfg.shards is not None:
        parse_shard_spec(cfg.shards)
    return cfg


def parse_shard_spec(spec: str) -> list[int]:
    """ "0-3,7,9-10" -> [0, 1, 2, 3, 7, 9, 10]."""
    out: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise DataprepConfigError(f"config key 'shards': cannot parse {part!r} (use e.g. '0-9,12')")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise DataprepConfigError(f"config key 'shards': empty range {part!r}")
        out.update(range(lo, hi + 1))
    return sorted(out)


# ---------------------------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------------------------


def sample_key(item_id: str) -> str:
    """WebDataset key of an id: characters other than letters, digits, '_' and '-' become '_'."""
    return _KEY_BAD.sub("_", item_id)


def load_input(path: str | os.PathLike) -> list[Item]:
    """Read the image-caption collection (see module docstring) into items with absolute image paths."""
    path = Path(path)
    if path.is_dir():
        jsonl, root = path / "captions.jsonl", path
        if not jsonl.is_file():
            raise StageError(f"input folder {path} has no captions.jsonl")
    elif path.is_file():
        jsonl, root = path, path.parent
    else:
        raise StageError(f"config key 'input': not found: {path}")
    items: list[Item] = []
    keys: dict[str, str] = {}
    for lineno, row in enumerate(read_jsonl(jsonl), 1):
        where = f"{jsonl} line {lineno}"
        image = row.get("image", row.get("file_name"))
        if not isinstance(image, str) or not image:
            raise StageError(f"{where}: needs 'image' (or 'file_name'), a path")
        if "captions" in row:
            captions = row["captions"]
        elif "caption" in row:
            captions = [row["caption"]]
        else:
            raise StageError(f"{where}: needs 'captions' (a list) or 'caption' (a string)")
        well_formed = isinstance(captions, list) and all(isinstance(c, str) and c.strip() for c in captions)
        if not well_formed or not captions:
            raise StageError(f"{where}: 'captions' must be a non-empty list of non-empty strings")
        item_id = str(row.get("id", Path(image).stem))
        key = sample_key(item_id)
        if key in keys:
            raise StageError(f"{where}: id {item_id!r} gives sample key {key!r}, already used by id {keys[key]!r}")
        keys[key] = item_id
        extra = {k: v for k, v in row.items() if k not in ("id", "image", "file_name", "captions", "caption")}
        image_path = Path(image) if Path(image).is_absolute() else root / image
        items.append({"id": item_id, "key": key, "image": str(image_path), "captions": captions, "source": extra})
    if not items:
        raise StageError(f"{jsonl}: no items")
    return items


# ---------------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------------


def shards_for_run(cfg: DataprepConfig, num_shards: int, env: dict[str, str] | None = None) -> list[int]:
    """Shard indices of this run: `shards` if set; else the SLURM array task's range; else all."""
    return shard_indices(cfg.shards, num_shards, cfg.shards_per_task, env, name="config key 'shards'")


def shard_indices(
    spec: str | None, num_shards: int, shards_per_task: int, env: dict[str, str] | None = None, name: str = "--shards"
) -> list[int]:
    """Shard indices of a stage's run: `spec` ("0-3,7") if given; else the SLURM array task's range of
    `shards_per_task` shards; else all. An index out of range raises DataprepConfigError naming `name`."""
    env = dict(os.environ) if env is None else env
    if spec is not None:
        wanted = parse_shard_spec(spec)
    elif "SLURM_ARRAY_TASK_ID" in env:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        wanted = list(range(task * shards_per_task, (task + 1) * shards_per_task))
        wanted = [s for s in wanted if s < num_shards]  # the last task may be short or empty
        if not wanted:
            log.warning("SLURM array task %d has no shard (only %d shards)", task, num_shards)
    else:
        wanted = list(range(num_shards))
    bad = [s for s in wanted if not 0 <= s < num_shards]
    if bad:
        raise DataprepConfigError(f"{name}: {bad[:5]} out of range 0..{num_shards - 1}")
    return wanted


class Pipeline:
    """Runs the configured stages over a shard range; holds the models (loaded lazily, once)."""

    def __init__(self, cfg: DataprepConfig) -> None:
        self.cfg = cfg
        self.items = load_input(cfg.input)
        self.num_shards = max(1, math.ceil(len(self.items) / cfg.samples_per_shard))
        self.work_dir = Path(cfg.work_dir)
        self._scorer: ClipCaptionScorer | None = None
        self._extractor: TaggerNounPhraseExtractor | None = None
        self._detector: GroundingDinoDetector | None = None
        self._segmenter: SamHqSegmenter | None = None
        self.loaded: list[str] = []  # which models this process loaded (tests check resumed runs load none)
        self._check_manifest()

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _check_manifest(self) -> None:
        want = {"input": str(Path(self.cfg.input).resolve()), "num_items": len(self.items)}
        want["samples_per_shard"] = self.cfg.samples_per_shard
        check_or_start_manifest(
            self.work_dir / f"{self.cfg.prefix}-manifest.json",
            want,
            started="this work_dir was started",
            hint="use a new work_dir or the same input and samples_per_shard",
            error=DataprepConfigError,
        )

    def shard_items(self, shard: int) -> list[Item]:
        k = self.cfg.samples_per_shard
        return [dict(it) for it in self.items[shard * k : (shard + 1) * k]]

    def stage_path(self, stage: str, shard: int) -> Path:
        return self.work_dir / stage / f"{self.cfg.prefix}-{shard:06d}.jsonl"

    # -- models -----------------------------------------------------------------------------------------------
    @property
    def scorer(self) -> ClipCaptionScorer:
        if self._scorer is None:
            c = self.cfg.caption_choice
            self._scorer = ClipCaptionScorer(c.model, self.cfg.device, c.dtype)
            self.loaded.append("clip")
        return self._scorer

    @property
    def extractor(self) -> TaggerNounPhraseExtractor:
        if self._extractor is None:
            c = self.cfg.noun_phrases
            self._extractor = TaggerNounPhraseExtractor(FlairPosTagger(c.model, self.cfg.device, c.batch_size))
            self.loaded.append("flair")
        return self._extractor

    def grounding_models(self) -> tuple[GroundingDinoDetector, SamHqSegmenter]:
        g = self.cfg.grounding
        if self._detector is None:
            self._detector = GroundingDinoDetector(
                g.detector_checkpoint,
                g.detector_config,
                g.text_encoder,
                self.cfg.device,
                g.box_threshold,
                g.text_threshold,
                g.detector_image_size,
                g.detector_max_size,
                g.max_detections,
                g.allow_unsafe_load,
            )
            self.loaded.append("grounding_dino")
        if self._segmenter is None:
            self._segmenter = SamHqSegmenter(
                g.segmenter_type,
                g.segmenter_checkpoint,
                self.cfg.device,
                g.hq_token_only,
                g.max_boxes_per_call,
                g.allow_unsafe_load,
            )
            self.loaded.append("sam_hq")
        return self._detector, self._segmenter

    # -- stages -----------------------------------------------------------------------------------------------
    def stage_output(self, stage: str, shard: int) -> list[Item]:
        """The items of `shard` after `stage`: read its jsonl if present, else compute it (and its inputs)."""
        path = self.stage_path(stage, shard)
        if path.is_file():
            return read_jsonl(path)
        idx = STAGES.index(stage)
        upstream = self.shard_items(shard) if idx == 0 else self._upstream(STAGES[idx - 1], shard)
        out = self._run_stage(stage, shard, upstream)
        write_jsonl_atomic(path, out)
        return out

    def _upstream(self, stage: str, shard: int) -> list[Item]:
        path = self.stage_path(stage, shard)
        if path.is_file() or stage in self.cfg.stages:
            return self.stage_output(stage, shard)
        raise StageError(f"shard {shard}: stage {stage!r} output {path} is missing; run that stage first")

    def _run_stage(self, stage: str, shard: int, items: list[Item]) -> list[Item]:
        c, p = self.cfg, self.cfg.progress
        if stage == "caption_choice":
            items = [_check_image(it) for it in items]
            ok = [it for it in items if "error" not in it]
            needs_model = any(len(it["captions"]) > 1 for it in ok)
            chosen = choose_captions(ok, self.scorer if needs_model else None, c.caption_choice.batch_size, p)
            return _merge(items, chosen)
        ok = [it for it in items if "error" not in it]
        if stage == "noun_phrases":
            extractor = self.extractor if ok else None
            done = extract_noun_phrases(ok, extractor, c.noun_phrases.batch_size, p) if ok else []  # type: ignore[arg-type]
            return _merge(items, done)
        if stage == "grounding":
            out_dir = self.work_dir / "grounding" / f"{c.prefix}-{shard:06d}"
            try:  # a resumed shard whose items are all cached needs no model
                done = ground_items(ok, None, None, out_dir, c.grounding.batch_size, p)
            except StageError:
                det, seg = self.grounding_models()
                done = ground_items(ok, det, seg, out_dir, c.grounding.batch_size, p)
            return _merge(items, done)
        raise ValueError(f"not a jsonl stage: {stage}")

    def records(self, items: list[Item]) -> list[GroundedRecord | None]:
        """Grounded items -> records for the shard writer (None for items that failed upstream)."""
        out: list[GroundedRecord | None] = []
        for it in items:
            if "error" in it:
                log.warning("item %s not written: %s", it["id"], it["error"])
                out.append(None)
                continue
            out.append(
                GroundedRecord(
                    key=it["key"],
                    image=Path(it["image"]).read_bytes(),
                    caption=it["caption"],
                    phrases=list(it["phrases"]),
                    masks=load_masks(it),
                    source={"id": it["id"], "image": it["image"], **it.get("source", {})},
                    provenance=self.provenance(it),
                )
            )
        return out

    def provenance(self, item: Item) -> dict[str, Any]:
        c, g = self.cfg, self.cfg.grounding
        return {
            "caption_model": c.caption_choice.model if item.get("caption_scores") is not None else None,
            "caption_scores": item.get("caption_scores"),
            "noun_tagger": c.noun_phrases.model,
            "detector": f"GroundingDINO {Path(g.detector_config).stem if g.detector_config else 'SwinT-OGC'}",
            "detector_checkpoint": Path(g.detector_checkpoint).name,
            "segmenter": f"SAM-HQ {g.segmenter_type}",
            "segmenter_checkpoint": Path(g.segmenter_checkpoint).name,
            "box_threshold": g.box_threshold,
            "text_threshold": g.text_threshold,
            "multimask_output": False,
            "hq_token_only": g.hq_token_only,
            "max_detections": g.max_detections,
            "num_detections": item["grounding"]["num_detections"],
            "num_unmatched_detections": item["grounding"]["num_unmatched"],
        }

    def run(self) -> dict[str, Any]:
        """Run the configured stages over this run's shards; returns a small summary."""
        cfg = self.cfg
        shards = shards_for_run(cfg, self.num_shards)
        summary: dict[str, Any] = {"num_items": len(self.items), "num_shards": self.num_shards, "shards": shards}
        jsonl_stages = [s for s in STAGES[:-1] if s in cfg.stages]
        if "shards" not in cfg.stages:
            for shard in shards:
                for stage in jsonl_stages:
                    self.stage_output(stage, shard)
        else:
            k = cfg.samples_per_shard
            work = [(i // k, it) for i, it in enumerate(self.items)]  # writer cuts shards; carry the index along

            def make_records(chunk: Sequence[tuple[int, Item]]) -> list[GroundedRecord | None]:
                shard = chunk[0][0]
                return self.records(self._upstream("grounding", shard))

            summary["writer"] = write_shards(
                work,
                make_records,
                cfg.out_dir,
                prefix=cfg.prefix,
                samples_per_shard=k,
                shard_ids=shards,
                mask_format=cfg.mask_format,
                jpeg_quality=cfg.jpeg_quality,
                progress=cfg.progress,
                run_info={"stages": list(cfg.stages), "config": asdict(cfg)},
            )
        summary["models_loaded"] = list(self.loaded)
        return summary


def _check_image(item: Item) -> Item:
    """Mark an item whose image is missing or unreadable (header only) instead of failing the shard."""
    try:
        with Image.open(item["image"]) as im:
            im.verify()
    except Exception as exc:  # noqa: BLE001 - every decoder error marks the item
        item = dict(item)
        item["error"] = f"image {item['image']}: {type(exc).__name__}: {exc}"
        log.warning("item %s: %s", item["id"], item["error"])
    return item


def _merge(items: list[Item], done: list[Item]) -> list[Item]:
    """Put processed items back in order among the failed ones (which pass through unchanged)."""
    by_key = {it["key"]: it for it in done}
    return [by_key.get(it["key"], it) for it in items]
