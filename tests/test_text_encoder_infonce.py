"""The contrastive text-encoder stage (issue 16): `info_nce` against an independent computation, the crop policy
and crop stream, a short run on synthetic-world crops that raises held-out text→crop recall, exact resume, the
export of the text encoder, a TokenCompose run that starts from it, and the eval launcher swapping it in.

Towers: the tiny SD text encoder (`model.tiny`, 32 wide) and a tiny random CLIPModel saved to a tmp dir
(tests/helpers/eval_models.build_tiny_clip: 32-wide text tower, so its text projection fits, 32-px image tower).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tcscale.data.crops import (
    Box,
    CropConfig,
    CropProcessor,
    build_crop_loader,
    collate_crops,
    context_box,
    cut_crop,
    select_objects,
)
from tcscale.data.samples import Counters, RawSample
from tcscale.eval.retrieval import retrieval_recall
from tcscale.losses import info_nce
from tests.helpers import launch
from tests.helpers.eval_models import build_tiny_clip

REPO = Path(__file__).resolve().parents[1]
SECTION = "objective.text_encoder_infonce"


# -- the loss --------------------------------------------------------------------------------------
def reference_info_nce(t, v, tau, labels=None, symmetric=True) -> float:
    """InfoNCE written out with Python floats: per query, −log(e^{s_ii/τ} / Σ_{j kept} e^{s_ij/τ}); j kept unless
    it is another pair with the query's label."""

    def unit(rows):
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in rows.tolist()]

    t, v = unit(t.detach()), unit(v.detach())
    n = len(t)

    def direction(queries, keys) -> float:
        total = 0.0
        for i in range(n):
            sims = [sum(a * b for a, b in zip(queries[i], keys[j])) / tau for j in range(n)]
            kept = [j for j in range(n) if j == i or labels is None or labels[j] != labels[i]]
            total -= sims[i] - math.log(sum(math.exp(sims[j]) for j in kept))
        return total / n

    text_to_image = direction(t, v)
    return (text_to_image + direction(v, t)) / 2 if symmetric else text_to_image


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_info_nce_matches_an_independent_computation(dtype):
    g = torch.Generator().manual_seed(0)
    t, v = torch.randn(9, 6, generator=g, dtype=dtype), torch.randn(9, 6, generator=g, dtype=dtype) * 3
    labels = [0, 1, 0, 2, 3, 1, 4, 0, 5]  # phrase 0 three times, phrase 1 twice
    tol = dict(rel=1e-5) if dtype == torch.float32 else dict(rel=1e-12)
    for symmetric in (True, False):
        for tau in (0.07, 1.0):
            got = info_nce(t, v, tau, symmetric=symmetric)
            assert float(got) == pytest.approx(reference_info_nce(t, v, tau, None, symmetric), **tol)
            got = info_nce(t, v, tau, symmetric=symmetric, labels=torch.tensor(labels))
            assert float(got) == pytest.approx(reference_info_nce(t, v, tau, labels, symmetric), **tol)
    # the two directions differ (so the symmetric mean is not one of them by accident)
    one_way, other_way = reference_info_nce(t, v, 0.1, labels, False), reference_info_nce(v, t, 0.1, labels, False)
    assert abs(one_way - other_way) > 1e-3
    # the mask form equals the labels form; masking nothing is the plain loss
    lab = torch.tensor(labels)
    mask = lab[:, None] == lab[None, :]
    assert torch.equal(info_nce(t, v, 0.1, positive_mask=mask), info_nce(t, v, 0.1, labels=lab))
    no_dup = torch.arange(9)
    assert torch.allclose(info_nce(t, v, 0.1, labels=no_dup), info_nce(t, v, 0.1))


