"""The CPU demo's parts: the shipped base model, its pretraining world, SepEn's concepts, the job runner."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _tiny_components():
    from omegaconf import OmegaConf

    from tcscale.config import TinyModelConfig
    from tcscale.models.architectures import build_tiny_components

    tiny = TinyModelConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "configs/demo_base.yaml").model.tiny))
    return build_tiny_components(tiny, 32, "sd")


def test_shipped_base_materialises_as_the_fp16_rounded_fp32_pipeline(tmp_path):
    from tcscale.config import ModelConfig
    from tcscale.models.demo_base import materialise_demo_base, write_shipped
    from tcscale.models.sd import load_components

    comps = _tiny_components()
    src = write_shipped(comps, {"how": "test"}, tmp_path / "shipped")
    assert not (src / "tokenizer").exists() and json.loads((src / "provenance.json").read_text()) == {"how": "test"}
    out = materialise_demo_base(tmp_path / "pipe", src=src)
    loaded = load_components(ModelConfig(pretrained=str(out)), 32)
    assert type(loaded.vae).__name__ == "SpaceToDepthAutoencoder"
    for name in ("unet", "text_encoder"):
        mine, theirs = dict(getattr(comps, name).named_parameters()), dict(getattr(loaded, name).named_parameters())
        assert mine.keys() == theirs.keys()
        for key, p in theirs.items():
            assert p.dtype == torch.float32, (name, key)
            torch.testing.assert_close(p, mine[key].detach().half().float(), rtol=0, atol=0)
    ids = loaded.tokenizer("a photo of a red circle").input_ids
    assert ids == comps.tokenizer("a photo of a red circle").input_ids
    # the configured VAE factor of the local pipeline is its own (2: space-to-depth), not the released VAEs' 8
    from tcscale.config import expected_vae_factor

    assert expected_vae_factor(ModelConfig(pretrained=str(out))) == 2
    assert expected_vae_factor(ModelConfig(pretrained=str(tmp_path / "no_such_pipeline"))) == 8


def test_incomplete_shipped_base_names_the_missing_file(tmp_path):
    from tcscale.models.demo_base import DemoBaseError, materialise_demo_base, write_shipped

    src = write_shipped(_tiny_components(), {}, tmp_path / "shipped")
    (src / "unet" / "config.json").unlink()
    with pytest.raises(DemoBaseError, match=r"unet/config.json not found \(make demo-base writes it\)"):
        materialise_demo_base(tmp_path / "pipe", src=src)
    assert not (tmp_path / "pipe").exists()


def test_the_package_ships_a_small_complete_base_with_its_card():
    from tcscale.models.demo_base import SHIPPED, shipped_demo_base

    shipped_demo_base()
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    # fp16: the wide U-Net (3.2 M parameters, 6.5 MB) and the text encoder (6.5 MB, its 49,408-token table)
    assert size < 16 * 2**20, size
    card = (SHIPPED / "README.md").read_text()
    assert "make demo-base" in card
    provenance = json.loads((SHIPPED / "provenance.json").read_text())
    assert provenance["chosen"] in provenance["validation"]


def test_pretraining_world_min_objects(tmp_path):
    import webdataset as wds

    from dataprep.synthetic_shards import write_synthetic_shards

    info = write_synthetic_shards(str(tmp_path), 12, 32, 32, seed=5, min_objects=2, max_objects=3,
                                  samples_per_shard=6, prefix="multi", progress=False)  # fmt: skip
    metas = [json.loads(s["json"]) for s in wds.WebDataset(str(tmp_path / info["shards"]), shardshuffle=False)]
    assert len(metas) == 12
    assert all(len(m["phrases"]) in (2, 3) for m in metas), [m["caption"] for m in metas]
    assert {len(m["phrases"]) for m in metas} == {2, 3}


def test_sepen_concepts_are_the_worlds_training_combinations_and_prompts_read_like_its_captions():
    from tcscale.data.synthetic import compose_caption, synthetic_combos
    from tcscale.models.tokenizer import sd_clip_tokenizer
    from tcscale.objectives.sepen_prompts import SepEnPromptSampler, load_concept_file

    path = REPO / "configs/demo_sepen_concepts.txt"
    assert sorted(load_concept_file(path)) == sorted(f"{c} {s}" for c, s in synthetic_combos()[0])
    sampler = SepEnPromptSampler.from_concepts(str(path), split="all", num_objects=(2, 2), seed=0)
    tok = sd_clip_tokenizer()
    for p in sampler.multi(0, 0, 16):
        objects = [tuple(o.split()) for o in p.objects]
        assert p.text in (compose_caption(objects), compose_caption(objects).removeprefix("a photo of "))
        ids = tok(p.text, padding="max_length", max_length=77).input_ids
        for noun, pos in zip(p.objects, p.token_positions):  # colour and shape tokens, as TokenCompose's phrases
            assert tok.decode([ids[i] for i in pos]) == noun


def test_run_jobs_stops_at_a_failed_job_with_its_log(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    from launchers import demo

    ok = [sys.executable, "-c", "print('step 1/1')"]
    bad = [sys.executable, "-c", "print('step 1/2'); print('the reason'); raise SystemExit(3)"]
    demo.run_jobs({"fine": (ok, tmp_path / "a.log")}, total=1)
    assert "step 1/1" in (tmp_path / "a.log").read_text()
    with pytest.raises(SystemExit, match=r"demo: broken failed \(exit 3\); .*b.log:\nstep 1/2\nthe reason"):
        demo.run_jobs({"broken": (bad, tmp_path / "b.log"), "fine": (ok, tmp_path / "c.log")}, total=2, slots=1)


def test_run_jobs_starts_a_job_only_after_the_one_it_needs_and_fills_the_other_slot(tmp_path):
    """The demo's pool: an evaluation waits for its finetune while an independent job takes the free core."""
    sys.path.insert(0, str(REPO))
    from launchers import demo

    flag, order = tmp_path / "trained", tmp_path / "order"

    def job(code: str) -> list[str]:
        return [sys.executable, "-c", f"import os, time; flag, order = {str(flag)!r}, {str(order)!r}; {code}"]

    jobs = {
        "train": (job("time.sleep(2); open(flag, 'w').close(); open(order, 'a').write('train ')"), tmp_path / "t.log"),
        "eval": (job("assert os.path.exists(flag); open(order, 'a').write('eval ')"), tmp_path / "e.log"),
        "base": (job("open(order, 'a').write('base ')"), tmp_path / "b.log"),
    }
    demo.run_jobs(jobs, None, slots=2, after={"eval": "train"})
    assert order.read_text().split() == ["base", "train", "eval"]  # base ran beside train, not after eval
    with pytest.raises(ValueError, match=r"after names jobs that are not given: \['trian'\]"):
        demo.run_jobs(jobs, None, after={"eval": "trian"})


