"""Export the trained U-Net from a DeepSpeed (ZeRO) checkpoint as a diffusers pipeline directory.

The consolidated fp32 weights come from DeepSpeed's own `zero_to_fp32` helpers; the other
pipeline components come from the run's base model (`model.pretrained`, or `<run>/base_model`
that tiny runs write). The result loads with `StableDiffusionPipeline.from_pretrained(out)`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tcscale.config import load_config
from tcscale.models.sd import load_components, save_pipeline_dir
from tcscale.train.checkpoint import CheckpointError, latest_tag
from tcscale.train.safe_load import safe_torch_load


def consolidated_state_dict(ckpt_dir: Path, tag: str, allow_unsafe_load: bool = False) -> dict[str, torch.Tensor]:
    """fp32 U-Net state dict from a checkpoint tag (ZeRO 1/2/3 shards merged; stage 0 read directly). Every file
    is read weights-only (tcscale.train.safe_load) unless `allow_unsafe_load`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {tag_dir} not found")
    with safe_torch_load(allow_unsafe_load):
        if any(tag_dir.glob("*optim_states.pt")) and any("zero" in p.name for p in tag_dir.iterdir()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        else:
            files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file")
            state = torch.load(files[0], map_location="cpu")["module"]
    return {k: v.float() for k, v in state.items()}


def export_pipeline(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, tag: str | None = None, allow_unsafe_load: bool = False
) -> Path:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_config(run_dir / "config.yaml")
    ckpt_dir = run_dir / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to export (no 'latest' file)")
    state = consolidated_state_dict(ckpt_dir, tag, allow_unsafe_load)
    if cfg.model.pretrained is None:
        cfg.model.pretrained = str((run_dir / "base_model").resolve())
    comps = load_components(cfg.model, cfg.data.resolution)
    missing, unexpected = comps.unet.load_state_dict(state, strict=False)
    param_names = {n for n, _ in comps.unet.named_parameters()}
    if unexpected or any(m in param_names for m in missing):
        raise CheckpointError(
            f"checkpoint {ckpt_dir / tag} does not match the U-Net: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline_dir(comps, tmp, unet=comps.unet)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
