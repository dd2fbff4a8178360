"""Evaluation configuration: dataclass schema <- configs/eval/<name>.yaml <- `key=value` overrides, strict.

One evaluation run evaluates one model on the enabled suites (`tcscale.eval.suites.SUITES`, one section each) and
writes `<output_dir>/results.json`. Inference defaults are the papers': PNDM, 50 steps, CFG 7.5, the model's native
resolution, fp32 (the official TokenCompose generation runs fp32), safety checker off, one recorded seed per (suite,
prompt, round). A generating suite's `dtype` (null: `model.dtype`) sets its sampling precision; the precision each
suite ran in is recorded in results.json ("protocol"), MLflow and compare's table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from tcscale.config import ConfigError, merge_structured
from tcscale.eval.daam import DaamCocoGenConfig
from tcscale.eval.grounding_maps import GroundingEvalConfig
from tcscale.eval.suites import SUITES

Precision = Literal["fp32", "fp16", "bf16"]
SchedulerName = Literal["pndm", "ddim", "dpm", "euler", "model"]


@dataclass
class EvalModelConfig:
    pretrained: str | None = None  # diffusers pipeline: hub id or local dir (base SD, or a tcscale export)
    run_dir: str | None = None  # a tcscale run directory: its checkpoint `tag` is exported and evaluated
    tag: str | None = None  # checkpoint tag of run_dir (null: latest)
    text_encoder: str | None = None  # a CLIPTextModel dir (or a pipeline dir holding text_encoder/) swapped in
    revision: str | None = None  # hub revision for `pretrained`
    variant: str | None = None  # weights variant for `pretrained`, e.g. "fp16"
    dtype: Precision = "fp32"  # sampling precision on a GPU (CPU always runs fp32); a suite's `dtype` overrides it


@dataclass
class SamplerConfig:
    scheduler: SchedulerName = "pndm"  # PNDM as the papers; "model": the pipeline's own scheduler
    num_inference_steps: int = 50  # sampler steps
    guidance_scale: float = 7.5  # classifier-free guidance
    resolution: int | None = None  # image side in px; null: the U-Net's native size (512 SD1.4, 768 SD2.1)
    batch_size: int = 8  # images per pipeline call on one rank


@dataclass
class MultiGenConfig:
    enabled: bool = False
    dtype: Precision | None = None  # sampling precision of this suite (null: model.dtype)
    sets: list[str] = field(default_factory=lambda: ["coco", "ade20k"])  # shipped set names or prompt file paths
    rounds: int = 10  # images per prompt (the paper: 10)
    limit: int | None = None  # evaluate the first N prompts of each set (null: all 1,000)
    detector: str = "google/owlv2-large-patch14-ensemble"  # OWLv2 hub id or local dir
    threshold: float = 0.1  # a category is present above this detection score (strict)
    detector_batch_size: int = 8  # images per detector forward


@dataclass
class VisorConfig:
    enabled: bool = False
    dtype: Precision | None = None  # sampling precision of this suite (null: model.dtype)
    rounds: int = 4  # images per prompt (VISOR: 4)
    limit: int | None = None  # evaluate the first N prompts (null: all 25,280 ordered pairs x relations)
    detector: str = "google/owlvit-base-patch32"  # OWL-ViT hub id or local dir
    threshold: float = 0.1  # detection score threshold
    detector_batch_size: int = 8
    clip_boxes: bool = False  # clip detector boxes to the image (VISOR's code does not; centres may then move)


@dataclass
class FIDCommon:
    """What both FID suites share: generated images of sampled image-caption pairs against the real images."""

    enabled: bool = False
    dtype: Precision | None = None  # sampling precision of this suite (null: model.dtype)
    images_dir: str | None = None  # the real images (file names as in the annotations)
    caption_list: str | None = None  # a pair list written before (<output_dir>/<suite>/captions.json), reused as is
    num_images: int = 10000  # image-caption pairs sampled, one generated image each
    reference: Literal["images", "pairs"] = "images"  # real side: each sampled image once, or once per pair
    stats_cache: str | None = None  # directory of cached real statistics (null: <output_dir>/fid_stats)
    weights_dir: str | None = None  # folder with clean-fid's inception-2015-12-05.pt (null: $TCSCALE_FID_WEIGHTS)
    name: str = "coco10k"  # metric name: fid/<name>


@dataclass
class FIDConfig(FIDCommon):
    """FID (C): pairs sampled from a COCO captions file (val2014 or val2017; docs/FIDELITY.md)."""

    captions_json: str | None = None  # COCO captions_val2014.json / captions_val2017.json


@dataclass
class FlickrFIDConfig(FIDCommon):
    """FID (F): pairs sampled from a Flickr30K Entities split (tcscale.eval.flickr30k imports it)."""

    entities_dir: str | None = None  # Flickr30K Entities: Sentences/ and <split>.txt (annotations/ may hold them)
    split: Literal["train", "val", "test"] = "val"  # the paper: the validation split
    num_images: int = 1000
    name: str = "flickr30k1k"


@dataclass
class SyntheticEvalConfig:
    enabled: bool = False
    dtype: Precision | None = None  # sampling precision of this suite (null: model.dtype)
    num_objects: list[int] = field(default_factory=lambda: [2, 3])  # objects per prompt, one prompt set each
    num_prompts: int = 16  # prompts per object count
    split: Literal["train", "held_out"] = "held_out"  # prompts naming a held-out colour/shape combo
    rounds: int = 4  # images per prompt


@dataclass
class SepEnEvalConfig:
    """The Separate-and-Enhance protocol (docs/DESIGN.md §8): pair prompts, seeds 0..N-1, CFG 6.0, every object detected
    above the setting's threshold; text-text similarity of a BLIP caption against the prompt."""

    enabled: bool = False
    dtype: Precision | None = None  # sampling precision of this suite (null: model.dtype)
    setting: Literal["individual", "large_scale"] = "individual"  # detection threshold 0.7 | 0.3
    concepts: str = "pairs"  # "pairs" (the 22 pairs) | "large" (COCO nouns, split below) | a noun file
    split: Literal["seen", "unseen", "all"] = "unseen"  # large / file concepts: which nouns form the pairs
    num_pairs: int | None = None  # evaluate the first N pairs (null: all)
    images_per_prompt: int = 64  # seeds 0..N-1 (the paper: 64)
    guidance_scale: float = 6.0  # the paper's CFG for this protocol
    detector: str = "google/owlv2-large-patch14-ensemble"  # stands in for Detic (not installable)
    captioner: str | None = "Salesforce/blip-image-captioning-base"  # null: no text-text similarity
    text_model: str = "openai/clip-vit-base-patch16"  # CLIP whose text embeddings compare caption and prompt
    detector_batch_size: int = 8


