"""SDXL: the released shape on the meta device, tiny SDXL-shaped components, both text towers and the
micro-conditioning as diffusers' SDXL pipeline computes them, token positions across the two tokenizers, and
configs/tiny_sdxl_cpu.yaml on 2 ranks (ZeRO-2): grounding losses in MLflow, exact resume, an SDXL pipeline export."""

from __future__ import annotations

import pytest
import torch

from tcscale.config import load_config
from tcscale.families.sdxl import second_tokenizer_ids
from tcscale.models.architectures import build_random_components, build_tiny_components
from tcscale.models.conditioning import encode_text
from tcscale.models.tokenizer import sd_clip_tokenizer, sdxl_second_tokenizer
from tests.helpers import launch
from tests.helpers.buckets import BUCKETED

CONFIG = "configs/tiny_sdxl_cpu.yaml"
CAPTIONS = [
    "a photo of a red circle and a blue square",
    "an old teddy bear sitting next to a fire hydrant on a snowy street",
    " ".join(["a large brown dog"] * 30),  # > 77 tokens: truncated, no padding
]


def test_sdxl_architecture_is_the_released_shape_on_meta():
    from tcscale.attention.plan import select_layers

    comps = build_random_components("sdxl", device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(comps.unet) == 2_567_463_684
    assert count(comps.text_encoder) == 123_060_480  # CLIP ViT-L/14 text tower
    assert count(comps.text_encoder_2) == 694_659_840  # OpenCLIP ViT-bigG/14 text tower + projection
    assert comps.unet.config.addition_embed_type == "text_time" and comps.vae.config.scaling_factor == 0.13025
    assert all(p.is_meta for p in comps.unet.parameters())
    layers = select_layers(comps.unet, ["mid", "up"], None, 128)
    assert len(layers) == 46  # up_blocks.0 (3 x 10 at 32²), up_blocks.1 (3 x 2 at 64²), mid (10 at 32²)


def test_second_tokenizer_ids_and_token_positions_agree():
    tok_1, tok_2 = sd_clip_tokenizer(), sdxl_second_tokenizer()
    assert tok_1.pad_token_id != tok_2.pad_token_id  # the only difference the derivation has to handle
    kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids_1, ids_2 = tok_1(CAPTIONS, **kw).input_ids, tok_2(CAPTIONS, **kw).input_ids
    assert not torch.equal(ids_1, ids_2)
    derived = second_tokenizer_ids(ids_1, tok_1.eos_token_id, tok_2.pad_token_id)
    assert torch.equal(derived, ids_2)
    # every content token (BOS .. EOS) sits at the same position in both tokenizations
    for a, b in zip(ids_1, ids_2):
        eos = int((a == tok_1.eos_token_id).nonzero()[0])
        assert torch.equal(a[: eos + 1], b[: eos + 1])


def test_sdxl_conditioning_matches_the_diffusers_pipeline():
    """Per-token states of both towers' penultimate layers concatenated, the second tower's pooled projection
    and the time ids: what StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids compute."""
    from tcscale.families import FAMILIES

    comps = build_tiny_components(load_config(CONFIG, ["max_steps=1"]).model.tiny, 64, "sdxl")
    pipe = FAMILIES["sdxl"].pipeline(comps)
    prompts = CAPTIONS[:2]
    ids = comps.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    crops, originals = torch.tensor([[0, 5], [3, 0]]), torch.tensor([[80, 96], [64, 70]])
    cond = encode_text(comps, ids.input_ids, dtype=torch.float32, device="cpu", target_size=(64, 64),
                       original_sizes=originals, crop_top_lefts=crops)  # fmt: skip
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert cond.text.shape == (2, 77, comps.unet.config.cross_attention_dim) == embeds.shape
    torch.testing.assert_close(cond.text, embeds)
    torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"], pooled)
    for i in range(2):
        ref = pipe._get_add_time_ids(
            tuple(originals[i].tolist()), tuple(crops[i].tolist()), (64, 64), dtype=torch.float32,
            text_encoder_projection_dim=comps.text_encoder_2.config.projection_dim,
        )  # fmt: skip
        torch.testing.assert_close(cond.added_cond_kwargs["time_ids"][i : i + 1], ref)
    sd = build_tiny_components(load_config("configs/tiny_cpu.yaml", ["max_steps=1"]).model.tiny, 64)
    assert encode_text(sd, ids.input_ids, dtype=torch.float32, device="cpu").added_cond_kwargs is None


def test_loader_batches_carry_the_crop_for_micro_conditioning(tmp_path):
    from tcscale.data import build_train_loader
    from tcscale.models.sd import load_components

    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "max_steps=1"])
    comps = load_components(cfg.model, cfg.data.resolution)
    loader = build_train_loader(cfg.data, comps.tokenizer, rank=0, world_size=1, micro_batch_size=2, seed=0)
    batch = next(iter(loader))
    loader.close()
    assert batch["original_sizes"].shape == (2, 2) and batch["crop_top_lefts"].shape == (2, 2)
    assert (batch["original_sizes"] > 0).all() and (batch["crop_top_lefts"] >= 0).all()


