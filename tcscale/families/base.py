"""What a model family is to tcscale, and the registry that names them (after torchtitan's ModelSpec).

A family knows, for its kind of pipeline (SD1.x/2.x, SDXL, ...): how to load its components with `from_pretrained`,
how to build them with tiny or with the released shapes (random weights, any device, "meta" included), how a batch's
prompts become the denoiser's conditioning, where its denoiser's grounded layers are (`layout`), which diffusers
pipeline class it exports to and evaluates with, and the training target. Every caller reaches it through the
run's config (`family_of(cfg.model)`) or, for a pipeline directory or hub id, through `pipeline_family(ref)`, the
one reader of `model_index.json`. Nothing outside tcscale/families branches on which family it is.

Adding a family is one module with a `Family` subclass and one `register_family(...)` line in
tcscale/families/__init__.py (README, "Where to change what").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tcscale.families.layout import DenoiserLayout

if TYPE_CHECKING:
    from tcscale.models.architectures import SDArchitecture
    from tcscale.models.conditioning import Conditioning
    from tcscale.models.config import ModelConfig, TinyModelConfig
    from tcscale.models.sd import SDComponents


class Family:
    """One model family. Subclasses set the class attributes and implement the builders."""

    name: str = ""  # `model.family`
    pipeline_class: str = ""  # the diffusers pipeline class its pipelines load and export as
    layout: DenoiserLayout  # where the denoiser's cross-attention layers are
    flow_matching: bool = False  # L_LDM is flow matching (objective.ldm.flow_matching), not a DDPM ε / v loss
    denoiser_component: str = "unet"  # the pipeline's name of the denoiser `SDComponents.unet` holds (SD3: transformer)
    # released architectures (tcscale.models.architectures) and the hub-id fragments that name each, lower case
    hub_names: dict[str, tuple[str, ...]] = {}

    def check_config(self, cfg) -> None:
        """Refuse, with a ValueError naming the key, a run config this family cannot train (at load time)."""

    # -- building ----------------------------------------------------------------------------------------------
    def component_classes(self, variant: str | None) -> dict[str, tuple[type, dict[str, Any]]]:
        """{component: (class, extra from_pretrained kwargs)} of a pipeline directory, scheduler as noise_scheduler."""
        raise NotImplementedError

    def build_tiny(self, cfg: TinyModelConfig, resolution: int) -> SDComponents:
        """Tiny random-init components of this family's layout, seeded by `cfg.seed`."""
        raise NotImplementedError

    def build_released(
        self, arch: SDArchitecture, resolution: int, *, device: str | torch.device, seed: int, tokenizer=None
    ) -> SDComponents:
        """Components with the released shapes of `arch` and random weights, created directly on `device`."""
        raise NotImplementedError

    def build_from_configs(self, path: Path, device: str | torch.device) -> SDComponents:
        """The components of a local pipeline directory built from its config files only (no weights read), on
        `device` ("meta": shapes only): for planning a model that is on disk."""
        from tcscale.models.sd import SDComponents, _local_class_name

        parts: dict[str, Any] = {}
        for name, (cls, _) in self.component_classes(None).items():
            sub = path / self.subfolder(name)
            if name.startswith("tokenizer") or name == "noise_scheduler":
                parts[name] = cls.from_pretrained(str(sub))
                continue
            if name == "vae" and _local_class_name(str(path), "vae/config.json") == "SpaceToDepthAutoencoder":
                from tcscale.models.space_to_depth import SpaceToDepthAutoencoder as cls
            with torch.device(device):
                if hasattr(cls, "config_class"):  # transformers
                    parts[name] = cls(cls.config_class.from_pretrained(str(sub)))
                else:  # diffusers
                    parts[name] = cls.from_config(cls.load_config(str(sub)))
        return SDComponents(**parts, family=self.name)

    def released_unet(self, arch: SDArchitecture, latent_size: int | None = None) -> torch.nn.Module:
        """The released denoiser of `arch` with random weights, on the current default device."""
        raise NotImplementedError

    def released_architecture(self, ref: str) -> str | None:
        """The released architecture a hub id names (e.g. "sd14"), None when it names none this family knows."""
        low = ref.lower()
        for arch, fragments in self.hub_names.items():
            if any(f in low for f in fragments):
                return arch
        return None

    # -- using -------------------------------------------------------------------------------------------------
    def encode(
        self,
        towers,
        input_ids: torch.Tensor,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        target_size: tuple[int, int] | None = None,
        original_sizes: torch.Tensor | None = None,
        crop_top_lefts: torch.Tensor | None = None,
    ) -> Conditioning:
        """The frozen text towers' conditioning of `input_ids` (the first tokenizer's ids, (B, L)). `towers` is
        anything with the family's text encoders and tokenizers as attributes (components or a pipeline)."""
        raise NotImplementedError

    def pipeline(self, comps: SDComponents, unet: torch.nn.Module | None = None, scheduler=None):
        """An inference pipeline of this family around the components (another U-Net / scheduler if given), no safety
        checker or watermarker."""
        raise NotImplementedError

    def pipeline_cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def load_pipeline_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` kwargs of an evaluated pipeline (safety checker off, watermarker off)."""
        return {}

    def training_target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """What the denoiser is trained to predict (ε or v, by the scheduler's prediction type)."""
        from tcscale.losses.diffusion import diffusion_target

        return diffusion_target(scheduler, latents, noise, timesteps)

    # -- training (the L_LDM term's parts that differ between families) -----------------------------------------
    def subfolder(self, component: str) -> str:
        """The pipeline directory's subfolder of a `component_classes` entry (the noise scheduler's: scheduler/, the
        denoiser's: `denoiser_component`)."""
        if component == "unet":
            return self.denoiser_component
        return "scheduler" if component == "noise_scheduler" else component

    def latents(self, vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, h, w) float32 latents the denoiser is trained on: a VAE posterior sample, scaled."""
        return self.scale_latents(vae, vae.encode(pixels).latent_dist.sample(generator))

    def scale_latents(self, vae, sample: torch.Tensor) -> torch.Tensor:
        """A VAE posterior sample (encoded now, or drawn from a cached posterior: tcscale.data.latent_cache) as the
        denoiser's float32 latents: x the VAE's scaling factor (only the VAE's config is read)."""
        return (sample * vae.config.scaling_factor).float()

    def noise_latents(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator, ldm_cfg):
        """(timesteps, noisy latents, target, per-sample loss weights or None) of one micro-step: t ~ U{0..T-1},
        the scheduler's forward process, ε or v (docs/DESIGN.md §3 "LDM loss")."""
        T = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, T, (latents.shape[0],), generator=generator, device=latents.device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        return timesteps, noisy, self.training_target(scheduler, latents, noise, timesteps), None

    def denoise(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond, attention_kwargs=None) -> torch.Tensor:
        """The denoiser's prediction for `noisy` at `timesteps` under `cond` (a `Conditioning`); `attention_kwargs`
        reach every attention processor (a grounding recorder)."""
        return model(
            noisy, timesteps, cond.text, added_cond_kwargs=cond.added_cond_kwargs,
            cross_attention_kwargs=attention_kwargs,
        ).sample  # fmt: skip

    def key_token_phrase(self, towers, input_ids: torch.Tensor, token_phrase: torch.Tensor, attention) -> torch.Tensor:
        """(B, Lk) phrase slot of each text key the grounded layers read, from the loader's (B, L) `token_phrase` over
        the first tokenizer's `input_ids`; one text sequence: the same tensor. `attention`: the run's section."""
        return token_phrase

    def install_grounding(self, denoiser: torch.nn.Module, plan, attention) -> None:
        """Grounding processors on the plan's layers (`attention.backend`), `attention.ungrounded` elsewhere."""
        from tcscale.attention.processors import install_grounding_processors

        install_grounding_processors(denoiser, plan, attention.backend, attention.ungrounded)

    # -- reading maps (validation, evaluation: tcscale.eval) ------------------------------------------------------
    def denoiser(self, pipe) -> torch.nn.Module:
        """The denoiser of a loaded pipeline (`pipe.unet`, SD3's `pipe.transformer`)."""
        return getattr(pipe, self.denoiser_component)

    def observe(self, denoiser: torch.nn.Module, plan) -> None:
        """Make the plan's layers hand their maps to a recorder (`MapCapture`) without changing the model's outputs;
        a layer that is grounded already keeps its processor."""
        from tcscale.attention.processors import observe

        observe(denoiser, plan)

    def noise_at(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timestep: int):
        """(timesteps (B,), noisy latents) of `latents` noised to the fixed training timestep `timestep` (an
        evaluation's one forward): the scheduler's forward process at t."""
        timesteps = torch.full((latents.shape[0],), int(timestep), device=latents.device, dtype=torch.long)
        return timesteps, scheduler.add_noise(latents, noise, timesteps)

    def unscale_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale_latents`: what the VAE decodes."""
        return latents / vae.config.scaling_factor

    def sampling_scheduler(self, noise_scheduler):
        """The sampler of validation images, from the training scheduler's config (DDIM)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(noise_scheduler.config)

    def attention_call_kwargs(self, attention_kwargs: dict) -> dict:
        """The pipeline-call / denoiser-call keyword that carries `attention_kwargs` to every attention processor."""
        return {"cross_attention_kwargs": attention_kwargs}


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family to `FAMILIES` under `family.name` (re-registering the same class replaces it)."""
    old = FAMILIES.get(family.name)
    if old is not None and type(old).__qualname__ != type(family).__qualname__:
        raise ValueError(f"model family {family.name!r} is already registered as {type(old).__qualname__}")
    FAMILIES[family.name] = family
    return family


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.family={name!r}: unknown model family, expected one of {sorted(FAMILIES)}") from None


def family_of(model_cfg: ModelConfig) -> Family:
    """The family of a run's `model` section (`model.family`)."""
    return family_named(model_cfg.family)


