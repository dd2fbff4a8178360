"""Images for the evaluations: the diffusers pipeline a user would use, each (prompt, round) exactly once, resumable.

* `load_pipeline`: `StableDiffusionPipeline.from_pretrained` (a base SD checkpoint, a tcscale export, optionally a
  finetuned text encoder swapped in), the safety checker off (a black image would be a silent miss), the sampler
  of the config (PNDM by default, as the papers).
* `GenItem`: one image to make — a key (the file stem), the prompt, its seed (a pure function of the eval seed, the
  suite, the prompt id and the round: `image_seed`) and what the scorer needs later (`meta`).
* `generate_missing`: a rank makes the images of its items (`items[rank::world]`) that are not on disk yet, in
  batches with one generator per image (so an image does not depend on its batch-mates), written to a temp name
  then renamed; an unreadable file left by a killed run is regenerated and counted. Each generated image is
  appended to `generated-rank<R>.jsonl` (key, seed, rank), so which rank made what is on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tcscale.eval.config import EvalModelConfig, SamplerConfig


class EvalInputError(ValueError):
    """A model, prompt file or data path of the evaluation is unusable; the message names it."""


@dataclass(frozen=True)
class GenItem:
    key: str  # unique file stem within the suite
    prompt: str
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)  # prompt_id, round, objects, ... for the scorer


@dataclass
class GenStats:
    generated: int = 0  # images this rank made now
    existing: int = 0  # images of this rank found on disk and readable (a resumed run)
    unreadable: int = 0  # files found on disk but unreadable: removed and regenerated


def image_seed(eval_seed: int, suite: str, prompt_id: Any, round_: int) -> int:
    """A 63-bit seed from (eval seed, suite, prompt id, round): stable across machines, Python versions, world
    sizes and batch sizes."""
    digest = hashlib.sha256(f"{eval_seed}/{suite}/{prompt_id}/{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rank_items(items: Sequence[GenItem], rank: int, world_size: int) -> list[GenItem]:
    """The items of one rank: every world_size-th, from position `rank` (each item on exactly one rank)."""
    return list(items[rank::world_size])


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    os.replace(tmp, path)


def write_items(path: Path, items: Sequence[GenItem]) -> None:
    """The suite's full item list with seeds (rank 0 writes it before generating): which seed made which image."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for it in items:
            f.write(json.dumps({"key": it.key, "prompt": it.prompt, "seed": it.seed, **it.meta}) + "\n")
    os.replace(tmp, path)


def readable_image(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any decoding failure means "make it again"
        return False


def precision_name(name: str, device: torch.device | str) -> str:
    """The precision that actually runs for a requested one: itself on a GPU, "fp32" on a CPU (fp16/bf16 inference
    is slow or unsupported there)."""
    return name if torch.device(device).type == "cuda" else "fp32"


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision_name(name, device)]