def test_sdxl_family_mismatch_with_a_pipeline_dir_is_named(tmp_path):
    from tcscale.models.sd import ModelLoadError, load_components, save_pipeline_dir

    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "max_steps=1"])
    save_pipeline_dir(load_components(cfg.model, 64), tmp_path / "xl")
    cfg.model.family, cfg.model.pretrained = "sd", str(tmp_path / "xl")
    with pytest.raises(ModelLoadError, match="model.family=sdxl"):
        load_components(cfg.model, 64)


@pytest.mark.distributed
@pytest.mark.slow
def test_tiny_sdxl_two_ranks_zero2_bucketed_logs_grounding_resumes_exactly_and_exports(tmp_path):
    """4 steps on 2 ranks (ZeRO-2), images of 3 aspect ratios in aspect-ratio buckets (each rank's micro-batch one
    bucket), with checkpoints at 2 and 4; a copy of the run cut back to its step-2 checkpoint resumes to step 4 with
    the same weights (the bucketed sampler resumes where it stopped); the export is a StableDiffusionXLPipeline that
    generates."""
    from diffusers import StableDiffusionXLPipeline

    from tcscale.train.export import export_pipeline

    launch.two_rank_grounded_run_resumes_exactly(tmp_path, CONFIG, "tcscale-tiny-sdxl", extra=BUCKETED)
    ref = tmp_path / "uninterrupted"
    out = export_pipeline(ref, tmp_path / "export")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    image = pipe("a photo of a red circle", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (64, 64)


def test_sdxl_validation_and_eval_load_pipeline(tmp_path):
    """A tiny SDXL run with validation logs its images; eval's load_pipeline returns a StableDiffusionXLPipeline for
    the export and generates through the eval generation loop."""
    from diffusers import StableDiffusionXLPipeline

    from tcscale.eval.config import EvalModelConfig, SamplerConfig
    from tcscale.eval.generation import GenItem, generate_missing, load_pipeline
    from tcscale.train import trainer as trainer_mod
    from tcscale.train.export import export_pipeline
    from tests.helpers.launch import image_series, mlflow_runs

    run = tmp_path / "run"
    cfg = load_config(CONFIG, [f"output_dir={run}", "max_steps=1", "checkpoint.every_steps=0",
                               "validation.every_steps=1", "validation.num_inference_steps=2",
                               "validation.grounding.enabled=true", "validation.grounding.source=synthetic",
                               "validation.grounding.num_samples=2",
                               "validation.grounding.timesteps=[100]"])  # fmt: skip
    trainer_mod.train(cfg)
    client, runs = mlflow_runs(run, "tcscale-tiny-sdxl")
    files = [a.path for a in client.list_artifacts(runs[0].info.run_id, "images")]
    assert ("validation/prompt0", 1) in image_series(files)  # a step-indexed image series
    miou = client.get_metric_history(runs[0].info.run_id, "grounding/miou")  # both towers, micro-conditioning
    assert [m.step for m in miou] == [1] and 0 <= miou[0].value <= 1
    out = export_pipeline(run, tmp_path / "export")
    sampler = SamplerConfig(scheduler="ddim", num_inference_steps=2, resolution=64, batch_size=2)
    pipe = load_pipeline(str(out), EvalModelConfig(pretrained=str(out)), sampler, "cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    stats = generate_missing(pipe, [GenItem("0", "a photo of a red circle", 0)], tmp_path / "images", sampler,
                             progress=False)  # fmt: skip
    assert stats.generated == 1 and (tmp_path / "images" / "0.png").is_file()

    # the eval grounding suite's records on the SDXL pipeline: its U-Net conditioned as the pipeline conditions it
    from tcscale.attention.plan import GroundingPlan, vae_scale_factor
    from tcscale.eval.grounding_maps import grounding_batches, grounding_records, text_conditioning

    batches = list(grounding_batches("synthetic", pipe.tokenizer, resolution=64, num_samples=2, batch_size=2))
    cond = text_conditioning(pipe, batches[0], family="sdxl", dtype=torch.float32, device="cpu")
    with torch.no_grad():
        captions = [pipe.tokenizer.decode(ids, skip_special_tokens=True) for ids in batches[0]["input_ids"]]
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.text, embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"], pooled, rtol=1e-5, atol=1e-5)
    plan = GroundingPlan.build(pipe.unet, blocks=["mid", "up"], resolutions=None, image_resolution=64,
                               scale_factor=vae_scale_factor(pipe.vae))  # fmt: skip
    records = grounding_records(
        pipe.unet, pipe.vae, pipe, pipe.scheduler, plan, batches, timesteps=[100], family="sdxl"
    )
    assert records and all(0 <= r["iou"] <= 1 for r in records)
