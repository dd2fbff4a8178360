"""LoRA adapters on the U-Net through peft, saved and loaded in diffusers' LoRA format.

The adapters are injected the way diffusers' own `train_text_to_image_lora.py` does: the whole U-Net is frozen,
`unet.add_adapter(peft.LoraConfig(...))` (diffusers' `PeftAdapterMixin`, i.e. `peft.inject_adapter_in_model`)
wraps every targeted `nn.Linear` in a `peft.tuners.lora.Linear` that keeps the original as `base_layer` and adds
`lora_A` / `lora_B`; only those are trainable. The U-Net stays a `UNet2DConditionModel` (no `PeftModel` wrapper),
so the grounding attention processors, gradient checkpointing and the DeepSpeed engine see the same module tree;
a checkpoint's state dict names `...to_q.base_layer.weight` and `...to_q.lora_A.default.weight`.

Export (`save_lora_dir`): `get_peft_model_state_dict` -> `convert_state_dict_to_diffusers` ->
`<Pipeline>.save_lora_weights` with the adapter config as metadata (so alpha != rank round-trips), which
`pipe.load_lora_weights(dir)` reads; `merge_lora` folds the adapters into the base weights (diffusers' `fuse_lora`
then `unload_lora`) for a plain full U-Net.

Defaults per objective live on the objective class (`lora_target_modules`): the U-Net attention projections for
TokenCompose / LDM-only, `attn2.to_k` for SepEn (the set the paper trains). Names are peft's suffix match: "to_q"
wraps every `*.to_q`, "attn2.to_k" only the cross-attention keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tcscale.config import TrainConfig
    from tcscale.models.config import LoRAConfig

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "default"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name; load_lora_weights(dir) finds it
INFO_NAME = "tcscale_lora.json"  # base model, family and adapter settings of an exported adapter
_TAG_LORA_INIT = 307  # keeps the adapter-init seed apart from the run's other derived seeds


def lora_target_modules(cfg: TrainConfig) -> list[str]:
    """The module suffixes a run adapts: `model.lora.target_modules`, or the objective's default."""
    from tcscale.objectives import OBJECTIVES

    if cfg.model.lora.target_modules is not None:
        return list(cfg.model.lora.target_modules)
    return list(OBJECTIVES[cfg.objective.name].build.lora_target_modules)


def peft_lora_config(lora: LoRAConfig, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        lora_dropout=lora.dropout,
        init_lora_weights="gaussian" if lora.init == "gaussian" else True,
        target_modules=target_modules,
    )


def add_lora(unet: torch.nn.Module, lora: LoRAConfig, target_modules: list[str], seed: int = 0) -> None:
    """Freeze `unet` and inject LoRA adapters (trainable) into the modules named by `target_modules`. The adapter
    init draws from a generator seeded by `seed`, so every rank (and an export) builds the same adapters."""
    from tcscale.data.loader import derive_seed

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _TAG_LORA_INIT, 0))
        try:
            unet.add_adapter(peft_lora_config(lora, target_modules), adapter_name=ADAPTER_NAME)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            raise ValueError(f"model.lora.target_modules={target_modules}: {exc}") from None
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name)


def apply_lora(objective, cfg: TrainConfig) -> None:
    """`model.lora` on a built objective: adapters on its U-Net (`objective.module`), after the objective chose
    its own trainable set (which the adapters replace)."""
    add_lora(objective.module, cfg.model.lora, lora_target_modules(cfg), seed=cfg.seed)


def adapter_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers' key format (what `save_lora_weights` writes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))


def save_lora_dir(unet: torch.nn.Module, out_dir: str | os.PathLike, *, family: str, base_model: str, lora) -> Path:
    """Write `pytorch_lora_weights.safetensors` (diffusers' LoRA format, adapter config as metadata) and
    `tcscale_lora.json` (the base model it adapts) into `out_dir`."""
    from dataclasses import asdict

    from tcscale.families import family_named

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fam = family_named(family)
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    layers = {k: v.detach().float().contiguous() for k, v in adapter_state_dict(unet).items()}
    denoiser = fam.denoiser_component  # diffusers names the arguments by component: unet_..., transformer_...
    fam.pipeline_cls().save_lora_weights(
        str(out), weight_name=WEIGHT_NAME, safe_serialization=True,
        **{f"{denoiser}_lora_layers": layers, f"{denoiser}_lora_adapter_metadata": metadata},
    )  # fmt: skip
    info = {"base_model": base_model, "family": family, "lora": asdict(lora) if lora is not None else None}
    (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return out


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights (W + (alpha/r) B A) and drop the peft wrappers: a plain U-Net."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet
