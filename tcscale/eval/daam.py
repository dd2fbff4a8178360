"""TokenCompose's Table 4 protocol: DAAM heat maps on DAAM's COCO-Gen images after null-text inversion, and mIoU.

Written here on tcscale's attention recorders because the `daam` package pins diffusers 0.21.2 and transformers
4.30.2 (tcscale: 0.39 / 4.57). What is reproduced, from the papers and DAAM's released code (castorini/daam):

* **Null-text inversion** (Mokady et al., CVPR 2023). The image's VAE latent (the distribution's mean × the VAE
  scaling factor) is DDIM-inverted with the prompt and no guidance (diffusers' `DDIMInverseScheduler`), giving
  z*_0 .. z*_T. Then, from z_T = z*_T and for each sampler step t (DDIM, the model's noise schedule), an
  unconditional embedding ∅_t — started from the previous step's (the empty prompt's at the first) — is optimised
  with Adam (lr 1e-2 · (1 − i/100) at step i, at most `inner_steps` iterations, stopping once the loss is below
  `early_stop` + i · 2e-5) so that the classifier-free-guided step (guidance 7.5) from z_t lands on z*_{t−1};
  z_{t−1} is then that step with the optimised ∅_t.
* **DAAM** (Tang et al., ACL 2023): during the guided regeneration from z_T with the optimised ∅_t, every
  cross-attention layer of the U-Net's down and up blocks (DAAM leaves the mid block out, and any map at 1/8 of the
  latent side) hands its conditional branch's per-head attention probabilities to `HeadMapCapture`, summed over the
  sampler steps. Each (layer, head) map of every token is upsampled bicubically to the latent side and clamped at
  0, and the maps are averaged over layers and heads (`daam_heat_maps`). A word's map is the mean of its tokens'
  maps over every occurrence of the word's tokens in the prompt (`word_token_indices`); it is upsampled
  bicubically to the image, min-max normalised and thresholded at τ = 0.4 (`word_mask`).
* **COCO-Gen and mIoU**: DAAM's folder per image, ``<id>/prompt.txt``, ``<id>/output.png`` (the generated image)
  and ``<id>/<word>.gt.png`` (a human mask: alpha channel > 0; several files of one word are merged). IoU of each
  (image, annotated word) whose word the prompt contains, averaged over all of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tcscale.attention.recorders import Recorder
from tcscale.attention.reference import attention_probs


@dataclass
class DaamCocoGenConfig:
    enabled: bool = False
    data_dir: str | None = None  # DAAM's COCO-Gen: one folder per image (prompt.txt, output.png, <word>.gt.png)
    limit: int | None = None  # the first N images (sorted folder names; null: all)
    num_inference_steps: int = 50  # DDIM steps of the inversion and the regeneration
    guidance_scale: float = 7.5  # classifier-free guidance of the regeneration (null-text inversion's)
    inner_steps: int = 10  # Adam iterations per step optimising the null-text embedding
    learning_rate: float = 0.01  # Adam's rate at the first step (decays as 1 - i/100)
    early_stop: float = 1e-5  # stop a step's optimisation below this loss (+ i * 2e-5)
    threshold: float = 0.4  # DAAM's τ on the min-max normalised word map
    resolution: int | None = None  # image side fed to the model; null: the U-Net's native size


# --------------------------------------------------------------------------- heat maps


class HeadMapCapture(Recorder):
    """Per-head attention probabilities of each observed layer, summed over the calls made while open:
    ``maps[layer]`` is (B, H, Lq, Lk) float32 (DAAM keeps heads apart until after upsampling)."""

    def __init__(self, latent_size: tuple[int, int]):
        super().__init__(latent_size)
        self.maps: dict[str, torch.Tensor] = {}

    def attend(self, layer, q, k, v, scale, backend):
        probs = attention_probs(q, k, scale, torch.float32)  # (B, H, Lq, Lk)
        if self.recording:
            prev = self.maps.get(layer)
            self.maps[layer] = probs.detach() if prev is None else prev + probs.detach()
        return torch.matmul(probs.to(v.dtype), v)


def daam_heat_maps(summed: Mapping[str, torch.Tensor], latent_side: int) -> torch.Tensor:
    """(Lk, S, S) token heat maps of one sample from its per-layer (H, Lq, Lk) summed probabilities: each (layer,
    head) map upsampled bicubically to S = `latent_side`, clamped at 0, averaged over layers and heads; layers
    whose side is 1/8 of S are left out, as DAAM does."""
    ups = []
    for layer, m in summed.items():
        heads, lq, lk = m.shape
        side = math.isqrt(lq)
        if side * side != lq:
            raise ValueError(f"{layer}: {lq} queries is not a square map")
        if side * 8 == latent_side:
            continue
        x = m.float().permute(0, 2, 1).reshape(heads * lk, 1, side, side)
        up = F.interpolate(x, size=(latent_side, latent_side), mode="bicubic").clamp_(min=0)
        ups.append(up.view(heads, lk, latent_side, latent_side))
    if not ups:
        raise ValueError("no cross-attention maps to aggregate")
    return torch.cat(ups).mean(0)


def word_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (after the start token) of every occurrence of `word`'s tokens in `prompt`, lower-cased."""
    tokens = [t.replace("</w>", "") for t in tokenizer.tokenize(prompt.lower())]
    wanted = [t.replace("</w>", "") for t in tokenizer.tokenize(word.lower())]
    out: list[int] = []
    for start in range(len(tokens) - len(wanted) + 1):
        if wanted and tokens[start : start + len(wanted)] == wanted:
            out += [start + j + 1 for j in range(len(wanted))]
    return out


def word_mask(heat: torch.Tensor, size: tuple[int, int], threshold: float = 0.4) -> torch.Tensor:
    """A word's (S, S) map upsampled bicubically to `size` (H, W), min-max normalised, > threshold (bool)."""
    im = F.interpolate(heat.float()[None, None], size=size, mode="bicubic")[0, 0]
    im = (im - im.min()) / (im.max() - im.min() + 1e-8)
    return im > threshold


def mask_iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    pred, truth = pred.bool(), truth.bool()
    inter = (pred & truth).sum().item()
    return float(inter / ((pred | truth).sum().item() + 1e-8))


# --------------------------------------------------------------------------- null-text inversion


def _eps(unet, latent, t, emb, kwargs=None) -> torch.Tensor:
    return unet(latent, t, encoder_hidden_states=emb, cross_attention_kwargs=kwargs).sample


@torch.no_grad()
def ddim_inversion(unet, scheduler_config, latent: torch.Tensor, cond: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """[z*_0, z*_{t_1}, ..., z*_T]: deterministic DDIM inversion of `latent` with the prompt embedding, no guidance."""
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(scheduler_config)
    inverse.set_timesteps(steps, device=latent.device)
    out = [latent]
    for t in inverse.timesteps:
        out.append(inverse.step(_eps(unet, out[-1], t, cond), t, out[-1]).prev_sample)
    return out


def _guided_step(unet, scheduler, latent, t, cond, uncond, guidance, kwargs=None):
    eps_u = _eps(unet, latent, t, uncond)
    eps_c = _eps(unet, latent, t, cond, kwargs)
    return scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latent).prev_sample


def null_text_optimization(
    unet,
    scheduler_config,
    trajectory: Sequence[torch.Tensor],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    guidance: float = 7.5,
    inner_steps: int = 10,
    learning_rate: float = 0.01,
    early_stop: float = 1e-5,
) -> list[torch.Tensor]:
    """One optimised unconditional embedding per DDIM step (module docstring), for `ddim_inversion`'s trajectory."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(len(trajectory) - 1, device=trajectory[0].device)
    frozen = [p for p in unet.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        latent, current, out = trajectory[-1], uncond.detach().clone(), []
        for i, t in enumerate(scheduler.timesteps):
            target = trajectory[-i - 2]
            with torch.no_grad():
                eps_c = _eps(unet, latent, t, cond)
            current = current.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([current], lr=learning_rate * (1.0 - i / 100.0))
            for _ in range(inner_steps):
                eps_u = _eps(unet, latent, t, current)
                pred = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latent).prev_sample
                loss = F.mse_loss(pred, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if loss.item() < early_stop + i * 2e-5:
                    break
            current = current.detach()
            out.append(current)
            with torch.no_grad():
                latent = _guided_step(unet, scheduler, latent, t, cond, current, guidance)
        return out
    finally:
        for p in frozen:
            p.requires_grad_(True)


@torch.no_grad()
def regenerate(
    unet,
    scheduler_config,
    latent_T: torch.Tensor,
    cond: torch.Tensor,
    unconds: Sequence[torch.Tensor],
    *,
    guidance: float = 7.5,
    recorder: Recorder | None = None,
) -> torch.Tensor:
    """The guided DDIM sampling from z_T with one unconditional embedding per step; the conditional branch's
    attention goes to `recorder` (opened here) when given. Returns z_0."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(len(unconds), device=latent_T.device)
    latent = latent_T
    for t, uncond in zip(scheduler.timesteps, unconds):
        if recorder is None:
            latent = _guided_step(unet, scheduler, latent, t, cond, uncond, guidance)
        else:
            with recorder:
                latent = _guided_step(unet, scheduler, latent, t, cond, uncond, guidance, recorder.kwargs)
    return latent


