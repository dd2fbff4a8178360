"""Reload an export in diffusers / transformers as a user would, generate one tiny image, and say how it differs
from the base model: `python -m tests.helpers.realshape_reload KIND EXPORT BASE` prints one JSON object.

KIND: `pipeline` (a full pipeline export), `lora` (an adapter: the base pipeline + `load_lora_weights`),
`text_encoder` (a CLIPTextModel export, swapped into the base pipeline). Run in its own process by the realshape
tests so its memory is measured alone and freed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _pipeline_cls(folder: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = json.loads((folder / "model_index.json").read_text())
    return StableDiffusionXLPipeline if "XL" in index["_class_name"] else StableDiffusionPipeline


def _load(folder: Path):
    cls = _pipeline_cls(folder)
    extra = {"add_watermarker": False} if "XL" in cls.__name__ else {"safety_checker": None}
    return cls.from_pretrained(str(folder), **extra)


def _differing(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    other = dict(b.named_parameters())
    return [n for n, p in a.named_parameters() if not torch.equal(p, other[n])]


def _generate(pipe) -> list[int]:
    image = pipe(
        "a photo of a cat and a wine glass",
        height=64,
        width=64,
        num_inference_steps=1,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    if not bool(torch.isfinite(torch.as_tensor(image)).all()):
        raise SystemExit("the generated image holds non-finite values")
    return list(image.shape)


def main(kind: str, export: str, base: str) -> dict:
    export_dir, base_dir = Path(export), Path(base)
    out: dict = {"kind": kind}
    if kind == "pipeline":
        pipe, ref = _load(export_dir), _load(base_dir)
        out["differing"] = _differing(pipe.unet, ref.unet)
        out["unet_params"] = sum(p.numel() for p in pipe.unet.parameters())
        del ref
    elif kind == "lora":
        from tcscale.models.lora import WEIGHT_NAME

        info = json.loads((export_dir / "tcscale_lora.json").read_text())
        out["base_model"] = info["base_model"]
        pipe = _load(Path(info["base_model"]))
        pipe.load_lora_weights(str(export_dir), weight_name=WEIGHT_NAME)
        lora_b = [p for n, p in pipe.unet.named_parameters() if ".lora_B." in n]
        out["lora_layers"] = len(lora_b)
        out["lora_b_nonzero"] = sum(int(bool(p.abs().max() > 0)) for p in lora_b)
    elif kind == "text_encoder":
        from transformers import CLIPTextModel

        pipe = _load(base_dir)
        trained = CLIPTextModel.from_pretrained(str(export_dir))
        out["differing"] = _differing(trained, pipe.text_encoder)
        pipe.text_encoder = trained
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    out["image_shape"] = _generate(pipe)
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:4])))