@dataclass
class LatencyConfig:
    enabled: bool = False
    dtype: Precision | None = None  # sampling precision of this suite (null: model.dtype)
    prompts: int = 4  # timed pipeline calls (batch 1) after one warm-up
    base: str | None = None  # a base pipeline timed the same way (e.g. CompVis/stable-diffusion-v1-4)


@dataclass
class EvalTrackingConfig:
    enabled: bool = True  # log to MLflow on rank 0
    uri: str | None = None  # null: the training run's (parent_run_dir), $MLFLOW_TRACKING_URI, or <output_dir>
    experiment: str | None = None  # null: the parent run's experiment, else "tcscale-eval"
    parent_run_id: str | None = None  # nest the evaluation under this MLflow run
    parent_run_dir: str | None = None  # ... or under the run of this tcscale run directory (its run.json)


@dataclass
class EvalConfig:
    name: str = "eval"  # the evaluation's name (MLflow run name, results.json "name")
    output_dir: str = "runs/eval"  # images/, detections/, results.json, table.md
    seed: int = 0  # eval seed: each image's seed derives from (seed, suite, prompt id, round)
    # cuda: one GPU per rank, refused (exit 2) where no GPU is visible; cpu: CPU ranks even beside a GPU
    device: Literal["cuda", "cpu"] = "cuda"
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    multigen: MultiGenConfig = field(default_factory=MultiGenConfig)
    visor: VisorConfig = field(default_factory=VisorConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    fid_flickr30k: FlickrFIDConfig = field(default_factory=FlickrFIDConfig)
    grounding: GroundingEvalConfig = field(default_factory=GroundingEvalConfig)
    daam_cocogen: DaamCocoGenConfig = field(default_factory=DaamCocoGenConfig)
    synthetic: SyntheticEvalConfig = field(default_factory=SyntheticEvalConfig)
    sepen: SepEnEvalConfig = field(default_factory=SepEnEvalConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    tracking: EvalTrackingConfig = field(default_factory=EvalTrackingConfig)


def validate_eval(cfg: EvalConfig) -> EvalConfig:
    """Checks beyond types; raises ConfigError naming the key."""
    m = cfg.model
    if (m.pretrained is None) == (m.run_dir is None):
        raise ConfigError("model: set exactly one of model.pretrained (a pipeline) or model.run_dir (a tcscale run)")
    positive = {
        "sampler.num_inference_steps": cfg.sampler.num_inference_steps,
        "sampler.batch_size": cfg.sampler.batch_size,
        "multigen.rounds": cfg.multigen.rounds,
        "visor.rounds": cfg.visor.rounds,
        "fid.num_images": cfg.fid.num_images,
        "fid_flickr30k.num_images": cfg.fid_flickr30k.num_images,
        "grounding.num_samples": cfg.grounding.num_samples,
        "grounding.batch_size": cfg.grounding.batch_size,
        "synthetic.num_prompts": cfg.synthetic.num_prompts,
        "synthetic.rounds": cfg.synthetic.rounds,
        "sepen.images_per_prompt": cfg.sepen.images_per_prompt,
        "latency.prompts": cfg.latency.prompts,
        "daam_cocogen.num_inference_steps": cfg.daam_cocogen.num_inference_steps,
        "daam_cocogen.inner_steps": cfg.daam_cocogen.inner_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if cfg.sampler.resolution is not None and cfg.sampler.resolution % 8:
        raise ConfigError(f"sampler.resolution must be a multiple of 8, got {cfg.sampler.resolution}")
    for key in ("multigen.threshold", "visor.threshold", "grounding.threshold", "daam_cocogen.threshold"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {value}")
    if cfg.grounding.enabled and cfg.grounding.source == "webdataset" and not cfg.grounding.shards:
        raise ConfigError("grounding.shards must name held-out shards when grounding.source=webdataset")
    if any(t < 0 or t >= 1000 for t in cfg.grounding.timesteps) or not cfg.grounding.timesteps:
        raise ConfigError(f"grounding.timesteps must be a non-empty list in [0, 1000), got {cfg.grounding.timesteps}")
    if any(k < 1 for k in cfg.synthetic.num_objects):
        raise ConfigError(f"synthetic.num_objects must be >= 1 each, got {cfg.synthetic.num_objects}")
    if cfg.fid.enabled and not (cfg.fid.images_dir and (cfg.fid.captions_json or cfg.fid.caption_list)):
        raise ConfigError("fid: set fid.images_dir and fid.captions_json (or fid.caption_list) to compute FID")
    fl = cfg.fid_flickr30k
    if fl.enabled and not (fl.images_dir and (fl.entities_dir or fl.caption_list)):
        raise ConfigError(
            "fid_flickr30k: set fid_flickr30k.images_dir and fid_flickr30k.entities_dir (or .caption_list)"
        )
    if cfg.fid.enabled and fl.enabled and cfg.fid.name == fl.name:
        raise ConfigError(f"fid.name and fid_flickr30k.name are both {fl.name!r}: the metrics would collide")
    if cfg.daam_cocogen.enabled and not cfg.daam_cocogen.data_dir:
        raise ConfigError("daam_cocogen.data_dir must name DAAM's COCO-Gen folder when daam_cocogen.enabled")
    names = [s.name for s in SUITES]
    if not any(getattr(cfg, s).enabled for s in names):
        raise ConfigError(f"nothing to evaluate: enable one of {', '.join(s + '.enabled' for s in names)}")
    return cfg


def load_eval_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> EvalConfig:
    """Merge schema defaults <- YAML <- overrides strictly, and validate."""
    return validate_eval(merge_structured(EvalConfig, path, overrides))