# --------------------------------------------------------------------------- COCO-Gen


def load_mask(path: Path) -> torch.Tensor:
    """A DAAM ground-truth mask: the PNG's alpha channel > 0 (an image without alpha: any non-zero pixel)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGBA"))[:, :, 3] if "A" in im.getbands() else np.asarray(im.convert("L"))
    return torch.from_numpy(arr > 0)


def cocogen_items(data_dir: str | Path, limit: int | None = None) -> list[dict]:
    """COCO-Gen's images with a mask: [{"key", "prompt", "image", "masks": {word: path list}}], sorted by folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"daam_cocogen.data_dir: COCO-Gen folder not found: {root}")
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        masks: dict[str, list[str]] = {}
        for m in sorted(folder.glob("*.gt.png")):
            masks.setdefault(m.name[: -len(".gt.png")].lower(), []).append(str(m))
        if not masks:
            continue
        for name in ("prompt.txt", "output.png"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: COCO-Gen image folder without {name}")
        prompt = (folder / "prompt.txt").read_text(encoding="utf-8").strip()
        items.append({"key": folder.name, "prompt": prompt, "image": str(folder / "output.png"), "masks": masks})
    if not items:
        raise ValueError(f"{root}: no COCO-Gen image folder with a <word>.gt.png mask")
    return items[:limit] if limit is not None else items


def daam_image_records(pipe, plan, item: Mapping, cfg: DaamCocoGenConfig, resolution: int, device) -> list[dict]:
    """Null-text-invert one COCO-Gen image under `pipe`, collect DAAM's heat maps while regenerating, and score each
    annotated word the prompt contains: [{"key", "word", "iou"}]. `plan`: the observed layers (down and up)."""
    from tcscale.attention.processors import observe

    observe(pipe.unet, plan)
    dtype = pipe.unet.dtype
    with Image.open(item["image"]) as im:
        image = im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(device, dtype)
    with torch.no_grad():
        latent = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        cond = pipe.encode_prompt(item["prompt"], device, 1, False)[0]
        uncond = pipe.encode_prompt("", device, 1, False)[0]
    config = pipe.scheduler.config
    trajectory = ddim_inversion(pipe.unet, config, latent, cond, cfg.num_inference_steps)
    unconds = null_text_optimization(
        pipe.unet, config, trajectory, cond, uncond, guidance=cfg.guidance_scale, inner_steps=cfg.inner_steps,
        learning_rate=cfg.learning_rate, early_stop=cfg.early_stop,
    )  # fmt: skip
    side = latent.shape[-1]
    capture = HeadMapCapture((side, side))
    regenerate(pipe.unet, config, trajectory[-1], cond, unconds, guidance=cfg.guidance_scale, recorder=capture)
    heat = daam_heat_maps({k: v[0] for k, v in capture.maps.items()}, side)
    records = []
    for word, paths in item["masks"].items():
        idx = word_token_indices(pipe.tokenizer, item["prompt"], word)
        if not idx:
            continue  # DAAM scores only the annotated words the prompt contains
        truth = torch.zeros((), dtype=torch.bool)
        for p in paths:
            truth = truth | load_mask(Path(p))
        pred = word_mask(heat[idx].mean(0).cpu(), tuple(truth.shape), cfg.threshold)
        records.append({"key": item["key"], "word": word, "iou": mask_iou(pred, truth)})
    return records


def summarize_daam(records: Sequence[Mapping]) -> dict[str, float]:
    if not records:
        raise ValueError("no (image, word) pair to score: no annotated word occurs in its prompt")
    return {"daam_cocogen/miou": float(np.mean([r["iou"] for r in records]))}


def write_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(records))
    tmp.replace(path)


__all__ = [
    "DaamCocoGenConfig",
    "HeadMapCapture",
    "daam_heat_maps",
    "word_token_indices",
    "word_mask",
    "mask_iou",
    "ddim_inversion",
    "null_text_optimization",
    "regenerate",
    "load_mask",
    "cocogen_items",
    "daam_image_records",
    "summarize_daam",
]
