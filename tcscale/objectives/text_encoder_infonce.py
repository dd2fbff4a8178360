"""The contrastive text-encoder stage: InfoNCE finetuning of SD's CLIP text encoder on (object crop, phrase) pairs.

The seed study (a course project built on TokenCompose) finetuned the text encoder on COCO object crops cut by
their masks, so that it sees off-centre and occluded instances, then swapped it into a trained TokenCompose SD1.4.
Here the same stage is one objective:

* text tower: `model.pretrained`'s text encoder (or `model.text_encoder_path`), the one SD's U-Net reads, so the
  result drops back into a pipeline; which of its layers train: all, or the last N (+ the final layer norm);
* image tower: frozen, `image_model` (a CLIP checkpoint; SD1.x's text encoder is CLIP ViT-L/14's text tower, so
  `openai/clip-vit-large-patch14` puts both in CLIP's own joint space), with its visual projection;
* projection of the text tower's pooled output into the image embedding space: the image checkpoint's own
  `text_projection` when it has one of the right width (frozen by default: what is learnt must live in the encoder
  SD reads), else a new linear map (trained);
* loss: `tcscale.losses.info_nce` over the micro-batch's pairs (symmetric by default, `symmetric: false` is the
  seed's one-directional form), in-batch duplicates of a phrase left out of the negatives; temperature fixed or
  learnt (log 1/τ, clamped at τ ≥ 0.01 as CLIP);
* data: crops of the training stream's grounded images (`tcscale.data.crops`, policy under `crops`), through the
  usual loader (seeding and exact resume as every objective); a micro-batch is `train_micro_batch_size_per_gpu`
  images and every pair they give (negatives are this rank's pairs: no cross-rank gathering);
* validation: held-out text→crop and crop→text recall@1/@5 (`recall`) at `validation.every_steps`, next to the
  starting encoder's values (`recall/start/...`, measured when the run is built), so a run shows whether the
  encoder improved before any GPU time goes into the U-Net;
* export: the run's checkpoint exports as a pipeline with the finetuned `text_encoder/` (a `CLIPTextModel`
  directory) and the base U-Net; `launchers/export.py --text-encoder` writes the encoder alone.

What the engine wraps is `TextTower` (text encoder + projection + temperature); its `text_encoder.` entries are
the exported CLIPTextModel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from tcscale.data.crops import CLIP_MEAN, CLIP_STD, CropConfig, CropProcessor, check_crop_config, held_out_crops
from tcscale.eval.retrieval import retrieval_recall
from tcscale.losses.contrastive import info_nce
from tcscale.objectives.base import BuildContext, Objective, StepOutput, register_objective

SECTION = "objective.text_encoder_infonce"
MIN_TEMPERATURE = 0.01  # CLIP clamps its logit scale at 100
RECALL_KS = (1, 5)


@dataclass
class RecallConfig:
    """Held-out text→crop recall, logged at `validation.every_steps` (see tcscale/eval/retrieval.py)."""

    enabled: bool = True  # measure recall@1/@5 on held-out crops at every validation step (and for the start)
    source: Literal["synthetic", "webdataset"] = "synthetic"  # held-out grounded images: shapes world | shards
    shards: str | None = None  # brace-named held-out shards (source=webdataset), read in order, one pass
    synthetic_seed: int = 4321  # source=synthetic: world seed (the training world's is data.synthetic.seed)
    num_images: int = 64  # held-out images read
    max_crops: int = 512  # crops kept of them (the gallery), first come
    batch_size: int = 64  # crops or texts per forward


@dataclass
class TextEncoderInfoNCEConfig:
    # CLIP checkpoint with the (frozen) image tower: hub id or dir, CLIPModel or CLIPVisionModelWithProjection layout
    # (SD1.x: openai/clip-vit-large-patch14, whose text tower is SD1.x's text encoder). Required.
    image_model: str | None = None
    image_model_revision: str | None = None  # hub revision of image_model
    # text-side projection: auto (image_model's text_projection if it fits, else new) | pretrained | new
    projection: Literal["auto", "pretrained", "new"] = "auto"
    train_projection: bool | None = None  # null: train a new projection, keep a pretrained one frozen
    temperature: float = 0.07  # τ of the logits t̂·v̂/τ (the starting value when learnt)
    learn_temperature: bool = False  # learn log(1/τ) (clamped at τ >= 0.01)
    symmetric: bool = True  # mean of text→image and image→text; false: text→image only (the seed study's form)
    mask_duplicates: bool = True  # pairs with the same phrase in a batch are not each other's negatives
    train_layers: Literal["all", "last_n"] = "all"  # all text-encoder weights | the last `last_n` layers + final LN
    last_n: int = 2  # train_layers=last_n: number of transformer layers trained, counted from the top
    template: str = "a photo of a {}"  # text of a pair; {} is the phrase (the seed study's template is not stated)
    crops: CropConfig = field(default_factory=CropConfig)  # which objects become crops, and how they are cut
    recall: RecallConfig = field(default_factory=RecallConfig)  # held-out recall at validation steps


class TextTower(nn.Module):
    """The trained module: CLIP text encoder -> pooled (EOS) output -> projection; and the temperature.
    `forward(input_ids) -> (embeddings (N, D), τ)`: τ comes out of the forward so that a sharded (ZeRO-3) learnt
    temperature is read while its parameter is gathered."""

    def __init__(self, text_encoder: nn.Module, projection: nn.Linear, temperature: float, learn_temperature: bool):
        super().__init__()
        self.text_encoder = text_encoder
        self.projection = projection
        self.fixed_temperature = None if learn_temperature else float(temperature)
        if learn_temperature:  # shape (1,): DeepSpeed broadcasts parameters as bytes, which a 0-dim one cannot be
            self.log_inv_temperature = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))

    def temperature(self) -> torch.Tensor:
        if self.fixed_temperature is not None:
            return torch.tensor(self.fixed_temperature)
        return torch.exp(-self.log_inv_temperature.float().clamp(max=math.log(1.0 / MIN_TEMPERATURE)))[0]

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.text_encoder(input_ids=input_ids).pooler_output  # (N, hidden): final LN at the EOS token
        return self.projection(pooled), self.temperature()

    def enable_gradient_checkpointing(self) -> None:
        """`model.gradient_checkpointing`: non-reentrant checkpointing of the encoder layers (frozen embeddings
        would stop a reentrant checkpoint's gradients)."""
        self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class ImageTower:
    model: nn.Module  # CLIPVisionModelWithProjection
    text_projection: nn.Linear | None  # the checkpoint's text-side projection (None: it has none)
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_image_tower(cfg: TextEncoderInfoNCEConfig, text_hidden: int) -> ImageTower:
    """The frozen image tower of `image_model` and, when the checkpoint is a full CLIP model whose text width is
    `text_hidden`, its text projection."""
    from transformers import AutoConfig, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from tcscale.models.sd import ModelLoadError

    ref, key = cfg.image_model, f"{SECTION}.image_model"
    kw = {"revision": cfg.image_model_revision}
    try:
        config = AutoConfig.from_pretrained(ref, **kw)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{key}={ref!r}: cannot read a CLIP config: {exc}") from exc
    text_config = None
    if config.model_type == "clip":  # a full CLIP checkpoint: the sub-configs carry the shared projection width
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        if config.text_config.hidden_size == text_hidden:
            text_config = config.text_config
            text_config.projection_dim = config.projection_dim
    elif config.model_type == "clip_vision_model":
        vision_config = config
    else:
        raise ModelLoadError(f"{key}={ref!r}: a CLIP checkpoint is needed, this one is {config.model_type!r}")
    try:
        vision = CLIPVisionModelWithProjection.from_pretrained(ref, config=vision_config, **kw)
        projection = None
        if text_config is not None and cfg.projection != "new":
            projection = CLIPTextModelWithProjection.from_pretrained(ref, config=text_config, **kw).text_projection
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{key}={ref!r}: cannot load the CLIP towers: {exc}") from exc
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        from transformers import CLIPImageProcessor

        proc = CLIPImageProcessor.from_pretrained(ref, **kw)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError):  # no preprocessor_config.json: OpenAI CLIP's constants
        pass
    return ImageTower(vision, projection, int(vision.config.image_size), mean, std)


