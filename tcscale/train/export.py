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

Memory is bounded by what is written. The checkpoint is read memory-mapped and only its trained parameters are
reconstructed in fp32 (DeepSpeed's `exclude_frozen_parameters`): the frozen ones are the base model's, read from
the base model itself, so an SDXL LoRA export never builds the 2.6 B frozen U-Net parameters in fp32. An adapter
export reads no base weights at all: the U-Net is built from the base's config on the meta device, the adapters
are filled from the checkpoint and written (a few hundred MiB at most). A full export needs the base pipeline in
fp32 plus the trained weights; it prints that figure before it loads anything (`full_export_bytes`).

`ema=True` exports the run's fp32 EMA weights (`tcscale.train.ema`, saved with each checkpoint when `ema.enabled`)
in place of the trained ones. Every export carries a model card (`README.md`, `tcscale.train.model_card`) saying
which weights it holds, and the run's config (`tcscale_config.yaml`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from tcscale.config import load_config
from tcscale.models.sd import ModelLoadError, SDComponents, load_components, save_pipeline_dir
from tcscale.train.checkpoint import CheckpointError, latest_tag
from tcscale.train.model_card import CardFacts, read_eval_results, write_model_card
from tcscale.train.safe_load import safe_torch_load


@contextlib.contextmanager
def _mmap_loads() -> Iterator[None]:
    """Within the block, `torch.load` of a file maps it instead of reading it (DeepSpeed's model-states file holds
    the whole module, frozen weights included: mapped, only the entries used are paged in)."""
    original = torch.load

    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            kwargs.setdefault("mmap", True)
        return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _model_states_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob("*model_states.pt"))


def checkpoint_param_names(ckpt_dir: Path, tag: str, allow_unsafe_load: bool = False) -> tuple[dict, dict]:
    """({trained name: shape}, {frozen name: shape}) of the module a checkpoint holds, read from its model-states
    file (memory-mapped; no weight is read)."""
    from deepspeed.checkpoint.constants import FROZEN_PARAM_SHAPES, PARAM_SHAPES

    files = _model_states_files(ckpt_dir / tag)
    if not files:
        raise CheckpointError(f"{ckpt_dir / tag}: no DeepSpeed model states file")
    with safe_torch_load(allow_unsafe_load), _mmap_loads():
        states = torch.load(str(files[0]), map_location="cpu")
    if PARAM_SHAPES not in states:  # ZeRO stage 0: the module's state dict only
        module = states["module"]
        return {k: tuple(v.shape) for k, v in module.items()}, {}
    trained = {k: tuple(v) for group in states[PARAM_SHAPES] for k, v in group.items()}
    frozen = {k: tuple(v) for k, v in (states.get(FROZEN_PARAM_SHAPES) or {}).items()}
    return trained, frozen