def test_tuning_overrides_reach_only_their_method_and_bad_ones_are_refused(capsys, tmp_path):
    sys.path.insert(0, str(REPO))
    from launchers import demo

    lr, tc = "deepspeed.optimizer.params.lr=5e-4", "objective.tokencompose.token_loss_weight=1"
    shards = "data.shards=a::b"
    out = ["--out", str(tmp_path / "demo")]  # not the checkout's runs/demo, whatever an earlier demo left there
    args = demo.parse_args([*out, "--methods", "ldm,tokencompose", "--set", lr, "--set", f"tokencompose:{tc}",
                            "--set", shards])  # fmt: skip
    assert args.methods == ("ldm", "tokencompose")
    assert demo.overrides_for("ldm", args.overrides) == [lr, shards]
    assert demo.overrides_for("tokencompose", args.overrides) == [lr, tc, shards]
    bad_methods = "--methods 'ldm,dalle': each must be one of ldm, tokencompose, sepen"
    bad_set = "--set 'sdxl:max_steps=3': expected [METHOD:]KEY=VALUE"
    not_demo = f"--out {REPO / 'configs'}: exists and is not an earlier demo's output (no base_model/ or results.json)"
    assert demo.parse_args([*out, "--prompts", "48"]).prompts == 48
    for argv, line in (([*out, "--methods", "ldm,dalle"], bad_methods), ([*out, "--set", "sdxl:max_steps=3"], bad_set),
                       (["--out", str(REPO / "configs")], not_demo), ([*out, "--prompts", "0"], "--prompts 0: must be"),
                       ([*out, "--steps", "-1"], "--steps -1: must be at least 1")):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            demo.parse_args(argv)
        assert exc.value.code == 2 and line in capsys.readouterr().err


