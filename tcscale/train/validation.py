"""Validation during training: images, labelled per-phrase heatmaps and the live grounding curve, logged by rank 0.

Collective: every rank runs the same generation and forwards (under ZeRO-3 each U-Net forward gathers the
partitioned weights from all ranks), rank 0 logs. The heatmaps are those of the objective's grounded layers, or
(an objective that grounds nothing, e.g. LDM-only) of the layers `attention` selects, rendered as the attention
viewer renders them (`tcscale.eval.attention_maps`). With `validation.grounding.enabled`, the held-out grounding
mIoU (`tcscale.eval.grounding_maps`) is logged as `grounding/miou` (and per timestep / layer) at the same steps.
"""

from __future__ import annotations

import torch

from tcscale.attention.plan import GroundingPlan, vae_scale_factor
from tcscale.config import TrainConfig
from tcscale.eval.attention_maps import attention_figure, generate_with_maps, phrase_tokens
from tcscale.families import family_named


def validation_plan(unet, comps, cfg: TrainConfig, plan: GroundingPlan | None) -> GroundingPlan:
    """The layers whose maps validation reads: the objective's, or those `attention` selects."""
    if plan is not None:
        return plan
    layout = family_named(comps.family).layout
    return GroundingPlan.from_config(
        unet, cfg.attention, cfg.data.resolution, vae_scale_factor(comps.vae), layout=layout
    )


def validation_pipeline(unet, comps):
    """The family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, ...)
    around the trained denoiser, with the family's sampler (DDIM; SD3: flow-matching Euler)."""
    family = family_named(comps.family)
    pipe = family.pipeline(comps, unet, family.sampling_scheduler(comps.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def grounding_metrics(unet, comps, cfg: TrainConfig, plan: GroundingPlan, env) -> dict[str, float]:
    """Held-out grounding mIoU on every rank's copy of the same samples (the forwards are collective)."""
    from tcscale.eval.grounding_maps import grounding_batches, grounding_records, summarize_grounding

    g = cfg.validation.grounding
    batches = grounding_batches(
        g.source, comps.tokenizer, resolution=cfg.data.resolution, num_samples=g.num_samples,
        batch_size=g.batch_size, shards=g.shards, synthetic_split=g.synthetic_split,
        synthetic_seed=g.synthetic_seed, max_objects=g.synthetic_max_objects, min_objects=g.synthetic_min_objects,
        phrase=cfg.data.synthetic.phrase,
    )  # fmt: skip
    records = grounding_records(
        unet, comps.vae, comps, comps.noise_scheduler, plan, batches, timesteps=list(g.timesteps),
        threshold=g.threshold, seed=cfg.seed, device=env.device, family=comps.family, attention=cfg.attention,
    )  # fmt: skip
    return summarize_grounding(records)


def run_validation(unet, comps, cfg: TrainConfig, plan: GroundingPlan | None, tracker, step: int, env) -> dict:
    """Images and heatmaps for `validation.prompts` (artifacts) and, if enabled, grounding metrics (returned and
    logged at `step`)."""
    plan = validation_plan(unet, comps, cfg, plan)
    was_training = unet.training
    unet.eval()
    metrics: dict[str, float] = {}
    try:
        pipe = validation_pipeline(unet, comps)
        for i, prompt in enumerate(cfg.validation.prompts):
            gen = torch.Generator(device=env.device).manual_seed(cfg.validation.seed)
            image, maps = generate_with_maps(
                pipe, prompt, plan, resolution=cfg.data.resolution,
                num_inference_steps=cfg.validation.num_inference_steps,
                guidance_scale=cfg.validation.guidance_scale, generator=gen,
            )  # fmt: skip
            if not env.is_rank0:
                continue
            # image series keyed by prompt, one image per step (MLflow's step slider)
            tracker.log_image(image, key=f"validation/prompt{i}", step=step)
            figure = attention_figure(
                image, maps, comps.tokenizer, prompt, towers=comps, family=family_named(comps.family)
            )  # fmt: skip
            if figure is not None:
                tracker.log_image(figure, key=f"validation/prompt{i}_attention", step=step)
                tracker.log_dict(
                    {"prompt": prompt, "phrases": [p for p, _ in phrase_tokens(comps.tokenizer, prompt)]},
                    f"validation/step{step:06d}/prompt{i}_attention.json",
                )
        if cfg.validation.grounding.enabled:
            metrics = grounding_metrics(unet, comps, cfg, plan, env)
            tracker.log_metrics(metrics, step)
    finally:
        unet.train(was_training)
    return metrics