def consolidated_state_dict(
    ckpt_dir: Path, tag: str, allow_unsafe_load: bool = False, exclude_frozen: bool = False
) -> dict[str, torch.Tensor]:
    """fp32 U-Net state dict from a checkpoint tag (ZeRO 1/2/3 shards merged; stage 0 read directly). Every file
    is read weights-only (tcscale.train.safe_load) unless `allow_unsafe_load`, and memory-mapped. `exclude_frozen`:
    the trained parameters and buffers only (the frozen parameters are the base model's)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {tag_dir} not found")
    with safe_torch_load(allow_unsafe_load), _mmap_loads():
        if any(tag_dir.glob("*optim_states.pt")) and any("zero" in p.name for p in tag_dir.iterdir()):
            state = get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt_dir), tag=tag, exclude_frozen_parameters=exclude_frozen
            )
        else:
            files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file")
            state = torch.load(str(files[0]), map_location="cpu")["module"]
    # .float() copies bf16 entries out of the mapped file; fp32 ones stay views of DeepSpeed's merged vector
    return {k: v.float() for k, v in state.items()}


def _load_parts(comps, objective: str, state: dict, frozen: dict, where: Path, assign: bool = False) -> None:
    """Load the checkpoint's entries into the components its objective exports; every parameter of those
    components must be either in the checkpoint or one of its frozen parameters (then the base's value stays)."""
    from tcscale.objectives import OBJECTIVES

    spec = OBJECTIVES[objective]
    frozen_parts = spec.exported(dict.fromkeys(frozen, torch.empty(0)))
    for name, part in spec.exported(state).items():
        module = getattr(comps, name) if not isinstance(comps, torch.nn.Module) else comps
        what = "U-Net" if name == "unet" else name
        try:
            missing, unexpected = module.load_state_dict(part, strict=False, assign=assign)
        except RuntimeError as exc:  # shape mismatch
            raise CheckpointError(f"checkpoint {where} does not match the {what}: {exc}") from None
        param_names = {n for n, _ in module.named_parameters()}
        not_frozen = [m for m in missing if m in param_names and m not in frozen_parts.get(name, {})]
        if unexpected or not_frozen:
            raise CheckpointError(
                f"checkpoint {where} does not match the {what}: missing {not_frozen[:5]}, unexpected {unexpected[:5]}"
            )


def _base_ref(cfg, run_dir: Path) -> str:
    return cfg.model.pretrained or str((run_dir / "base_model").resolve())


def _resolve_tag(run_dir: Path, tag: str | None) -> tuple[Path, str]:
    ckpt_dir = run_dir / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to export (no 'latest' file)")
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} not found")
    return ckpt_dir, tag


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


def _with_ema(state: dict[str, torch.Tensor], tag_dir: Path, allow_unsafe_load: bool) -> dict[str, torch.Tensor]:
    """The trained state with the checkpoint's EMA weights in place of the trained values."""
    averaged = ema_weights(tag_dir, allow_unsafe_load)
    unknown = sorted(set(averaged) - set(state))
    if unknown:
        raise CheckpointError(f"{tag_dir}: EMA weights for parameters the checkpoint lacks: {unknown[:3]}")
    return {**state, **averaged}


