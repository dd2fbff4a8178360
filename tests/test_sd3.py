"""SD3 / SD3.5 (model.family=sd3, docs/MMDIT.md): the released shapes on the meta device, the conditioning as diffusers'
StableDiffusion3Pipeline computes it, the joint-attention grounding maps against an independent computation, the
phrase -> T5 token alignment, the flow-matching L_LDM against diffusers' SD3 script's formulas, and
configs/tiny_sd3_cpu.yaml on 2 ranks (ZeRO-2): grounding losses in MLflow, exact resume, a StableDiffusion3Pipeline
export that generates."""

from __future__ import annotations

import math

import pytest
import torch

from tcscale.config import load_config
from tcscale.families import FAMILIES
from tcscale.families.sd3 import MMDIT_LAYOUT, clip_caption, t5_token_phrase
from tests.helpers import launch

CONFIG = "configs/tiny_sd3_cpu.yaml"
CAPTION = "a photo of a red circle, a blue square and an orange star"


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny():
    from tcscale.models.sd import load_components

    cfg = load_config(CONFIG, ["max_steps=1"])
    return cfg, load_components(cfg.model, cfg.data.resolution)


def test_sd3_architectures_are_the_released_shapes_on_meta():
    """Parameter counts of the released configs (sources in docs/MMDIT.md): SD3-medium's pipeline components as
    counted on the loaded pipeline; SD3.5's transformers, whose checkpoints also store the positional-embedding
    buffer (pos_embed_max_size² x width), hence their stored element counts."""
    from tcscale.attention.plan import select_layers
    from tcscale.models.architectures import build_random_components

    sd3 = build_random_components("sd3-medium", device="meta")
    assert count(sd3.unet) == 2_028_328_000
    assert count(sd3.text_encoder) == 123_650_304  # CLIP ViT-L/14 text tower + projection
    assert count(sd3.text_encoder_2) == 694_659_840  # OpenCLIP ViT-bigG/14 text tower + projection
    assert count(sd3.text_encoder_3) == 4_762_310_656  # T5 v1.1 XXL encoder
    assert count(sd3.vae) == 83_819_683 and sd3.vae.config.latent_channels == 16
    assert all(p.is_meta for p in sd3.unet.parameters())

    medium = build_random_components("sd3.5-medium", device="meta").unet
    buffer = lambda m: m.pos_embed.pos_embed.numel()  # noqa: E731
    assert count(medium) == 2_243_171_520 and count(medium) + buffer(medium) == 2_469_663_936
    assert len([m for m in medium.transformer_blocks if m.attn2 is not None]) == 13

    large = build_random_components("sd3.5-large", resolution=128, device="meta")
    assert count(large.unet) == 8_056_627_520 and count(large.unet) + buffer(large.unet) == 8_146_280_768
    # the grounded layers: the 38 joint attentions, by depth thirds
    layers = {b: select_layers(large.unet, [b], None, 16, MMDIT_LAYOUT) for b in ("early", "middle", "late")}
    assert [len(v) for v in layers.values()] == [13, 13, 12]
    first_middle = layers["middle"][0]
    assert first_middle == "transformer_blocks.13.attn" and MMDIT_LAYOUT.latent_side(large.unet, first_middle, 16) == 8


def test_sd3_conditioning_matches_the_diffusers_pipeline():
    """Both CLIP towers' penultimate states (zero-padded to T5's width) then T5's, and both pooled projections: what
    StableDiffusion3Pipeline.encode_prompt computes from the same caption."""
    cfg, comps = tiny()
    family = FAMILIES["sd3"]
    pipe = family.pipeline(comps)
    prompts = [CAPTION, "an old teddy bear next to a fire hydrant"]
    ids = comps.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert [clip_caption(comps.tokenizer, row)[0] for row in ids] == prompts
    cond = family.encode(comps, ids, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=256
        )
    assert cond.text.shape == (2, 77 + 256, cfg.model.tiny.t5_hidden) == embeds.shape
    torch.testing.assert_close(cond.text, embeds)
    torch.testing.assert_close(cond.added_cond_kwargs["pooled_projections"], pooled)


