"""The model side of the evaluation, in-process on a tiny pipeline: generation (seeds, resume, unreadable files),
grounding mIoU against an independent computation, the attention viewer, config and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tcscale.eval.config import EvalModelConfig, SamplerConfig, load_eval_config
from tcscale.eval.generation import EvalInputError, GenItem, generate_missing, image_seed, load_pipeline, rank_items


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from tcscale.config import TinyModelConfig
    from tcscale.models.architectures import build_tiny_components
    from tcscale.models.sd import save_pipeline_dir

    return save_pipeline_dir(build_tiny_components(TinyModelConfig(), 64), tmp_path_factory.mktemp("pipe") / "p")


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(str(tiny_pipeline_dir), EvalModelConfig(pretrained="x"), SamplerConfig("ddim"), "cpu")


SAMPLER = SamplerConfig(scheduler="ddim", num_inference_steps=2, resolution=64, batch_size=3)


def test_seeds_are_a_pure_function_and_ranks_partition_items():
    assert image_seed(0, "multigen_coco", 7, 3) == image_seed(0, "multigen_coco", 7, 3)
    assert len({image_seed(0, "s", p, r) for p in range(50) for r in range(10)}) == 500
    assert image_seed(1, "s", 0, 0) != image_seed(0, "s", 0, 0) and image_seed(0, "t", 0, 0) != image_seed(0, "s", 0, 0)
    items = [GenItem(str(i), "p", i) for i in range(11)]
    shares = [rank_items(items, r, 3) for r in range(3)]
    assert sorted(it.key for s in shares for it in s) == sorted(it.key for it in items)
    keys = [{it.key for it in s} for s in shares]
    assert all(not a & b for i, a in enumerate(keys) for b in keys[i + 1 :])


def test_generation_is_batch_independent_resumes_and_regenerates_unreadable(pipe, tmp_path):
    items = [GenItem(f"{i:02d}", "a photo of a red circle and a blue star", image_seed(0, "t", i, 0)) for i in range(4)]
    a, b = tmp_path / "a" / "images", tmp_path / "b" / "images"
    stats = generate_missing(pipe, items, a, SAMPLER, progress=False)
    assert (stats.generated, stats.existing, stats.unreadable) == (4, 0, 0)
    one_by_one = SamplerConfig(scheduler="ddim", num_inference_steps=2, resolution=64, batch_size=1)
    generate_missing(pipe, items, b, one_by_one, progress=False)
    for it in items:  # an image depends on its seed, not on its batch-mates
        x = np.asarray(Image.open(a / f"{it.key}.png"), dtype=np.int16)
        y = np.asarray(Image.open(b / f"{it.key}.png"), dtype=np.int16)
        assert np.abs(x - y).max() <= 1
    (a / "01.png").write_bytes(b"not a png")  # a file a killed run left half-written
    (a / "02.png").unlink()
    before = (a / "00.png").read_bytes()
    again = generate_missing(pipe, items, a, SAMPLER, progress=False)
    assert (again.generated, again.existing, again.unreadable) == (2, 2, 1)
    assert (a / "00.png").read_bytes() == before  # untouched
    lines = [json.loads(x) for x in (a.parent / "generated-rank0.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == ["00", "01", "02", "03", "01", "02"]
    assert all(x["seed"] == image_seed(0, "t", int(x["key"]), 0) for x in lines)


def test_grounding_records_match_an_independent_computation(pipe):
    from tcscale.attention.plan import GroundingPlan
    from tcscale.attention.recorders import ProbsRecorder
    from tcscale.eval.grounding_maps import grounding_batches, grounding_records, noise_seed, summarize_grounding

    plan = GroundingPlan.build(pipe.unet, blocks=["mid", "up"], resolutions=None, image_resolution=64, scale_factor=8)
    batches = list(grounding_batches("synthetic", pipe.tokenizer, resolution=64, num_samples=3, batch_size=2))
    assert sum(len(b["keys"]) for b in batches) == 3 and "phrase_masks" in batches[0]
    records = grounding_records(
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        pipe.scheduler,
        plan,
        batches,
        timesteps=[200],
        threshold=0.4,
        family="sd",
    )
    summary = summarize_grounding(records)
    assert summary["grounding/phrases"] == len(records) > 0
    assert summary["grounding/miou"] == pytest.approx(np.mean([r["iou"] for r in records]))

    # one sample, recomputed from the probabilities (heads averaged, tokens summed, layers averaged at 64 px)
    batch = batches[0]
    key, tp, masks = batch["keys"][0], batch["token_phrase"][0], batch["phrase_masks"][0]
    with torch.no_grad():
        lat = pipe.vae.encode(batch["pixel_values"][:1]).latent_dist.mode() * pipe.vae.config.scaling_factor
        noise = torch.randn(lat.shape[1:], generator=torch.Generator().manual_seed(noise_seed(0, key, 200)))[None]
        t = torch.tensor([200])
        text = pipe.text_encoder(batch["input_ids"][:1])[0]
        with ProbsRecorder((8, 8)) as rec:
            pipe.unet(pipe.scheduler.add_noise(lat, noise, t), t, text, cross_attention_kwargs=rec.kwargs)
    for p in sorted({int(v) for v in tp if v >= 0}):
        ups = []
        for r in rec.records:
            side = r.size[0]
            m = r.probs[0].mean(0)[:, tp == p].sum(-1).reshape(1, 1, side, side)
            ups.append(F.interpolate(m.double(), size=(64, 64), mode="bilinear", align_corners=False)[0, 0])
        heat = torch.stack(ups).mean(0)
        pred = ((heat - heat.min()) / (heat.max() - heat.min() + 1e-8)) > 0.4
        gt = masks[p] > 0.5
        iou = float((pred & gt).sum() / (pred | gt).sum())
        (got,) = [r["iou"] for r in records if r["key"] == key and r["phrase"] == p]
        assert got == pytest.approx(iou, abs=1e-6)


def test_attention_viewer_writes_labelled_tiles(tiny_pipeline_dir, tmp_path):
    from tcscale.eval.attention_maps import main

    out = tmp_path / "maps"
    prompt = "a photo of a red circle and a blue star"
    assert main(["--model", str(tiny_pipeline_dir), "--prompt", prompt, "--out", str(out), "--steps", "2",
                 "--scheduler", "ddim"]) == 0  # fmt: skip
    assert Image.open(out / "image.png").size == (64, 64)
    grid = Image.open(out / "attention.png")
    assert grid.width == 3 * 256 and grid.height > 256  # image + 2 phrases, upscaled to readable tiles
    band = np.asarray(grid.convert("L"))[: grid.height - 256]
    for i in range(3):
        assert (band[:, i * 256 : (i + 1) * 256] < 128).any(), f"tile {i} has no label text"
    assert sorted(p.name for p in out.glob("phrase*.png")) == ["phrase0_red_circle.png", "phrase1_blue_star.png"]
    assert main(["--model", str(tmp_path / "nowhere"), "--prompt", prompt]) == 2


def test_eval_config_errors_name_the_key(tmp_path):
    from tcscale.config import ConfigError

    with pytest.raises(ConfigError, match=r"multigen\.roundz"):
        load_eval_config("configs/eval/tiny_cpu.yaml", ["multigen.roundz=3"])
    with pytest.raises(ConfigError, match="exactly one of model.pretrained"):
        load_eval_config("configs/eval/tiny_cpu.yaml", ["model.pretrained=x"])
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        load_eval_config("configs/eval/tiny_cpu.yaml", ["synthetic.enabled=false", "grounding.enabled=false"])
    with pytest.raises(ConfigError, match=r"grounding\.shards"):
        load_eval_config("configs/eval/tiny_cpu.yaml", ["grounding.source=webdataset"])


def test_eval_launcher_reports_a_missing_model_and_prompt_file(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_launcher", "launchers/eval.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    args = ["--config", "configs/eval/tiny_cpu.yaml", f"output_dir={tmp_path / 'e'}"]
    assert launcher.main([*args, f"model.run_dir={tmp_path / 'no_run'}"]) == 2
    assert "no_run: not a tcscale run directory" in capsys.readouterr().err


def test_sepen_suite_scores_pairs_with_seeds_0_to_n(tiny_pipeline_dir, tmp_path):
    from tcscale.eval.runner import EvalContext, Evaluation
    from tests.helpers.eval_models import build_tiny_blip, build_tiny_clip, build_tiny_owlv2

    cfg = load_eval_config(
        "configs/eval/tiny_cpu.yaml",
        [
            "model.run_dir=null",
            f"model.pretrained={tiny_pipeline_dir}",
            f"output_dir={tmp_path / 'e'}",
            "synthetic.enabled=false",
            "grounding.enabled=false",
            "sampler.num_inference_steps=2",
            "sepen.enabled=true",
            "sepen.num_pairs=2",
            "sepen.images_per_prompt=2",
            f"sepen.detector={build_tiny_owlv2(tmp_path / 'owl')}",
            f"sepen.captioner={build_tiny_blip(tmp_path / 'blip')}",
            f"sepen.text_model={build_tiny_clip(tmp_path / 'clip')}",
        ],
    )
    results = Evaluation(cfg, EvalContext(progress=False)).run()
    m = results["metrics"]
    assert 0.0 <= m["sepen/success_rate"] <= 100.0 and -1.0 <= m["sepen/text_similarity"] <= 1.0
    items = [json.loads(x) for x in (tmp_path / "e" / "sepen" / "items.jsonl").read_text().splitlines()]
    assert [it["seed"] for it in items] == [0, 1, 0, 1]  # the protocol's seeds 0..N-1 per prompt
    assert items[0]["prompt"] == "a photo of a cat and a dog"  # the first pair of concepts/pairs.txt
    assert results["details"]["sepen"]["threshold"] == 0.7 and "Detic" in results["details"]["sepen"]["note"]


@pytest.mark.parametrize("path", sorted(Path("configs/eval").glob("*.yaml")), ids=str)
def test_every_shipped_eval_config_validates(path):
    cfg = load_eval_config(path)
    assert cfg.name and cfg.output_dir


def test_fid_suites_sample_pairs_generate_and_score_with_an_injected_extractor(tiny_pipeline_dir, tmp_path):
    """Both FID stages end to end, FID (C) on a fake COCO and FID (F) on a fake Flickr30K Entities: the image-caption
    pairs are sampled with the seed and written for reuse, one image is generated per pair, FID is computed against
    the distinct real images (cached statistics), and results.json records each suite's protocol and precision."""
    from tcscale.eval.fid import InceptionFeatureExtractor, load_caption_sample
    from tcscale.eval.runner import EvalContext, Evaluation
    from tests.helpers.eval_models import TinyConvFeatures
    from tests.helpers.fid_data import fake_coco, fake_flickr30k

    captions, images = fake_coco(tmp_path, n_images=8, captions_per_image=2)
    flickr, flickr_images = fake_flickr30k(tmp_path)
    args = [
        "model.run_dir=null", f"model.pretrained={tiny_pipeline_dir}", f"output_dir={tmp_path / 'e'}",
        "synthetic.enabled=false", "grounding.enabled=false", "sampler.num_inference_steps=2", "fid.enabled=true",
        f"fid.captions_json={captions}", f"fid.images_dir={images}", "fid.num_images=12",
        "fid.dtype=fp16", "fid_flickr30k.enabled=true", f"fid_flickr30k.entities_dir={flickr}",
        f"fid_flickr30k.images_dir={flickr_images}", "fid_flickr30k.num_images=4",
    ]  # fmt: skip
    cfg = load_eval_config("configs/eval/tiny_cpu.yaml", args)
    extractor = InceptionFeatureExtractor(model=TinyConvFeatures(), batch_size=4)
    results = Evaluation(cfg, EvalContext(progress=False), fid_extractor=extractor).run()
    fid, fid_f = results["metrics"]["fid/coco10k"], results["metrics"]["fid/flickr30k1k"]
    assert np.isfinite(fid) and fid > 0 and np.isfinite(fid_f) and fid_f > 0
    pairs = load_caption_sample(tmp_path / "e" / "fid" / "captions.json")
    assert len(pairs) == 12 and len({(s["image_id"], s["caption"]) for s in pairs}) == 12  # 12 pairs of 8 images
    items = [json.loads(x) for x in (tmp_path / "e" / "fid" / "items.jsonl").read_text().splitlines()]
    assert [it["prompt"] for it in items] == [p["caption"] for p in pairs]
    assert sorted(p.stem for p in (tmp_path / "e" / "fid" / "images").glob("*.png")) == [f"{i:05d}" for i in range(12)]
    flickr_pairs = load_caption_sample(tmp_path / "e" / "fid_flickr30k" / "captions.json")
    assert len(flickr_pairs) == 4 and {p["file_name"] for p in flickr_pairs} == {"101.jpg", "102.jpg", "103.jpg"}
    assert all(not any(ch in p["caption"] for ch in "[]#") for p in flickr_pairs)  # entity markup removed
    protocol = results["protocol"]
    assert protocol["fid/coco10k"] == {
        "suite": "fid",
        "precision": "fp32",
        "requested_precision": "fp16",
        "samples": 12,
        "sampler": "ddim, 2 steps, CFG 7.5, 64 px",
        "reference": "images",
        "real_images": 8,
    }  # fmt: skip  (a CPU samples in fp32 whatever is asked, and says so)
    assert protocol["fid/flickr30k1k"]["suite"] == "fid_flickr30k" and protocol["fid/flickr30k1k"]["samples"] == 4
    assert sorted(p.name for p in (tmp_path / "e" / "fid_stats").glob("*.npz")) == [
        "coco10k_seed0_n12_images.npz",
        "flickr30k1k_seed0_n4_images.npz",
    ]  # fmt: skip  (real statistics cached for the next evaluation)
    again = Evaluation(cfg, EvalContext(progress=False), fid_extractor=extractor).run()  # resumes: same images
    assert again["metrics"]["fid/coco10k"] == pytest.approx(fid)
    assert again["details"]["counts"]["fid"]["generated"] == 0
    from tcscale.config import ConfigError

    with pytest.raises(ConfigError, match="fid_flickr30k.entities_dir"):
        load_eval_config("configs/eval/tiny_cpu.yaml", [*args[:-3], "fid_flickr30k.images_dir=x"])
    stale = load_eval_config("configs/eval/tiny_cpu.yaml", [*args, "fid.num_images=10"])
    with pytest.raises(EvalInputError, match="holds 12 pairs but fid.num_images=10"):
        Evaluation(stale, EvalContext(progress=False), fid_extractor=extractor).run()