def load_pipeline(
    path: str, model: EvalModelConfig, sampler: SamplerConfig, device: torch.device | str, *, dtype: str | None = None
):
    """The pipeline to evaluate, on `device`, safety checker off, with the configured sampler, in precision `dtype`
    ("fp32" / "fp16" / "bf16"; null: `model.dtype`; a CPU always runs fp32)."""
    device = torch.device(device)
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    local = Path(path).expanduser()
    if (path.startswith((".", "/", "~")) or os.sep in path) and not local.is_dir():
        raise EvalInputError(f"model: pipeline directory not found: {path}")
    dtype = torch_dtype(dtype or model.dtype, device)
    # a LoRA export (tcscale.models.lora.save_lora_dir): its base pipeline, then the adapter on top
    from tcscale.models.lora import INFO_NAME, WEIGHT_NAME

    adapter = local if local.is_dir() and (local / INFO_NAME).is_file() else None
    if adapter is not None:
        path = json.loads((adapter / INFO_NAME).read_text())["base_model"]
        local = Path(path).expanduser()
    # the family's pipeline class (StableDiffusionPipeline, StableDiffusionXLPipeline, ...), from model_index.json
    from tcscale.families import pipeline_family

    ref = str(local) if local.is_dir() else path
    try:
        family = pipeline_family(ref, model.revision)
    except ValueError as exc:
        raise EvalInputError(f"model: {exc}") from None
    try:
        pipe = family.pipeline_cls().from_pretrained(
            ref, torch_dtype=dtype, revision=model.revision, variant=model.variant, **family.load_pipeline_kwargs()
        )
    except (OSError, ValueError) as exc:
        raise EvalInputError(f"model: cannot load a {family.pipeline_class} from {path!r}: {exc}") from exc
    if adapter is not None:
        pipe.load_lora_weights(str(adapter), weight_name=WEIGHT_NAME)
    if model.text_encoder is not None:
        from transformers import CLIPTextModel

        from tcscale.models.sd import text_encoder_dir

        folder = text_encoder_dir(model.text_encoder)  # a CLIPTextModel dir, or a pipeline dir's text_encoder/
        if not folder.is_dir():
            raise EvalInputError(f"model.text_encoder: directory not found: {model.text_encoder}")
        pipe.text_encoder = CLIPTextModel.from_pretrained(str(folder), torch_dtype=dtype)
    schedulers = {
        "pndm": PNDMScheduler,
        "ddim": DDIMScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
    }
    if sampler.scheduler != "model" and family.flow_matching:
        raise EvalInputError(
            f"sampler.scheduler={sampler.scheduler!r}: a {family.pipeline_class} is a flow-matching model, which the "
            "listed DDPM samplers do not sample; set sampler.scheduler=model"
        )
    if sampler.scheduler != "model":
        pipe.scheduler = schedulers[sampler.scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def native_resolution(pipe) -> int:
    """The denoiser's training resolution in px (its sample_size, a latent side, x the VAE factor)."""
    from tcscale.families import family_of_pipeline

    return int(family_of_pipeline(pipe).denoiser(pipe).config.sample_size) * int(pipe.vae_scale_factor)


def generate_missing(
    pipe,
    items: Sequence[GenItem],
    image_dir: Path,
    sampler: SamplerConfig,
    *,
    rank: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> GenStats:
    """Make the images of `items` (this rank's) that are not on disk; see the module docstring."""
    from tqdm import tqdm

    image_dir.mkdir(parents=True, exist_ok=True)
    stats = GenStats()
    todo = []
    for it in items:
        path = image_dir / f"{it.key}.png"
        (image_dir / f".{it.key}.png.tmp").unlink(missing_ok=True)  # a killed run's half-written temp file
        if path.exists():
            if readable_image(path):
                stats.existing += 1
                continue
            path.unlink()
            stats.unreadable += 1
        todo.append(it)
    resolution = sampler.resolution or native_resolution(pipe)
    log(
        f"rank {rank}: {image_dir.parent.name}: {len(todo)} of {len(items)} images to generate "
        f"({stats.existing} on disk, {stats.unreadable} unreadable regenerated), {resolution} px, "
        f"{sampler.num_inference_steps} steps"
    )
    manifest = image_dir.parent / f"generated-rank{rank}.jsonl"
    device = pipe.device
    bar = tqdm(total=len(todo), desc=f"generate {image_dir.parent.name} r{rank}", disable=not progress, leave=False)
    for start in range(0, len(todo), sampler.batch_size):
        chunk = todo[start : start + sampler.batch_size]
        gens = [torch.Generator(device=device).manual_seed(it.seed) for it in chunk]
        t0 = time.perf_counter()
        images = pipe(
            [it.prompt for it in chunk],
            height=resolution,
            width=resolution,
            num_inference_steps=sampler.num_inference_steps,
            guidance_scale=sampler.guidance_scale,
            generator=gens,
        ).images
        seconds = (time.perf_counter() - t0) / len(chunk)
        with open(manifest, "a") as f:
            for it, image in zip(chunk, images):
                final = image_dir / f"{it.key}.png"
                tmp = image_dir / f".{it.key}.png.tmp"
                image.save(tmp, format="PNG")
                os.replace(tmp, final)
                f.write(json.dumps({"key": it.key, "seed": it.seed, "rank": rank, "s_per_image": seconds}) + "\n")
                f.flush()
                stats.generated += 1
        bar.update(len(chunk))
        log(f"rank {rank}: generated {stats.generated}/{len(todo)} ({image_dir.parent.name})")
    bar.close()
    return stats


def detect_missing(
    detector: Callable,
    items: Sequence[GenItem],
    image_dir: Path,
    det_dir: Path,
    *,
    batch_size: int = 8,
    categories: Callable[[GenItem], list[str]] = lambda it: list(it.meta["objects"]),
) -> int:
    """Detections of this rank's images that are not on disk yet, one JSON per image (temp name, then rename).
    Returns how many images were run through the detector."""
    det_dir.mkdir(parents=True, exist_ok=True)
    todo = [it for it in items if not (det_dir / f"{it.key}.json").exists()]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        images = []
        for it in chunk:
            with Image.open(image_dir / f"{it.key}.png") as im:
                images.append(im.convert("RGB"))
        results = detector(images, [categories(it) for it in chunk])
        for it, det in zip(chunk, results):
            write_json_atomic(det_dir / f"{it.key}.json", {"key": it.key, **it.meta, **det})
    return len(todo)


def read_detections(items: Sequence[GenItem], det_dir: Path) -> list[dict]:
    """Every item's stored detections (rank 0, after all ranks finished); a missing file is an error naming it."""
    out = []
    for it in items:
        path = det_dir / f"{it.key}.json"
        if not path.is_file():
            raise EvalInputError(f"detections missing for {it.key} ({path}): did every rank finish?")
        out.append(json.loads(path.read_text()))
    return out