def independent_joint_probs(attn, x, ctx) -> tuple[torch.Tensor, int]:
    """(B, H, N + M, N + M) joint probabilities in float64 from the layer's own weights: exp(s) / Σ exp(s) over the
    image and text keys, written without the processor's helpers."""
    W = {n: getattr(attn, n) for n in ("to_q", "to_k", "add_q_proj", "add_k_proj")}
    H = attn.heads

    def heads(y, norm):
        y = y.double().view(y.shape[0], y.shape[1], H, -1).transpose(1, 2)
        if norm is None:
            return y
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()

    q = torch.cat([heads(W["to_q"](x), attn.norm_q), heads(W["add_q_proj"](ctx), attn.norm_added_q)], dim=2)
    k = torch.cat([heads(W["to_k"](x), attn.norm_k), heads(W["add_k_proj"](ctx), attn.norm_added_k)], dim=2)
    scores = torch.einsum("bhud,bhjd->bhuj", q, k) / math.sqrt(q.shape[-1])
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True), x.shape[1]


def test_joint_grounding_maps_against_an_independent_computation():
    """The grounded processor's map is the image-query x text-key block of the joint softmax (`joint`), or that block
    renormalised over the text keys (`text`); the layer's output equals diffusers' JointAttnProcessor2_0's."""
    from tcscale.attention.config import AttentionConfig
    from tcscale.attention.joint import install_joint_grounding_processors
    from tcscale.attention.plan import GroundingPlan, vae_scale_factor
    from tcscale.attention.recorders import ProbsRecorder

    _, comps = tiny()
    model = comps.unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 16, 16, generator=g)
    text = torch.randn(2, 333, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(2, model.config.pooled_projection_dim, generator=g)
    t = torch.tensor([500.0, 20.0])
    inputs: dict[int, dict] = {1: {}, 2: {}}  # the middle block and the last (context_pre_only) block
    hooks = [
        model.transformer_blocks[n].attn.register_forward_pre_hook(
            lambda mod, args, kwargs, n=n: inputs[n].update(kwargs), with_kwargs=True
        )
        for n in inputs
    ]
    with torch.no_grad():
        ref = model(x, text, pooled, t).sample  # diffusers' own processors
    for hook in hooks:
        hook.remove()
    assert model.transformer_blocks[2].context_pre_only
    blocks = {}
    for n, kw in inputs.items():
        expected, n_image = independent_joint_probs(
            model.transformer_blocks[n].attn, kw["hidden_states"], kw["encoder_hidden_states"]
        )
        blocks[n] = expected[:, :, :n_image, n_image:]
    for reading in ("joint", "text"):
        attention = AttentionConfig(blocks=["middle", "late"], joint_reading=reading)
        plan = GroundingPlan.from_config(model, attention, 64, vae_scale_factor(comps.vae), layout=MMDIT_LAYOUT)
        assert plan.layers == ("transformer_blocks.1.attn", "transformer_blocks.2.attn") and plan.sides == (8, 8)
        install_joint_grounding_processors(model, plan, attention)
        with torch.no_grad(), ProbsRecorder((16, 16)) as rec:
            out = model(x, text, pooled, t, joint_attention_kwargs=rec.kwargs).sample
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert [r.name for r in rec.records] == list(plan.layers)
        for record, block in zip(rec.records, blocks.values()):
            want = block if reading == "joint" else block / block.sum(-1, keepdim=True)
            assert record.probs.shape == (2, 2, 64, 333) and record.size == (8, 8)
            torch.testing.assert_close(record.probs.double(), want, rtol=1e-5, atol=1e-7)
    block = blocks[1]
    rows = block.sum(-1)
    assert (rows < 1).all() and (rows > 0).all()  # the joint reading's rows keep the mass left to the text keys


def test_phrase_tokens_in_the_clip_and_t5_sequences():
    """A T5 token carries the phrase whose CLIP tokens cover its characters; a word outside the tiny T5 vocabulary
    falls back to characters, each carrying the phrase; joint_tokens picks the sequences."""
    from tcscale.attention.config import AttentionConfig

    _, comps = tiny()
    caption = "a photo of a red circle, a blue square and an old teddy bear"
    ids = comps.tokenizer([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = ids.input_ids
    clip_tokens = comps.tokenizer.convert_ids_to_tokens(ids[0])
    phrase_words = {"red</w>": 0, "circle</w>": 0, "blue</w>": 1, "square</w>": 1, "teddy</w>": 2, "bear</w>": 2}
    token_phrase = torch.tensor([[phrase_words.get(tok, -1) for tok in clip_tokens]])
    text, spans = clip_caption(comps.tokenizer, ids[0])
    assert text == caption
    t5_ids, t5_phrase = t5_token_phrase(comps.tokenizer_3, [text], [spans], token_phrase)
    pieces = comps.tokenizer_3.convert_ids_to_tokens(t5_ids[0])
    got = {}
    for piece, p in zip(pieces, t5_phrase[0].tolist()):
        if p >= 0:
            got.setdefault(p, []).append(piece)
    assert got == {0: ["▁red", "▁circle"], 1: ["▁blue", "▁square"], 2: list("teddy") + list("bear")}
    family = FAMILIES["sd3"]
    for tokens, clip_part, t5_part in (("both", True, True), ("clip", True, False), ("t5", False, True)):
        keys = family.key_token_phrase(comps, ids, token_phrase, AttentionConfig(joint_tokens=tokens))
        assert keys.shape == (1, 77 + 256)
        assert torch.equal(keys[:, :77], token_phrase if clip_part else torch.full_like(token_phrase, -1))
        assert torch.equal(keys[:, 77:], t5_phrase if t5_part else torch.full_like(t5_phrase, -1))


@pytest.mark.parametrize("scheme", ["logit_normal", "none", "sigma_sqrt", "mode", "cosmap"])
def test_flow_matching_noise_and_loss_follow_the_sd3_script(scheme):
    """σ from the shifted table at ⌊u·T⌋ (u drawn as diffusers' density draws it), x_σ = (1 − σ)x₀ + σε, target
    ε − x₀, loss = mean_b w(σ_b)·mean((pred − target)²) with SD3's weightings, written out here."""
    from tcscale.losses.flow_matching import FlowMatchingConfig, flow_matching_loss, flow_matching_noise

    _, comps = tiny()
    cfg = FlowMatchingConfig(weighting_scheme=scheme)
    g = torch.Generator().manual_seed(3)
    x0, eps, pred = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8)
    t, noisy, target, w = flow_matching_noise(comps.noise_scheduler, x0, eps, torch.Generator().manual_seed(7), cfg)

    g = torch.Generator().manual_seed(7)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(0.0, 1.0, size=(3,), generator=g))
    elif scheme == "mode":
        r = torch.rand(3, generator=g)
        u = 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    else:
        u = torch.rand(3, generator=g)
    s = (1000 - (u * 1000).long()).double() / 1000  # the unshifted table: 1, 0.999, ..., 0.001
    sigma = 3.0 * s / (1 + 2.0 * s)  # shift 3 (SD3's scheduler config)
    torch.testing.assert_close(t.double(), sigma * 1000, rtol=1e-6, atol=1e-3)
    sb = sigma.float().view(3, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sb) * x0 + sb * eps)
    torch.testing.assert_close(target, eps - x0)
    weight = {"sigma_sqrt": sigma**-2.0, "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))}.get(
        scheme, torch.ones(3, dtype=torch.float64)
    )
    torch.testing.assert_close(w.double(), weight, rtol=1e-5, atol=0)
    per_sample = ((pred.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(flow_matching_loss(pred, target, w).double(), (weight * per_sample).mean(), rtol=1e-5,
                               atol=0)  # fmt: skip


def test_sd3_held_out_grounding_records_against_an_independent_computation():
    """The evaluation's grounding mIoU on an MMDiT: the latent noised to σ = t / T, the joint layers' maps read as
    image queries x text keys (renormalised), a phrase's map the sum of its CLIP and T5 keys, recomputed here from
    the layers' inputs (float64 joint softmax) and scored with the same IoU."""
    from tcscale.attention.config import AttentionConfig
    from tcscale.attention.plan import GroundingPlan, vae_scale_factor
    from tcscale.eval.grounding_iou import grounding_iou
    from tcscale.eval.grounding_maps import grounding_batches, grounding_records, noise_seed

    _, comps = tiny()
    family, model = FAMILIES["sd3"], comps.unet.eval()
    plan = GroundingPlan.build(
        model, blocks=["middle", "late"], resolutions=None, image_resolution=64,
        scale_factor=vae_scale_factor(comps.vae), layout=MMDIT_LAYOUT,
    )  # fmt: skip
    batch = next(grounding_batches("synthetic", comps.tokenizer, resolution=64, num_samples=2, batch_size=2))
    seen: dict[str, dict] = {}
    hooks = [model.register_forward_pre_hook(lambda m, a, kw: seen.update(model=kw), with_kwargs=True)]
    hooks += [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, kw, name=name: seen.update({name: kw}), with_kwargs=True
        )
        for name in plan.layers
    ]
    with torch.no_grad():
        records = grounding_records(
            model, comps.vae, comps, comps.noise_scheduler, plan, [batch], timesteps=[300], family="sd3", seed=5,
            threshold=0.5,
        )  # fmt: skip
    for hook in hooks:
        hook.remove()
    # the input: SD3's latent of the image (VAE mode, shift and scale), noised to sigma = 0.3 with the record's seed
    with torch.no_grad():
        mode = comps.vae.encode(batch["pixel_values"]).latent_dist.mode()
    x0 = (mode - comps.vae.config.shift_factor) * comps.vae.config.scaling_factor
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(noise_seed(5, k, 300)))
                         for k in batch["keys"]])  # fmt: skip
    torch.testing.assert_close(seen["model"]["hidden_states"], 0.7 * x0 + 0.3 * noise)
    assert seen["model"]["timestep"].tolist() == [300.0, 300.0]
    # the maps: text reading, head mean, phrase sums over the family's keys (77 CLIP + 256 T5 positions)
    keys = family.key_token_phrase(comps, batch["input_ids"], batch["token_phrase"], AttentionConfig())
    assert (keys[:, 77:] >= 0).any()  # T5 keys take part
    want = []
    for b, key in enumerate(batch["keys"]):
        slots = sorted(int(p) for p in keys[b].unique() if p >= 0)
        layers = {}
        for name in plan.layers:
            kw = seen[name]
            probs, n_image = independent_joint_probs(
                model.get_submodule(name), kw["hidden_states"], kw["encoder_hidden_states"]
            )
            block = probs[b, :, :n_image, n_image:]
            text_map = (block / block.sum(-1, keepdim=True)).mean(0)  # (N, 333)
            layers[name] = torch.stack([text_map[:, keys[b] == p].sum(1).reshape(8, 8) for p in slots]).float()
        out = grounding_iou(layers, batch["phrase_masks"][b, slots], threshold=0.5)
        want += [(key, p, float(out["iou"][j])) for j, p in enumerate(slots)]
    got = [(r["key"], r["phrase"], r["iou"]) for r in records]
    assert [g[:2] for g in got] == [w[:2] for w in want] and len(got) >= 4
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], abs=1e-6)
    assert all(set(r["layers"]) == set(plan.layers) for r in records)