def test_info_nce_seed_form_gradients_and_edge_cases():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 4, generator=g, dtype=torch.float64)
    # the seed study's loss: −(1/N) Σ_i log[exp(sim(z_i, z_i⁺)/τ) / Σ_j exp(sim(z_i, z_j)/τ)], cosine sim, one way
    sim = torch.nn.functional.cosine_similarity(t[:, None], v[None], dim=-1) / 0.2
    seed = -(sim.diagonal() - sim.logsumexp(dim=1)).mean()
    assert torch.allclose(info_nce(t, v, 0.2, symmetric=False), seed)
    # a learnt temperature gets its gradient; compare with the reference's finite difference
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    lab = [0, 1, 0, 2, 1]
    loss = info_nce(t, v, tau, labels=torch.tensor(lab))
    loss.backward()
    eps = 1e-6
    fd = (reference_info_nce(t, v, 0.3 + eps, lab) - reference_info_nce(t, v, 0.3 - eps, lab)) / (2 * eps)
    assert float(tau.grad) == pytest.approx(fd, rel=1e-6)
    assert t.grad is not None and torch.isfinite(t.grad).all()
    # all pairs of one phrase: nothing is a negative, the loss is 0; no pair: 0, and a backward still runs
    alike = info_nce(t, v, 0.1, labels=torch.zeros(5, dtype=torch.long))
    assert float(alike.detach()) == pytest.approx(0.0, abs=1e-12)
    empty = torch.zeros(0, 4, requires_grad=True)
    out = info_nce(empty, torch.zeros(0, 4), 0.1)
    out.backward()
    assert float(out.detach()) == 0.0
    with pytest.raises(ValueError, match="labels or positive_mask"):
        info_nce(t, v, 0.1, labels=torch.arange(5), positive_mask=torch.eye(5, dtype=torch.bool))


def test_retrieval_recall_by_hand():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    gallery_labels = torch.tensor([0, 1, 1, 2])
    queries = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.9]])  # nearest: 0, 1, 2
    got = retrieval_recall(queries, gallery, torch.tensor([0, 1, 2]), gallery_labels, ks=(1, 2, 4))
    # query 0 -> crop 0 (label 0) hit; query 1 -> crop 1 (label 1) hit; query 2 (label 2) -> crops 2, 0, 1, 3: at 4
    assert got == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3), 4: pytest.approx(1.0)}


# -- crops -----------------------------------------------------------------------------------------
def rect(h, w, top, left, bottom, right):
    m = np.zeros((h, w), dtype=np.uint8)
    m[top:bottom, left:right] = 1
    return m