def text_projection(cfg: TextEncoderInfoNCEConfig, tower: ImageTower, text_hidden: int, seed: int) -> nn.Linear:
    """The pretrained projection, or a new one (CLIP's init, seeded: the same on every rank)."""
    from tcscale.config import ConfigError

    if tower.text_projection is not None:
        return tower.text_projection
    if cfg.projection == "pretrained":
        raise ConfigError(
            f"{SECTION}.projection=pretrained: {cfg.image_model!r} has no text projection of width {text_hidden} "
            "(not a full CLIP checkpoint, or another text width); use projection=auto or new"
        )
    out_dim = int(tower.model.config.projection_dim)
    projection = nn.Linear(text_hidden, out_dim, bias=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(out_dim, text_hidden, generator=g) * text_hidden**-0.5)
    return projection


def set_trainable_layers(text_encoder: nn.Module, cfg: TextEncoderInfoNCEConfig) -> None:
    from tcscale.config import ConfigError

    if cfg.train_layers == "all":
        text_encoder.requires_grad_(True)
        return
    text_encoder.requires_grad_(False)
    layers = text_encoder.text_model.encoder.layers
    if not 1 <= cfg.last_n <= len(layers):
        raise ConfigError(f"{SECTION}.last_n={cfg.last_n}: the text encoder has {len(layers)} layers")
    for layer in layers[len(layers) - cfg.last_n :]:
        layer.requires_grad_(True)
    text_encoder.text_model.final_layer_norm.requires_grad_(True)


