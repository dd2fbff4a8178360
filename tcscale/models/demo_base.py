"""The demo's shipped base model: a tiny text-to-image pipeline pretrained on the synthetic shapes world.

`make demo-base` (launchers/demo_base.py) pretrains it and `ship_demo_base` writes it into the package
(``tcscale/demo_base/``, package data): the U-Net and the text encoder as fp16 safetensors, the exact
space-to-depth "VAE", the scheduler, model_index.json and the model card (README.md). No tokenizer files: the SD1.x
CLIP tokenizer is built offline from open_clip's vocabulary (`tcscale.models.tokenizer`), which keeps the package
small (the text encoder's 49,408-token embedding table is most of its bytes; fp16 halves them).

`materialise_demo_base(out)` rebuilds the complete fp32 pipeline directory that `model.pretrained` (training) and
`model.pretrained` (eval) load: the weights upcast to fp32, the tokenizer written beside them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

SHIPPED = Path(__file__).resolve().parents[1] / "demo_base"
_PARTS = ("unet", "text_encoder", "vae", "scheduler")


class DemoBaseError(RuntimeError):
    """The shipped base is missing or incomplete; the message names the file."""


def shipped_demo_base(src: Path = SHIPPED) -> Path:
    """The base directory `src` (default: the package's), checked for every part `materialise_demo_base` reads."""
    needed = [src / "model_index.json"] + [src / p / "config.json" for p in _PARTS[:3]]
    needed.append(src / "scheduler" / "scheduler_config.json")
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise DemoBaseError(f"the shipped demo base is incomplete: {missing[0]} not found (make demo-base writes it)")
    return src


def materialise_demo_base(out_dir: str | os.PathLike, src: Path = SHIPPED) -> Path:
    """The shipped base (`src`) as a complete fp32 diffusers pipeline directory at `out_dir` (temp name, then
    rename)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from tcscale.models.sd import SDComponents, save_pipeline_dir
    from tcscale.models.space_to_depth import SpaceToDepthAutoencoder
    from tcscale.models.tokenizer import sd_clip_tokenizer

    src = shipped_demo_base(src)
    comps = SDComponents(
        unet=UNet2DConditionModel.from_pretrained(str(src / "unet"), torch_dtype=torch.float32),
        vae=SpaceToDepthAutoencoder.from_pretrained(str(src / "vae")),
        text_encoder=CLIPTextModel.from_pretrained(str(src / "text_encoder"), dtype=torch.float32),
        tokenizer=sd_clip_tokenizer(),
        noise_scheduler=DDPMScheduler.from_pretrained(str(src / "scheduler")),
    )
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline_dir(comps, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def ship_demo_base(
    run_dir: str | os.PathLike, tag: str, summary: dict, dest: Path = SHIPPED, ema: bool = False
) -> Path:
    """Write checkpoint `tag` of the pretraining run into `dest` (see `write_shipped`); `ema`: its EMA weights."""
    from tcscale.train.export import load_trained_components

    return write_shipped(load_trained_components(run_dir, tag, ema=ema), summary, dest)


def write_shipped(comps, summary: dict, dest: Path = SHIPPED) -> Path:
    """fp16 U-Net and text encoder, the VAE and scheduler configs, model_index.json without the tokenizer, and
    `summary` (how it was made) as provenance.json; a model card already at `dest` is kept."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    comps.unet.to(torch.float16).save_pretrained(str(tmp / "unet"), safe_serialization=True)
    comps.text_encoder.to(torch.float16).save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
    comps.vae.save_pretrained(str(tmp / "vae"))
    comps.noise_scheduler.save_pretrained(str(tmp / "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["tcscale.models.space_to_depth", "SpaceToDepthAutoencoder"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")
    (tmp / "provenance.json").write_text(json.dumps(summary, indent=1) + "\n")
    card = dest / "README.md"
    if card.is_file():  # the model card is written by hand from the measured run; keep it
        shutil.copy2(card, tmp / "README.md")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest
