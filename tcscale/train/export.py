"""Export the trained U-Net from a DeepSpeed (ZeRO) checkpoint as a diffusers pipeline directory.

The consolidated fp32 weights come from DeepSpeed's own `zero_to_fp32` helpers; the other
pipeline components come from the run's base model (`model.pretrained`, or `<run>/base_model`
that tiny runs write). The result loads with `StableDiffusionPipeline.from_pretrained(out)`.
An objective that trains another component (its registry entry's `export_components`, e.g. the
text encoder) exports the same way, with that component replaced; `export_text_encoder` writes
the text encoder alone (a `CLIPTextModel` directory).

A LoRA run (`model.lora`) exports its adapter in diffusers' LoRA format (`pytorch_lora_weights.safetensors`,
loaded by `pipe.load_lora_weights(out)` on the base pipeline that `tcscale_lora.json` names), or with
`merge_lora=True` a full pipeline whose U-Net has the adapters folded into its weights (`tcscale.models.lora`).

`ema=True` exports the run's fp32 EMA weights (`tcscale.train.ema`, saved with each checkpoint when `ema.enabled`)
in place of the trained ones. Every export carries a model card (`README.md`, `tcscale.train.model_card`) saying
which weights it holds, and the run's config (`tcscale_config.yaml`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tcscale.config import load_config
from tcscale.models.sd import SDComponents, load_components, save_pipeline_dir
from tcscale.train.checkpoint import CheckpointError, latest_tag
from tcscale.train.model_card import CardFacts, read_eval_results, write_model_card
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


def ema_weights(tag_dir: Path, allow_unsafe_load: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 EMA of the trained parameters, by parameter name (every rank's share assembled)."""
    from tcscale.train.ema import load_ema_state_dict

    try:
        with safe_torch_load(allow_unsafe_load):
            return load_ema_state_dict(tag_dir)
    except FileNotFoundError as exc:
        raise CheckpointError(f"--ema: {exc}") from None


def ema_description(tag_dir: Path, cfg) -> str:
    """How the card names EMA weights: decay, schedule and the number of updates folded in."""
    from tcscale.train.ema import ema_files

    with safe_torch_load(False):
        state = torch.load(ema_files(tag_dir)[0], map_location="cpu")
    warm = ", warm-up schedule" if state.get("warmup") else ""
    return f"EMA of the trained weights (fp32, decay {state['decay']}{warm}, {state['updates']} updates)"


def load_trained_components(
    run_dir: str | os.PathLike, tag: str | None = None, allow_unsafe_load: bool = False, ema: bool = False
) -> SDComponents:
    """The run's base components with the checkpoint's weights in the components its objective trains (the U-Net,
    or what the objective's `export_components` names, e.g. the text encoder); `ema`: its EMA weights instead."""
    from tcscale.objectives import OBJECTIVES

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ckpt_dir = run_dir / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to export (no 'latest' file)")
    state = consolidated_state_dict(ckpt_dir, tag, allow_unsafe_load)
    if ema:
        averaged = ema_weights(ckpt_dir / tag, allow_unsafe_load)
        unknown = sorted(set(averaged) - set(state))
        if unknown:
            raise CheckpointError(f"{ckpt_dir / tag}: EMA weights for parameters the checkpoint lacks: {unknown[:3]}")
        state.update(averaged)
    if cfg.model.pretrained is None:
        cfg.model.pretrained = str((run_dir / "base_model").resolve())
    comps = load_components(cfg.model, cfg.data.resolution)
    if cfg.model.lora is not None:  # the same adapters as the run, so the checkpoint's keys match
        from tcscale.models.lora import add_lora, lora_target_modules

        add_lora(comps.unet, cfg.model.lora, lora_target_modules(cfg), seed=cfg.seed)
    for name, part in OBJECTIVES[cfg.objective.name].exported(state).items():
        module = getattr(comps, name)
        missing, unexpected = module.load_state_dict(part, strict=False)
        param_names = {n for n, _ in module.named_parameters()}
        if unexpected or any(m in param_names for m in missing):
            what = "U-Net" if name == "unet" else name
            raise CheckpointError(
                f"checkpoint {ckpt_dir / tag} does not match the {what}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    return comps


def _write_atomic(out_dir: Path, write) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def export_pipeline(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tag: str | None = None,
    allow_unsafe_load: bool = False,
    merge_lora: bool = False,
    ema: bool = False,
    eval_results: list[str | os.PathLike] = (),
) -> Path:
    """The run as a pipeline directory; a LoRA run as its adapter directory, or (`merge_lora`) as a pipeline with
    the adapters merged into the U-Net. `ema`: the EMA weights; `eval_results`: evaluations' results.json files
    listed in the model card."""
    from tcscale.models import lora as lora_mod

    cfg = load_config(Path(run_dir) / "config.yaml")
    if merge_lora and cfg.model.lora is None:
        raise CheckpointError(f"--merge-lora: run {run_dir} trained no LoRA adapters (model.lora is null)")
    tag = tag or _latest(run_dir)
    card = _card_facts(run_dir, tag, cfg, ema, eval_results, merge_lora)
    comps = load_trained_components(run_dir, tag, allow_unsafe_load, ema=ema)
    if cfg.model.lora is not None and not merge_lora:
        base = cfg.model.pretrained or str((Path(run_dir) / "base_model").resolve())

        def write(tmp: Path) -> None:
            lora_mod.save_lora_dir(comps.unet, tmp, family=comps.family, base_model=base, lora=cfg.model.lora)
            write_model_card(tmp, cfg, card)

        return _write_atomic(Path(out_dir), write)
    if cfg.model.lora is not None:
        lora_mod.merge_lora(comps.unet)

    def write_pipeline(tmp: Path) -> None:
        save_pipeline_dir(comps, tmp)
        write_model_card(tmp, cfg, card)

    return _write_atomic(Path(out_dir), write_pipeline)


def _latest(run_dir: str | os.PathLike) -> str:
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to export (no 'latest' file)")
    return tag


def _card_facts(run_dir, tag: str, cfg, ema: bool, eval_results, merge_lora: bool = False, what: str = "") -> CardFacts:
    """What the model card says; checks the inputs it names (EMA files, results.json) before any weights load."""
    tag_dir = Path(run_dir) / "checkpoints" / tag
    if ema:
        from tcscale.train.ema import ema_files

        if not ema_files(tag_dir):
            raise CheckpointError(
                f"--ema: {tag_dir} holds no EMA weights (ema-rank*.pt); the run was trained without ema.enabled=true"
            )
        weights = ema_description(tag_dir, cfg)
    else:
        weights = "the trained weights (fp32 master copy of the optimizer)"
    if not what:
        what = "pipeline" if cfg.model.lora is None else ("merged LoRA pipeline" if merge_lora else "LoRA adapter")
    return CardFacts(str(run_dir), tag, what, weights, read_eval_results(list(eval_results)))


def export_text_encoder(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tag: str | None = None,
    allow_unsafe_load: bool = False,
    ema: bool = False,
    eval_results: list[str | os.PathLike] = (),
) -> Path:
    """The run's text encoder alone, in transformers format (`CLIPTextModel.from_pretrained(out)` loads it)."""
    cfg = load_config(Path(run_dir) / "config.yaml")
    tag = tag or _latest(run_dir)
    card = _card_facts(run_dir, tag, cfg, ema, eval_results, what="text encoder")
    comps = load_trained_components(run_dir, tag, allow_unsafe_load, ema=ema)

    def write(tmp: Path) -> None:
        comps.text_encoder.save_pretrained(str(tmp))
        write_model_card(tmp, cfg, card)

    return _write_atomic(Path(out_dir), write)