class TextEncoderInfoNCEObjective(Objective):
    """InfoNCE between the trained text tower's phrase embeddings and the frozen image tower's crop embeddings."""

    def __init__(self, cfg: TextEncoderInfoNCEConfig, ctx: BuildContext):
        from tcscale.models.sd import load_base_text_encoder

        self.cfg, self.ctx = cfg, ctx
        self.device, self.dtype = ctx.device, ctx.dtype
        run = ctx.cfg
        # the trainer keeps the frozen text encoder in the compute dtype; the trained copy starts from float32
        text_encoder = ctx.comps.text_encoder
        if next(text_encoder.parameters()).dtype != torch.float32:
            text_encoder = load_base_text_encoder(run.model, run.data.resolution)
        ctx.comps.text_encoder = text_encoder  # the components now name the encoder being trained
        hidden = int(text_encoder.config.hidden_size)
        tower = load_image_tower(cfg, hidden)
        projection = text_projection(cfg, tower, hidden, run.seed)
        set_trainable_layers(text_encoder, cfg)
        train_projection = cfg.train_projection if cfg.train_projection is not None else tower.text_projection is None
        projection.requires_grad_(train_projection)
        self.module = TextTower(text_encoder, projection, cfg.temperature, cfg.learn_temperature).to(self.device)
        self.image_tower = tower.model.requires_grad_(False).to(self.device, self.dtype).eval()
        self.tokenizer = ctx.comps.tokenizer
        self.processor = CropProcessor(
            self.tokenizer, cfg.crops, image_size=tower.image_size, template=cfg.template, mean=tower.mean,
            std=tower.std, random_flip=run.data.random_flip,
        )  # fmt: skip
        self.empty_ids = torch.tensor([self.processor.text_ids("")], dtype=torch.int64)
        self._held_out: dict | None = None
        self.start_metrics: dict[str, float] = {}
        if cfg.recall.enabled and run.validation.every_steps > 0:
            self.start_metrics = {k.replace("recall/", "recall/start/"): v for k, v in self.recall(self.module).items()}
            if ctx.rank == 0:
                held = self._held_out
                print(
                    f"text_encoder_infonce: held-out set of {len(held['labels'])} crops, {len(held['queries'])} "
                    "phrases; starting encoder "
                    + " ".join(f"{k.removeprefix('recall/start/')}={v:.3f}" for k, v in self.start_metrics.items()),
                    flush=True,
                )

    # -- the protocol ----------------------------------------------------------------------------
    def build_loader(self, data_cfg, tokenizer, *, rank, world_size, micro_batch_size, seed, start_step, anchor=None):
        """Object crops and their phrases (the synthetic slot anchor does not apply to crop streams)."""
        from tcscale.data.crops import build_crop_loader

        return build_crop_loader(
            data_cfg, tokenizer, self.processor, rank=rank, world_size=world_size,
            micro_batch_size=micro_batch_size, seed=seed, start_step=start_step,
        )  # fmt: skip

    @torch.no_grad()
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_tower(pixel_values=pixel_values.to(self.device, self.dtype)).image_embeds

    def __call__(self, model, batch: dict, generator: torch.Generator) -> StepOutput:
        input_ids = batch["input_ids"].to(self.device)
        if input_ids.shape[0] == 0:  # no usable object in this micro-batch: the forward still runs (ZeRO-3)
            emb, _ = model(self.empty_ids.to(self.device))
            loss = emb.float().sum() * 0.0
            return StepOutput(loss, {"infonce": loss})
        image_emb = self.image_embeddings(batch["pixel_values"])
        text_emb, temperature = model(input_ids)
        labels = batch["labels"] if self.cfg.mask_duplicates else None
        loss = info_nce(text_emb, image_emb, temperature, symmetric=self.cfg.symmetric, labels=labels)
        return StepOutput(loss, {"infonce": loss})

    # -- validation ------------------------------------------------------------------------------
    def held_out(self) -> dict:
        """The held-out gallery (crop embeddings, labels) and queries (one text per distinct phrase), built once."""
        if self._held_out is None:
            run, r = self.ctx.cfg, self.cfg.recall
            processor = CropProcessor(
                self.tokenizer, self.cfg.crops, image_size=self.processor.image_size, template=self.cfg.template,
                mean=self.processor.mean, std=self.processor.std, random_flip=False, subsample=False,
            )  # fmt: skip
            s = run.data.synthetic
            crops = held_out_crops(
                processor, source=r.source, num_images=r.num_images, max_crops=r.max_crops,
                resolution=run.data.resolution, shards=r.shards, synthetic_seed=r.synthetic_seed,
                max_objects=s.max_objects, min_objects=s.min_objects, phrase=s.phrase,
            )  # fmt: skip
            gallery = [
                self.image_embeddings(chunk).float().cpu() for chunk in crops["pixel_values"].split(r.batch_size)
            ]
            first: dict[int, str] = {}
            for label, phrase in zip(crops["labels"].tolist(), crops["phrases"]):
                first.setdefault(label, phrase)
            queries = torch.tensor([processor.text_ids(first[i]) for i in range(len(first))], dtype=torch.int64)
            self._held_out = {
                "gallery": torch.cat(gallery) if gallery else torch.zeros(0, 1),
                "labels": crops["labels"],
                "queries": queries.reshape(-1, 77),
            }
        return self._held_out

    @torch.no_grad()
    def recall(self, tower: nn.Module) -> dict[str, float]:
        """Held-out recall@1/@5, text→crop (a distinct phrase finds a crop of it) and crop→text."""
        held = self.held_out()
        was_training = tower.training
        tower.eval()
        try:
            chunks = held["queries"].split(self.cfg.recall.batch_size)
            texts = [tower(ids.to(self.device))[0].float().cpu() for ids in chunks]
        finally:
            tower.train(was_training)
        text_emb = torch.cat(texts) if texts else torch.zeros(0, 1)
        phrase_labels = torch.arange(text_emb.shape[0])
        t2c = retrieval_recall(text_emb, held["gallery"], phrase_labels, held["labels"], RECALL_KS)
        c2t = retrieval_recall(held["gallery"], text_emb, held["labels"], phrase_labels, RECALL_KS)
        out = {f"recall/text_to_crop/R{k}": v for k, v in t2c.items()}  # MLflow names: no "@"
        out.update({f"recall/crop_to_text/R{k}": v for k, v in c2t.items()})
        return out

    def validate(self, module: nn.Module) -> dict[str, float]:
        """The trainer's validation hook (every rank; the forwards are collective under ZeRO-3)."""
        metrics: dict[str, float] = {}
        if self.cfg.recall.enabled:
            metrics.update(self.recall(module))
            metrics.update(self.start_metrics)
        with torch.no_grad():
            metrics["temperature"] = float(module(self.empty_ids.to(self.device))[1])
        return metrics