def test_base_pretraining_decays_the_lr_to_near_zero_at_its_last_step_and_keeps_an_ema():
    """configs/demo_base_cosine_ema.yaml's DeepSpeed schedule, run on a real optimizer: warm-up to the peak, then a
    decay that ends at max_steps (not before, not after), and the EMA whose weights that recipe validates."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from tcscale.config import load_config

    cfg = load_config(REPO / "configs/demo_base_cosine_ema.yaml")
    assert cfg.ema.enabled
    sched_cfg = cfg.deepspeed["scheduler"]
    peak = cfg.deepspeed["optimizer"]["params"]["lr"]
    assert sched_cfg["type"] == "WarmupCosineLR"
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = WarmupCosineLR(opt, **sched_cfg["params"])
    lrs = []
    for _ in range(cfg.max_steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    warm = sched_cfg["params"]["warmup_num_steps"]
    assert max(lrs) == pytest.approx(peak, rel=0.02)
    assert lrs[warm + 10] > 0.9 * peak
    assert lrs[cfg.max_steps // 2] == pytest.approx(0.5 * peak, rel=0.1)  # a cosine: half the peak at mid-run
    assert lrs[-1] < 0.02 * peak  # decayed by the last step: max_steps and total_num_steps agree


def test_demo_base_chooses_the_guidance_scale_on_validation_scores():
    from launchers.demo_base import choose_guidance, guidance_suffix

    scales = (1.0, 3.0, 5.0)
    assert [guidance_suffix(g, scales) for g in scales] == ["", "_g3", "_g5"]

    def metrics(k1: float, k2: float) -> dict[str, float]:
        return {"synthetic/k1/all_objects": k1, "synthetic/k2/all_objects": k2}

    scores = {"step9": metrics(0.1, 0.0), "step9_g3": metrics(0.4, 0.1), "step9_g5": metrics(0.4, 0.2),
              "step1_g3": metrics(0.9, 0.9)}  # fmt: skip
    assert choose_guidance(scores, "step9", scales) == 5.0  # one object tied: two objects decide
    scores["step9_g5"] = metrics(0.4, 0.1)
    assert choose_guidance(scores, "step9", scales) == 3.0  # a full tie: the smaller scale
    scores["step9"] = metrics(0.5, 0.0)
    assert choose_guidance(scores, "step9", scales) == 1.0  # one object first


def test_demo_evaluates_at_the_guidance_chosen_for_the_shipped_base():
    """`make demo` samples every model (and its figures) at the scale the shipped base's validation chose: shipping
    a new base without updating configs/eval/demo_cpu.yaml would evaluate it at another scale."""
    from launchers.demo import eval_guidance
    from tcscale.models.demo_base import SHIPPED

    provenance = json.loads((SHIPPED / "provenance.json").read_text())
    assert provenance["guidance_scale"] in provenance["guidance_scales_validated"]
    assert eval_guidance() == provenance["guidance_scale"]


def test_every_method_loads_the_demo_config_and_the_two_that_read_captions_drop_the_same_fraction():
    """The demo's finetunes: LDM-only and TokenCompose train the unconditional branch alike (the config's
    data.caption_dropout, what guidance samples against); SepEn, data-free, gets the key set to 0, which it needs."""
    sys.path.insert(0, str(REPO))
    from launchers import demo
    from tcscale.config import ConfigError, load_config

    config = REPO / "configs" / "demo_cpu.yaml"
    dropout = {}
    for m in demo.MODELS:
        cfg = load_config(config, [f"objective.name={m}", *demo.METHOD_SETTINGS.get(m, [])])
        dropout[m] = cfg.data.caption_dropout
    assert dropout["ldm"] == dropout["tokencompose"] > 0 and dropout["sepen"] == 0
    with pytest.raises(ConfigError, match=r"data\.caption_dropout=.*objective 'sepen'"):
        load_config(config, ["objective.name=sepen"])


def test_shapes_figure_draws_every_shape_in_training_colours_only(tmp_path, monkeypatch):
    """The model card's shapes figure: one row per (training colour, shape), every shape, no held-out combination,
    each image scored; the count it returns is the scorer's."""
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from launchers import demo, demo_base
    from tcscale.data.synthetic import HELD_OUT, SHAPES
    from tcscale.models.demo_base import materialise_demo_base

    prompts, real = [], demo.figure_pipeline

    def recording(export):
        pipe = real(export)

        def call(prompt, **kw):
            prompts.append(prompt)
            return pipe(prompt, **kw)

        return call

    monkeypatch.setattr(demo, "figure_pipeline", recording)
    scored = []
    monkeypatch.setattr("tcscale.eval.synthetic_scorer.all_objects_present", lambda im, objs: scored.append(objs) or 1)
    base = materialise_demo_base(tmp_path / "base")
    found, drawn = demo_base.shapes_figure(base, tmp_path / "shapes.png", colours_per_shape=1, columns=2, steps=2)
    assert (found, drawn) == (12, 12) and len(prompts) == 12 and len(scored) == 12
    objs = [o[0] for o in scored[::2]]
    assert [s for _, s in objs] == list(SHAPES) and not set(objs) & HELD_OUT
    assert prompts[0] == f"a photo of a {objs[0][0]} {objs[0][1]}"
    with Image.open(tmp_path / "shapes.png") as im:
        assert im.size == (110 + 2 * 102, 6 * 102 + 6)
