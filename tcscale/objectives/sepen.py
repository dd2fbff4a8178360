"""Separate-and-Enhance objective: L = lambda_sep L_sep + lambda_en L_en (+ lambda_n L_norm), to_k only.

Data-free: each micro-step draws K-object prompts from the concept list (deterministic in
(seed, micro_step, rank)), noises nothing — z_t ~ N(0, I) at a random timestep — and reads the
probabilities of every cross-attention layer at `objective.sepen.map_resolution`. With
lambda_norm > 0, single-concept prompts on fresh z_t keep the prediction close to a frozen copy
of the U-Net taken before training.
"""

from __future__ import annotations

import copy

import torch

from tcscale.attention.grounding_processor import GroundingContext, install_grounding_processors, select_layers
from tcscale.config import TrainConfig
from tcscale.losses.sepen import norm_loss, sepen_losses
from tcscale.models.sd import SDComponents
from tcscale.objectives.sepen_prompts import SepEnPromptSampler
from tcscale.objectives.tokencompose import StepOutput

TRAINABLE_SUFFIX = "attn2.to_k.weight"


class SepEnObjective:
    def __init__(
        self, comps: SDComponents, cfg: TrainConfig, compute_dtype: torch.dtype, device: torch.device, rank: int = 0
    ):
        sep = cfg.objective.sepen
        self.comps, self.sep, self.compute_dtype, self.rank = comps, sep, compute_dtype, rank
        self.micro_batch = int(cfg.deepspeed["train_micro_batch_size_per_gpu"])
        self.latent_side = cfg.data.resolution // 8
        unet = comps.unet
        self.layer_names = select_layers(unet, ["down", "mid", "up"], [sep.map_resolution], self.latent_side)
        if not self.layer_names:
            raise ValueError(
                f"objective.sepen.map_resolution={sep.map_resolution}: no cross-attention layer has that latent side "
                f"at data.resolution={cfg.data.resolution}"
            )
        for name, p in unet.named_parameters():
            p.requires_grad_(name.endswith(TRAINABLE_SUFFIX) or name.endswith("attn2.to_k.bias"))
        self.frozen = None
        if sep.lambda_norm > 0:
            self.frozen = copy.deepcopy(unet).requires_grad_(False).to(device, compute_dtype).eval()
        install_grounding_processors(unet, self.layer_names, "reference")
        split = None if sep.concepts == "pairs" else sep.split
        self.sampler = SepEnPromptSampler.from_concepts(
            sep.concepts,
            split=split,
            num_objects=(2, sep.objects_per_prompt),
            seed=cfg.seed,
            tokenizer=comps.tokenizer,
        )

    def trainable_parameters(self, unet: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in unet.parameters() if p.requires_grad]

    @torch.no_grad()
    def _text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        tok = self.comps.tokenizer
        ids = tok(
            prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return self.comps.text_encoder(ids)[0].to(self.compute_dtype)

    def _noise_and_t(self, B: int, device: torch.device, generator: torch.Generator):
        z = torch.randn((B, 4, self.latent_side, self.latent_side), generator=generator, device=device)
        T = self.comps.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, T, (B,), generator=generator, device=device).long()
        return z.to(self.compute_dtype), t

    def __call__(self, unet, micro_step: int, device: torch.device, generator: torch.Generator) -> StepOutput:
        B = self.micro_batch
        prompts = self.sampler.multi(micro_step, self.rank, B)
        text = self._text([p.text for p in prompts], device)
        z, t = self._noise_and_t(B, device, generator)
        ctx = GroundingContext(latent_size=(self.latent_side, self.latent_side), mode="probs")
        unet(z, t, text, cross_attention_kwargs={"grounding": ctx})
        ctx.recording = False  # an activation checkpoint's recompute during backward must not record again
        losses = sepen_losses(
            [r.probs for r in ctx.records], [list(p.token_positions) for p in prompts], sigma=self.sep.gaussian_sigma
        )
        loss = self.sep.lambda_sep * losses["sep"] + self.sep.lambda_en * losses["en"]
        terms = {"sep": losses["sep"], "en": losses["en"]}
        if self.frozen is not None:
            singles = self.sampler.single(micro_step, self.rank, B)
            text1 = self._text([p.text for p in singles], device)
            z1, t1 = self._noise_and_t(B, device, generator)
            pred = unet(z1, t1, text1).sample
            with torch.no_grad():
                ref = self.frozen(z1, t1, text1).sample
            terms["norm"] = norm_loss(pred, ref)
            loss = loss + self.sep.lambda_norm * terms["norm"]
        return StepOutput(loss, terms)