def pipeline_class_name(ref: str | os.PathLike, revision: str | None = None) -> str | None:
    """`_class_name` of a pipeline's model_index.json (a local directory, or a hub id when the hub is reachable);
    None when it cannot be read."""
    path = Path(ref).expanduser() / "model_index.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()).get("_class_name")
        except (OSError, ValueError):
            return None
    if Path(ref).expanduser().is_dir():
        return None
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(str(ref), revision=revision).get("_class_name")
    except (OSError, ValueError):
        return None


def family_of_class(class_name: str | None, what: str, default: str = "sd") -> Family:
    """The family whose pipeline class is `class_name` (a model_index.json's `_class_name`); `default` when None.
    Raises ValueError naming `what` for a pipeline class no family loads."""
    if class_name is None:
        return family_named(default)
    for family in FAMILIES.values():
        if class_name == family.pipeline_class:
            return family
    raise ValueError(
        f"{what} is a {class_name}; tcscale's families load "
        + ", ".join(f"{f.pipeline_class} (model.family={f.name})" for f in FAMILIES.values())
    )


def pipeline_family(ref: str | os.PathLike, revision: str | None = None, default: str = "sd") -> Family:
    """The family of a pipeline directory or hub id, from its model_index.json's class; `default` when it cannot
    be read (the loader then reports what fails)."""
    return family_of_class(pipeline_class_name(ref, revision), repr(str(ref)), default)


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded diffusers pipeline (its class is what its model_index.json names)."""
    return family_of_class(type(pipe).__name__, f"the pipeline {type(pipe).__name__}")


def check_pipeline_family(ref: str | os.PathLike, family: Family) -> None:
    """A local pipeline directory's class agrees with `model.family` (an SDXL directory read as SD would lose its
    second text tower; the reverse has none to read). Raises ValueError naming both."""
    if not (Path(ref).expanduser() / "model_index.json").is_file():
        return
    found = pipeline_family(ref, default=family.name)
    if found is not family:
        raise ValueError(
            f"model.pretrained={str(ref)!r} is a {found.pipeline_class}: set model.family={found.name} "
            f"(got {family.name!r})"
        )