def test_sd3_trainer_validation_logs_images_heatmaps_and_grounding(tmp_path):
    """`validation.every_steps > 0` on sd3: the validation pipeline (flow-matching sampler), per-phrase heatmaps of
    the joint layers and the live grounding mIoU, through the family hooks."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from tcscale.train.validation import run_validation, validation_pipeline

    _, comps = tiny()
    overrides = ["validation.every_steps=1", "validation.num_inference_steps=2", "validation.grounding.enabled=true",
                 "validation.grounding.source=synthetic", "validation.grounding.num_samples=2",
                 "validation.grounding.timesteps=[100]"]  # fmt: skip
    cfg = load_config(CONFIG, overrides)
    assert isinstance(validation_pipeline(comps.unet, comps).scheduler, FlowMatchEulerDiscreteScheduler)
    logged: dict[str, list] = {"images": [], "metrics": []}
    tracker = SimpleNamespace(
        log_image=lambda image, key, step: logged["images"].append((key, image.size)),
        log_dict=lambda d, path: None,
        log_metrics=lambda m, step: logged["metrics"].append(m),
    )
    env = SimpleNamespace(device=torch.device("cpu"), is_rank0=True)
    metrics = run_validation(comps.unet, comps, cfg, None, tracker, 1, env)
    assert [k for k, _ in logged["images"]] == ["validation/prompt0", "validation/prompt0_attention"]
    assert logged["images"][0][1] == (64, 64)
    assert 0.0 <= metrics["grounding/miou"] <= 1.0 and metrics["grounding/phrases"] >= 4
    assert {k for k in metrics if k.startswith("grounding/layer/")} == {
        f"grounding/layer/transformer_blocks.{n}.attn" for n in range(3)
    }  # the config's grounded blocks: early, middle, late
    assert comps.unet.training  # restored


def test_sd3_config_errors_name_the_key(tmp_path):
    from tcscale.objectives import OBJECTIVES, BuildContext

    with pytest.raises(ValueError, match="objective.ldm.snr_gamma: min-SNR weighting is for DDPM"):
        load_config(CONFIG, ["objective.ldm.snr_gamma=5.0"])
    cfg, comps = tiny()
    cfg.attention.backend = "fused"
    ctx = BuildContext(cfg, comps, torch.float32, torch.device("cpu"), 2)
    with pytest.raises(ValueError, match="attention.backend='fused': joint-attention layers"):
        OBJECTIVES["tokencompose"].build(cfg.objective.tokencompose, ctx)


@pytest.mark.parametrize("overrides", [(), ("model.lora.rank=4",)], ids=["full", "lora"])
def test_planner_runs_the_sd3_step_on_meta_as_on_the_cpu(overrides):
    """The memory planner builds the sd3 components and runs TokenCompose's joint-attention step on the meta device:
    the bytes kept for backward equal a real CPU run's; all three text towers count as frozen models; LoRA adapts
    the transformer's attention projections only."""
    from tcscale.memory.planner import build_models, plan_memory

    cfg = load_config(CONFIG, list(overrides))
    meta, real = plan_memory(cfg, 1), plan_memory(cfg, 1, device="cpu")
    assert meta.activations_per_sample > 0
    assert abs(real.activations_per_sample - meta.activations_per_sample) <= 0.01 * meta.activations_per_sample
    comps = build_models(cfg, "tiny").comps
    assert build_models(cfg, "tiny").frozen_compute == sum(count(t) for t in comps.text_towers)
    assert len(comps.text_towers) == 3
    if overrides:
        assert 0 < meta.trainable_params < count(comps.unet) / 10