def test_an_exported_pipelines_pndm_equals_the_base_pipelines(tmp_path):
    """An export stores the training scheduler (DDPM, built from the base's PNDM config); the evaluation rebuilds PNDM
    from it. Every PNDM setting (skip_prk_steps, steps_offset, set_alpha_to_one, betas ...) must be the base's, so
    the sampled timesteps and a sampler step are identical."""
    import inspect

    from diffusers import PNDMScheduler

    from tcscale.config import ModelConfig, TinyModelConfig
    from tcscale.models.architectures import build_tiny_components
    from tcscale.models.sd import load_components, save_pipeline_dir

    sd14 = {  # CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
        "trained_betas": None,
    }  # fmt: skip
    comps = build_tiny_components(TinyModelConfig(), 64)
    comps.noise_scheduler = PNDMScheduler.from_config(sd14)
    base = save_pipeline_dir(comps, tmp_path / "base")
    trained = load_components(ModelConfig(pretrained=str(base)), 64)  # what the trainer and the export load
    assert type(trained.noise_scheduler).__name__ == "DDPMScheduler"
    export = save_pipeline_dir(trained, tmp_path / "export")  # what tcscale.train.export writes
    model = EvalModelConfig(pretrained="x")
    a = load_pipeline(str(base), model, SamplerConfig(), "cpu").scheduler
    b = load_pipeline(str(export), model, SamplerConfig(), "cpu").scheduler
    assert type(a) is type(b) is PNDMScheduler
    keys = [k for k in inspect.signature(PNDMScheduler.__init__).parameters if k != "self"]
    assert {k: b.config[k] for k in keys} == {k: a.config[k] for k in keys}
    assert (b.config.skip_prk_steps, b.config.steps_offset, b.config.set_alpha_to_one) == (True, 1, False)
    a.set_timesteps(50)
    b.set_timesteps(50)
    assert torch.equal(a.timesteps, b.timesteps) and int(a.timesteps[0]) == 981
    x, eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 4, 8, 8)
    assert torch.equal(a.step(eps, a.timesteps[0], x).prev_sample, b.step(eps, b.timesteps[0], x).prev_sample)