def test_crop_policy_boxes_margins_and_filters():
    h, w = 100, 80
    diagonal = np.zeros((h, w), dtype=np.uint8)
    for i in range(40):
        diagonal[50 + i, 30 + i // 2 : 32 + i // 2] = 1  # a thin stroke: box 40 x 21, fill ~ 0.1
    two_blobs = rect(h, w, 70, 0, 90, 15) | rect(h, w, 5, 65, 25, 80)
    masks = np.stack([rect(h, w, 10, 20, 30, 60), rect(h, w, 0, 0, 3, 3), diagonal, np.zeros((h, w), np.uint8),
                      two_blobs])  # fmt: skip
    policy = CropConfig(margin=0.1, square=True, min_side=8, min_fill=0.3)
    decisions = select_objects(masks, policy)
    # the union of two distant blobs is one object with a box of 85 x 80 that they fill to 9%: low fill
    assert [d.reason for d in decisions] == [None, "small", "low_fill", "empty", "low_fill"]
    assert decisions[0].box == Box(10, 20, 30, 60) and decisions[4].box == Box(5, 0, 90, 80)
    assert [d.reason for d in select_objects(masks, CropConfig(min_side=8, min_fill=0.0))][2] is None
    # one crop per connected component (instances of a union mask)
    parts = [d for d in select_objects(masks, policy.__class__(min_fill=0.3, instances="components"))
             if d.phrase_index == 4]  # fmt: skip
    assert [(d.box, d.reason) for d in parts] == [(Box(5, 65, 25, 80), None), (Box(70, 0, 90, 15), None)]
    # context: 20 x 40 grows by 10% per side to 24 x 48, then to a 48 x 48 square about the centre (20, 40),
    # shifted down into the image
    assert context_box(Box(10, 20, 30, 60), (h, w), 0.1, True) == Box(0, 16, 48, 64)
    assert context_box(Box(10, 20, 30, 60), (h, w), 0.0, False) == Box(10, 20, 30, 60)
    # a square wider than the image is centred on it and padded
    assert context_box(Box(0, 0, 100, 80), (h, w), 0.0, True) == Box(0, -10, 100, 90)


def test_cut_crop_letterboxes_pads_and_paints_the_background():
    image = np.full((40, 40, 3), 255, dtype=np.uint8)
    mask = rect(40, 40, 10, 10, 30, 20)  # 20 tall, 10 wide
    fill = np.array([round(255 * m) for m in (0.5, 0.25, 0.75)], dtype=np.uint8)
    crop = cut_crop(image, mask, Box(10, 10, 30, 20), 16, mean=(0.5, 0.25, 0.75))
    assert crop.shape == (16, 16, 3)
    assert (crop[:, :4] == fill).all() and (crop[:, 12:] == fill).all() and (crop[:, 4:12] == 255).all()  # letterbox
    padded = cut_crop(image, mask, Box(-10, 10, 30, 50), 16, mean=(0.5, 0.25, 0.75))  # partly outside the image
    # 10 of 40 rows above and columns right of the image are padding: 4 of 16 output rows / columns (the bicubic
    # filter blends and rings over the two next to the image)
    assert (padded[:2] == fill).all() and (padded[:, 14:] == fill).all() and (padded[6:, :10] == 255).all()
    painted = cut_crop(image, mask, Box(0, 0, 40, 40), 16, mean=(0.5, 0.25, 0.75), background="mean")
    assert (painted[0, 0] == fill).all() and (painted[8, 6] == 255).all()


def test_crop_processor_pairs_labels_and_subsets(sd_tokenizer):
    h = w = 64
    masks = np.stack([rect(h, w, 0, 0, 20, 20), rect(h, w, 30, 30, 60, 60), rect(h, w, 0, 40, 20, 64)])
    raw = RawSample("k", np.zeros((h, w, 3), np.uint8), "a cat, a Dog and a cat", ["cat", "Dog", "cat"], masks, 0)
    proc = CropProcessor(sd_tokenizer, CropConfig(max_per_image=2), image_size=24, template="a photo of a {}")
    counters = Counters()
    one = proc(raw, np.random.default_rng(0), counters)
    assert one["pixel_values"].shape == (2, 3, 24, 24) and one["input_ids"].shape == (2, 77)
    assert counters["crops_kept"] == 2 and counters["crops_dropped/max_per_image"] == 1
    full = CropProcessor(sd_tokenizer, CropConfig(max_per_image=2), image_size=24, subsample=False)
    batch = collate_crops([full(raw, np.random.default_rng(0), Counters()), proc.empty()])
    assert batch["phrases"] == ["cat", "Dog", "cat"] and batch["labels"].tolist() == [0, 1, 0]
    assert sd_tokenizer.decode(one["input_ids"][0], skip_special_tokens=True).startswith("a photo of a ")


def test_crop_stream_is_a_pure_function_of_the_step_and_resumes(tiny_config, tmp_path, sd_tokenizer):
    cfg = tiny_config(tmp_path, "data.synthetic.num_samples=16")
    proc = CropProcessor(sd_tokenizer, CropConfig(max_per_image=2), image_size=32, random_flip=True)
    kw = dict(rank=1, world_size=2, micro_batch_size=3, seed=5)
    first = build_crop_loader(cfg.data, sd_tokenizer, proc, **kw)
    batches = [first.next_batch() for _ in range(4)]
    assert all(len(b["phrases"]) == len(b["labels"]) == b["pixel_values"].shape[0] > 0 for b in batches)
    for b in batches:  # equal labels exactly for equal phrases
        same = [[p == q for q in b["phrases"]] for p in b["phrases"]]
        assert (b["labels"][:, None] == b["labels"][None, :]).tolist() == same
    started = build_crop_loader(cfg.data, sd_tokenizer, proc, start_step=2, **kw).next_batch()
    resumed = build_crop_loader(cfg.data, sd_tokenizer, proc, **kw)
    state = build_crop_loader(cfg.data, sd_tokenizer, proc, **kw)
    state.next_batch(), state.next_batch()
    resumed.load_state_dict(state.state_dict())
    for b in (started, resumed.next_batch()):
        assert b["keys"] == batches[2]["keys"] and torch.equal(b["pixel_values"], batches[2]["pixel_values"])
    assert first.counters()["crops_kept"] == sum(len(b["phrases"]) for b in batches)


def test_crops_from_grounded_shards(tiny_config, tmp_path, sd_tokenizer):
    from dataprep.synthetic_shards import write_synthetic_shards

    write_synthetic_shards(str(tmp_path / "shards"), 8, 80, 96, samples_per_shard=4, progress=False)
    pattern = str(tmp_path / "shards" / "synthetic-{000000..000001}.tar")
    cfg = tiny_config(tmp_path, "data.source=webdataset", f"data.shards={pattern}", "data.shuffle_buffer=4")
    proc = CropProcessor(sd_tokenizer, CropConfig(), image_size=32)
    loader = build_crop_loader(cfg.data, sd_tokenizer, proc, rank=0, world_size=1, micro_batch_size=4, seed=0)
    batch = loader.next_batch()
    assert batch["num_images"] == 4 and batch["pixel_values"].shape[1:] == (3, 32, 32)
    assert all(" " in p for p in batch["phrases"])  # "red circle": colour + shape
    loader.close()


# -- training runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


def infonce_config(tiny_config, run_dir, clip, *overrides):
    return tiny_config(
        run_dir,
        "objective.name=text_encoder_infonce",
        f"{SECTION}.image_model={clip}",
        "deepspeed.train_micro_batch_size_per_gpu=8",
        "deepspeed.optimizer.params.lr=1e-3",
        *overrides,
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_clip):
    """40 steps on synthetic crops, held-out recall every 20 (module-scoped: several tests read this run)."""
    from tcscale.config import load_config
    from tcscale.train.trainer import train
    from tests.helpers.paths import TINY_CONFIG

    run = tmp_path_factory.mktemp("infonce") / "run"
    cfg = load_config(TINY_CONFIG, [f"output_dir={run}", "checkpoint.every_steps=0", "max_steps=40",
                                    "validation.every_steps=20", "objective.name=text_encoder_infonce",
                                    f"{SECTION}.image_model={tiny_clip}", "deepspeed.train_micro_batch_size_per_gpu=8",
                                    "deepspeed.optimizer.params.lr=1e-3"])  # fmt: skip
    result = train(cfg)
    return run, result


def test_short_run_raises_held_out_text_to_crop_recall(trained_run):
    run, result = trained_run
    assert result.step == 40
    client, runs = launch.mlflow_runs(run, "tcscale-tiny")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(rid, key)}

    assert sorted(history("loss/infonce")) == list(range(1, 41))
    r1, r5 = history("recall/text_to_crop/R1"), history("recall/text_to_crop/R5")
    start1, start5 = history("recall/start/text_to_crop/R1"), history("recall/start/text_to_crop/R5")
    assert sorted(r1) == [20, 40] and sorted(start1) == [20, 40]
    print(f"held-out text->crop R1 {start1[40]:.3f} -> {r1[20]:.3f} (step 20) -> {r1[40]:.3f} (step 40); "
          f"R5 {start5[40]:.3f} -> {r5[40]:.3f}; crop->text R1 {history('recall/start/crop_to_text/R1')[40]:.3f} -> "
          f"{history('recall/crop_to_text/R1')[40]:.3f}")  # fmt: skip
    assert r1[40] > start1[40] and r5[40] > start5[40]
    assert history("temperature")[40] == pytest.approx(0.07)
    saved = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    assert saved["objective"]["name"] == "text_encoder_infonce"