def load_trained_components(
    run_dir: str | os.PathLike, tag: str | None = None, allow_unsafe_load: bool = False, ema: bool = False
) -> SDComponents:
    """The run's base components with the checkpoint's weights in the components its objective trains (the U-Net,
    or what the objective's `export_components` names, e.g. the text encoder); `ema`: its EMA weights instead."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ckpt_dir, tag = _resolve_tag(run_dir, tag)
    _, frozen = checkpoint_param_names(ckpt_dir, tag, allow_unsafe_load)
    state = consolidated_state_dict(ckpt_dir, tag, allow_unsafe_load, exclude_frozen=True)
    if ema:
        state = _with_ema(state, ckpt_dir / tag, allow_unsafe_load)
    cfg.model.pretrained = _base_ref(cfg, run_dir)
    comps = load_components(cfg.model, cfg.data.resolution)
    if cfg.model.lora is not None:  # the same adapters as the run, so the checkpoint's keys match
        from tcscale.models.lora import add_lora, lora_target_modules

        add_lora(comps.unet, cfg.model.lora, lora_target_modules(cfg), seed=cfg.seed)
    _load_parts(comps, cfg.objective.name, state, frozen, ckpt_dir / tag)
    return comps


def adapter_unet(
    run_dir: str | os.PathLike, tag: str | None = None, allow_unsafe_load: bool = False, ema: bool = False
):
    """A LoRA run's U-Net holding only its adapters: built from the base's config on the meta device (no base
    weight is read or allocated), the adapters filled from the checkpoint (`ema`: its EMA weights). Enough to write
    the adapter."""
    from tcscale.families import family_of
    from tcscale.models.lora import add_lora, lora_target_modules

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ckpt_dir, tag = _resolve_tag(run_dir, tag)
    _, frozen = checkpoint_param_names(ckpt_dir, tag, allow_unsafe_load)
    state = consolidated_state_dict(ckpt_dir, tag, allow_unsafe_load, exclude_frozen=True)
    if ema:
        state = _with_ema(state, ckpt_dir / tag, allow_unsafe_load)
    base = _base_ref(cfg, run_dir)
    family = family_of(cfg.model)
    denoiser_cls, sub = family.component_classes(None)["unet"][0], family.subfolder("unet")
    try:
        config = denoiser_cls.load_config(base, subfolder=sub, revision=cfg.model.revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.pretrained={base!r}: cannot read {sub}/config.json: {exc}") from exc
    with torch.device("meta"):
        unet = denoiser_cls.from_config(config)
        add_lora(unet, cfg.model.lora, lora_target_modules(cfg), seed=cfg.seed)
    _load_parts(unet, cfg.objective.name, state, frozen, ckpt_dir / tag, assign=True)
    empty = [n for n, p in unet.named_parameters() if ".lora_" in n and p.is_meta]
    if empty:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} holds no value for the adapters {empty[:5]}")
    return unet


def _safetensors_numel(folder: Path) -> int:
    """Parameters stored in a local pipeline directory's safetensors files (headers only; one variant)."""
    from safetensors import safe_open

    total = 0
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(sub.glob("*.safetensors"))
        plain = [f for f in files if f.name.count(".") == 1]  # diffusion_pytorch_model.safetensors, not .fp16.
        for f in plain or files[:1]:
            with safe_open(str(f), "pt") as st:
                total += sum(_prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def full_export_bytes(run_dir: str | os.PathLike, tag: str | None = None, allow_unsafe_load: bool = False) -> dict:
    """What a full export holds at once: the base pipeline in fp32 (None when the base is not a local directory)
    and the checkpoint's trained parameters in fp32."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ckpt_dir, tag = _resolve_tag(run_dir, tag)
    trained, _ = checkpoint_param_names(ckpt_dir, tag, allow_unsafe_load)
    base = Path(_base_ref(cfg, run_dir)).expanduser()
    base_numel = _safetensors_numel(base) if base.is_dir() else None
    return {"base": None if base_numel is None else 4 * base_numel, "trained": 4 * sum(map(_prod, trained.values()))}


def _announce_full_export(run_dir, tag, allow_unsafe_load) -> None:
    need = full_export_bytes(run_dir, tag, allow_unsafe_load)
    gib = 1024**3
    base = "the base pipeline (not a local directory: size unknown)" if need["base"] is None else (
        f"the base pipeline in fp32 ({need['base'] / gib:.1f} GiB)"
    )  # fmt: skip
    total = (need["base"] or 0) + need["trained"]
    print(
        f"export: a full pipeline needs about {total / gib:.1f} GiB of memory: {base} + the trained weights in fp32 "
        f"({need['trained'] / gib:.1f} GiB)",
        flush=True,
    )


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
    _, tag = _resolve_tag(Path(run_dir), tag)
    card = _card_facts(run_dir, tag, cfg, ema, eval_results, merge_lora)
    if cfg.model.lora is not None and not merge_lora:
        unet = adapter_unet(run_dir, tag, allow_unsafe_load, ema=ema)
        base = _base_ref(cfg, Path(run_dir))

        def write(tmp: Path) -> None:
            lora_mod.save_lora_dir(unet, tmp, family=cfg.model.family, base_model=base, lora=cfg.model.lora)
            write_model_card(tmp, cfg, card)

        return _write_atomic(Path(out_dir), write)
    _announce_full_export(run_dir, tag, allow_unsafe_load)
    comps = load_trained_components(run_dir, tag, allow_unsafe_load, ema=ema)
    if cfg.model.lora is not None:
        lora_mod.merge_lora(comps.unet)

    def write_pipeline(tmp: Path) -> None:
        save_pipeline_dir(comps, tmp)
        write_model_card(tmp, cfg, card)

    return _write_atomic(Path(out_dir), write_pipeline)


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
    _, tag = _resolve_tag(Path(run_dir), tag)
    card = _card_facts(run_dir, tag, cfg, ema, eval_results, what="text encoder")
    _announce_full_export(run_dir, tag, allow_unsafe_load)
    comps = load_trained_components(run_dir, tag, allow_unsafe_load, ema=ema)

    def write(tmp: Path) -> None:
        comps.text_encoder.save_pretrained(str(tmp))
        write_model_card(tmp, cfg, card)

    return _write_atomic(Path(out_dir), write)