def exported_components(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint's `text_encoder.` entries are the pipeline's text encoder; the projection and temperature only
    served the loss."""
    prefix = "text_encoder."
    return {"text_encoder": {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}}


def check_text_encoder_infonce(cfg) -> None:
    c = cfg.objective.text_encoder_infonce
    if not c.image_model:
        raise ValueError(
            f"{SECTION}.image_model must name the CLIP checkpoint of the image tower (a hub id or directory, e.g. "
            "openai/clip-vit-large-patch14 for SD1.x)"
        )
    if not c.temperature > 0:
        raise ValueError(f"{SECTION}.temperature must be > 0, got {c.temperature}")
    if c.learn_temperature and c.temperature < MIN_TEMPERATURE:
        raise ValueError(f"{SECTION}.temperature must be >= {MIN_TEMPERATURE} when learnt, got {c.temperature}")
    if c.last_n < 1:
        raise ValueError(f"{SECTION}.last_n must be >= 1, got {c.last_n}")
    if c.template.count("{}") != 1:
        raise ValueError(f"{SECTION}.template must hold one '{{}}' (the phrase), got {c.template!r}")
    check_crop_config(c.crops, f"{SECTION}.crops")
    r = c.recall
    for key in ("num_images", "max_crops", "batch_size"):
        if getattr(r, key) <= 0:
            raise ValueError(f"{SECTION}.recall.{key} must be > 0, got {getattr(r, key)}")
    if r.enabled and r.source == "webdataset" and not r.shards:
        raise ValueError(f"{SECTION}.recall.source=webdataset needs {SECTION}.recall.shards (held-out shards)")


register_objective(
    "text_encoder_infonce",
    TextEncoderInfoNCEConfig,
    TextEncoderInfoNCEObjective,
    check=check_text_encoder_infonce,
    description="InfoNCE finetuning of the CLIP text encoder on (object crop, phrase) pairs, image tower frozen",
    export_components=exported_components,
)