def test_export_writes_the_finetuned_text_encoder_and_keeps_the_base_unet(trained_run, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from tcscale.train.export import export_pipeline, export_text_encoder

    run, _ = trained_run
    trained = launch.final_weights(run)
    encoder = {k.removeprefix("text_encoder."): v for k, v in trained.items() if k.startswith("text_encoder.")}
    assert encoder and {k for k in trained if not k.startswith("text_encoder.")} == {"projection.weight"}
    # launchers/export.py --text-encoder: a CLIPTextModel directory
    spec = importlib.util.spec_from_file_location("export_launcher", REPO / "launchers" / "export.py")
    export_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_cli)
    out = tmp_path / "text_encoder"
    assert export_cli.main(["--run-dir", str(run), "--out", str(out), "--text-encoder"]) == 0
    model = CLIPTextModel.from_pretrained(out)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder.items())
    base = CLIPTextModel.from_pretrained(run / "base_model" / "text_encoder").state_dict()
    assert any(not torch.equal(base[k], v) for k, v in encoder.items()), "the encoder did not train"
    # the projection stayed frozen (it is the CLIP checkpoint's own)
    assert export_text_encoder(run, tmp_path / "again") == tmp_path / "again"
    # the pipeline export: finetuned text encoder, base U-Net
    pipe_dir = export_pipeline(run, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    assert all(torch.equal(pipe.text_encoder.state_dict()[k], v) for k, v in encoder.items())
    unet = load_file(pipe_dir / "unet" / "diffusion_pytorch_model.safetensors")
    base_unet = load_file(run / "base_model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet.keys() == base_unet.keys() and all(torch.equal(unet[k], base_unet[k]) for k in unet)


def test_tokencompose_trains_with_the_exported_encoder_and_eval_swaps_it_in(trained_run, tiny_config, tmp_path):
    from transformers import CLIPTextModel

    from tcscale.train.export import export_pipeline, export_text_encoder
    from tcscale.train.trainer import Trainer

    run, _ = trained_run
    encoder_dir = export_text_encoder(run, tmp_path / "encoder")
    finetuned = CLIPTextModel.from_pretrained(encoder_dir).state_dict()
    # TokenCompose trained *with* the finetuned encoder (the second remedy)
    tc = tmp_path / "tc"
    trainer = Trainer(tiny_config(tc, "max_steps=1", f"model.text_encoder_path={encoder_dir}"))
    used = trainer.comps.text_encoder.state_dict()
    assert all(torch.equal(used[k].float(), v) for k, v in finetuned.items())
    assert not any(p.requires_grad for p in trainer.comps.text_encoder.parameters())  # frozen, outside the engine
    assert trainer.fit().step == 1
    exported = CLIPTextModel.from_pretrained(export_pipeline(tc, tmp_path / "tc_export") / "text_encoder")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in finetuned.items())
    # a pipeline directory works as model.text_encoder_path too (its text_encoder/ subfolder)
    again = Trainer(tiny_config(tmp_path / "tc2", f"model.text_encoder_path={export_pipeline(run, tmp_path / 'p')}"))
    assert all(torch.equal(again.comps.text_encoder.state_dict()[k].float(), v) for k, v in finetuned.items())
    again.tracker.end("FINISHED")
    # the eval launcher swaps the encoder into the pipeline it evaluates (the seed study's comparison)
    from tcscale.eval.config import load_eval_config
    from tcscale.eval.generation import load_pipeline

    spec = importlib.util.spec_from_file_location("eval_launcher", REPO / "launchers" / "eval.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    args = ["--config", "configs/eval/tiny_cpu.yaml", f"model.run_dir={tc}", f"model.text_encoder={encoder_dir}",
            f"output_dir={tmp_path / 'e'}", "grounding.enabled=false", "synthetic.num_objects=[2]",
            "synthetic.num_prompts=1", "synthetic.rounds=1", "sampler.num_inference_steps=1"]  # fmt: skip
    assert launcher.main(args) == 0
    assert json.loads((tmp_path / "e" / "results.json").read_text())["metrics"]
    cfg = load_eval_config("configs/eval/tiny_cpu.yaml", [f"model.run_dir={tc}", f"model.text_encoder={encoder_dir}"])
    pipe = load_pipeline(str(tc / "export" / "step1"), cfg.model, cfg.sampler, "cpu")
    assert all(torch.equal(pipe.text_encoder.state_dict()[k], v) for k, v in finetuned.items())


def test_resume_is_exact_with_last_n_layers_a_new_projection_and_a_learnt_temperature(tiny_config, tmp_path, tiny_clip):
    from tcscale.train.trainer import train

    opts = [f"{SECTION}.train_layers=last_n", f"{SECTION}.last_n=1", f"{SECTION}.projection=new",
            f"{SECTION}.learn_temperature=true", f"{SECTION}.recall.enabled=false"]  # fmt: skip
    straight = tmp_path / "straight"
    assert train(infonce_config(tiny_config, straight, tiny_clip, "max_steps=4", *opts)).step == 4
    split = tmp_path / "split"
    train(infonce_config(tiny_config, split, tiny_clip, "max_steps=2", *opts))
    again = train(infonce_config(tiny_config, split, tiny_clip, "max_steps=4", "resume=latest", *opts))
    assert again.step == 4
    a, b = launch.final_weights(straight), launch.final_weights(split)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # what trained: the last layer + final LN, the new projection, the temperature; not the rest
    from transformers import CLIPTextModel

    base = CLIPTextModel.from_pretrained(straight / "base_model" / "text_encoder").state_dict()
    changed = {k.removeprefix("text_encoder.") for k in a if k.startswith("text_encoder.")
               and not torch.equal(a[k], base[k.removeprefix("text_encoder.")])}  # fmt: skip
    assert changed and all(
        k.startswith(("text_model.encoder.layers.1.", "text_model.final_layer_norm.")) for k in changed
    )
    assert float(a["log_inv_temperature"]) != pytest.approx(math.log(1 / 0.07))


def test_config_checks_name_the_key(tiny_config, tmp_path, tiny_clip):
    from tcscale.config import ConfigError

    with pytest.raises(ConfigError, match=rf"{SECTION}\.image_model must name"):
        tiny_config(tmp_path, "objective.name=text_encoder_infonce")
    for override, key in [("temperature=0", "temperature"), ("crops.min_fill=1.5", "crops.min_fill"),
                          ("template=phrase", "template"), ("recall.source=webdataset", "recall.source")]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"{SECTION}\.{key}"):
            infonce_config(tiny_config, tmp_path, tiny_clip, f"{SECTION}.{override}")


def test_a_micro_batch_without_pairs_still_runs_its_forward(tiny_config, tmp_path, tiny_clip):
    from tcscale.models.sd import load_components
    from tcscale.objectives import BuildContext
    from tcscale.objectives.text_encoder_infonce import TextEncoderInfoNCEObjective

    cfg = infonce_config(tiny_config, tmp_path, tiny_clip)
    comps = load_components(cfg.model, cfg.data.resolution)
    objective = TextEncoderInfoNCEObjective(
        cfg.objective.text_encoder_infonce, BuildContext(cfg, comps, torch.float32, torch.device("cpu"), 8)
    )
    out = objective(objective.module, collate_crops([objective.processor.empty()]), torch.Generator())
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    grads = [p.grad for p in objective.trainable_parameters()]
    assert all(g is not None and not g.any() for g in grads)
