"""The shipped paper configs run end to end on tiny models on a CPU (a handful of prompts and images), keep the
paper's protocol in everything but size, and compare marks every cell whose protocol is not the paper's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tcscale.eval.compare import compare_table
from tcscale.eval.config import load_eval_config
from tcscale.eval.suites import SUITE_NAMES, SUITES


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from tcscale.config import TinyModelConfig
    from tcscale.models.architectures import build_tiny_components
    from tcscale.models.sd import save_pipeline_dir

    return save_pipeline_dir(build_tiny_components(TinyModelConfig(), 64), tmp_path_factory.mktemp("pipe") / "p")


def test_one_list_of_suites_names_every_section_and_runner_method():
    from dataclasses import fields

    from tcscale.eval.config import EvalConfig
    from tcscale.eval.runner import Evaluation

    cfg = EvalConfig()
    sections = {f.name for f in fields(EvalConfig) if hasattr(getattr(cfg, f.name), "enabled")}
    assert sections - {"tracking"} == set(SUITE_NAMES)  # tracking.enabled is not a suite
    assert all(callable(getattr(Evaluation, f"run_{name}")) for name in SUITE_NAMES)
    for s in SUITES:  # a generating suite has its own sampling precision
        assert hasattr(getattr(cfg, s.name), "dtype") == s.generates, s.name


def test_sd14_paper_is_the_papers_protocol():
    cfg = load_eval_config("configs/eval/sd14_paper.yaml")
    assert cfg.model.dtype == "fp32" and all(
        getattr(cfg, s).dtype is None for s in ("multigen", "visor", "fid", "fid_flickr30k", "latency")
    )
    assert (cfg.sampler.scheduler, cfg.sampler.num_inference_steps, cfg.sampler.guidance_scale) == ("pndm", 50, 7.5)
    assert cfg.sampler.resolution == 512
    assert (cfg.multigen.rounds, cfg.multigen.limit, cfg.multigen.sets) == (10, None, ["coco", "ade20k"])
    assert (cfg.visor.rounds, cfg.visor.limit, cfg.visor.clip_boxes) == (4, None, False)
    assert (cfg.fid.num_images, cfg.fid_flickr30k.num_images, cfg.fid_flickr30k.split) == (10000, 1000, "val")
    enabled = {s for s in SUITE_NAMES if getattr(cfg, s).enabled}
    assert enabled == {"multigen", "visor", "fid", "fid_flickr30k", "latency"}  # every suite of Table 1


def test_sd14_paper_runs_every_table1_suite_on_tiny_models(tiny_pipeline_dir, tmp_path):
    from tcscale.eval.fid import InceptionFeatureExtractor
    from tcscale.eval.runner import EvalContext, Evaluation
    from tests.helpers.eval_models import TinyConvFeatures, build_tiny_owlv2, build_tiny_owlvit
    from tests.helpers.fid_data import fake_coco, fake_flickr30k

    captions, images = fake_coco(tmp_path, n_images=3, captions_per_image=2)
    entities, flickr_images = fake_flickr30k(tmp_path)
    overrides = [
        "model.run_dir=null", f"model.pretrained={tiny_pipeline_dir}", f"output_dir={tmp_path / 'e'}",
        "sampler.resolution=64", "sampler.num_inference_steps=4", "sampler.batch_size=4",
        "multigen.limit=1", "multigen.rounds=2", f"multigen.detector={build_tiny_owlv2(tmp_path / 'owlv2')}",
        "visor.limit=2", "visor.rounds=1", f"visor.detector={build_tiny_owlvit(tmp_path / 'owlvit')}",
        f"fid.captions_json={captions}", f"fid.images_dir={images}", "fid.num_images=4",
        f"fid_flickr30k.entities_dir={entities}", f"fid_flickr30k.images_dir={flickr_images}",
        "fid_flickr30k.num_images=3", "latency.prompts=1", f"latency.base={tiny_pipeline_dir}",
    ]  # fmt: skip
    cfg = load_eval_config("configs/eval/sd14_paper.yaml", overrides)
    extractor = InceptionFeatureExtractor(model=TinyConvFeatures(), batch_size=4)
    results = Evaluation(cfg, EvalContext(progress=False), fid_extractor=extractor).run()
    m = results["metrics"]
    table1 = ["visor/OA", "fid/coco10k", "fid/flickr30k1k", "latency/s_per_image"]
    table1 += [f"multigen/{s}/MG{k}" for s in ("coco", "ade20k") for k in range(2, 6)]
    assert all(np.isfinite(m[name]) for name in table1)
    protocol = results["protocol"]
    assert set(protocol) == {"multigen/coco", "multigen/ade20k", "visor", "fid/coco10k", "fid/flickr30k1k", "latency"}
    assert protocol["multigen/coco"] == {
        "suite": "multigen", "precision": "fp32", "samples": 2, "sampler": "pndm, 4 steps, CFG 7.5, 64 px",
        "prompts": 1,
    }  # fmt: skip
    assert json.loads((tmp_path / "e" / "results.json").read_text())["protocol"] == protocol
    # every Table 1 cell of this run is off the paper's protocol (fewer samples, 4 steps, 64 px): every one marked
    table = compare_table([results])
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    row = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    cells = dict(zip(header, row))
    for name in table1:
        assert "†" in cells[name], name
    notes = [line for line in table.splitlines() if line.startswith("†") and "(paper:" in line]
    assert any("multigen/coco: samples 2 (paper: 10000); sampler pndm, 4 steps" in n for n in notes)
    assert any("fid/coco10k: samples 4 (paper: 10000)" in n for n in notes)