def transformer_output(transformer, seed: int = 0) -> torch.Tensor:
    """One forward of the tiny SD3 transformer on fixed inputs (16 channels at 16², 333 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 16, 16, generator=g)
    text = torch.randn(2, 333, transformer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(2, transformer.config.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer.eval()(x, text, pooled, torch.tensor([500.0, 20.0])).sample


def test_sd3_lora_run_exports_an_adapter_stable_diffusion3_pipeline_loads(tmp_path):
    """TokenCompose with LoRA on the transformer (one process, 2 steps): only adapters train; the exported adapter,
    loaded by StableDiffusion3Pipeline.load_lora_weights onto the base, and the merged export both reproduce the
    trained transformer."""
    from diffusers import StableDiffusion3Pipeline

    from tcscale.train import trainer as trainer_mod
    from tcscale.train.export import export_pipeline, load_trained_components

    run = tmp_path / "run"
    cfg = load_config(CONFIG, [f"output_dir={run}", "max_steps=2", "checkpoint.every_steps=0", "model.lora.rank=4",
                               "deepspeed.optimizer.params.lr=1e-2", "data.synthetic.num_samples=8"])  # fmt: skip
    trainer_mod.train(cfg)
    trained = transformer_output(load_trained_components(run).unet)
    base = StableDiffusion3Pipeline.from_pretrained(run / "base_model")
    assert not torch.allclose(trained, transformer_output(base.transformer), atol=1e-4), "adapters changed nothing"

    adapter = export_pipeline(run, tmp_path / "adapter")
    base.load_lora_weights(adapter, weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(transformer_output(base.transformer), trained, rtol=1e-5, atol=1e-5)
    merged = StableDiffusion3Pipeline.from_pretrained(export_pipeline(run, tmp_path / "merged", merge_lora=True))
    assert not any("lora" in n for n, _ in merged.transformer.named_parameters())
    torch.testing.assert_close(transformer_output(merged.transformer), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_tiny_sd3_two_ranks_zero2_logs_grounding_resumes_exactly_and_exports(tmp_path):
    """4 steps on 2 ranks (ZeRO-2) with checkpoints at 2 and 4; a copy of the run cut back to its step-2 checkpoint
    resumes to step 4 with the same weights; the export is a StableDiffusion3Pipeline that generates."""
    from diffusers import StableDiffusion3Pipeline

    from tcscale.train.export import export_pipeline

    a = launch.two_rank_grounded_run_resumes_exactly(tmp_path, CONFIG, "tcscale-tiny-sd3")
    ref = tmp_path / "uninterrupted"
    out = export_pipeline(ref, tmp_path / "export")
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    image = pipe(CAPTION, num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (64, 64)
    trained = {k: v for k, v in pipe.transformer.state_dict().items() if k in a}
    assert trained and all(torch.equal(trained[k], a[k].to(trained[k].dtype)) for k in trained)


@pytest.mark.slow
def test_sd3_grounding_benchmark_smoke(tmp_path):
    """benchmarks/sd3_grounding.py end to end on a tiny budget: a TokenCompose run through the real launcher, its
    held-out evaluation through launchers/eval.py, the results file's numbers those of the evaluation's results."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    results = tmp_path / "results.json"
    cmd = [sys.executable, "benchmarks/sd3_grounding.py", "--smoke", "--seeds", "0", "--methods", "tokencompose",
           "--out", str(tmp_path / "runs"), "--results", str(results)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(results.read_text())
    run_eval = tmp_path / "runs" / "sd3_grounding_held_out" / "tokencompose_s0" / "eval" / "results.json"
    metrics = json.loads(run_eval.read_text())["metrics"]
    assert out["steps"] == 4 and out["models"]["tokencompose"]["grounding_miou"] == [metrics["grounding/miou"]]
    assert set(out["models"]["tokencompose"]["per_layer"]) == {f"transformer_blocks.{n}.attn" for n in range(3)}
