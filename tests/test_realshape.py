"""Every shipped training config, and the paper evaluation config, at the released models' shapes.

Random-weight pipelines with the shapes of CompVis/stable-diffusion-v1-4, stabilityai/stable-diffusion-2-1 and
stabilityai/stable-diffusion-xl-base-1.0 are built once per session (tests/helpers/realshape.py) and given as
`model.pretrained`, so each config loads through `from_pretrained` as it would from the hub. Each config then runs
through the README's launcher (`deepspeed launchers/train.py --config configs/<name>.yaml`) on one CPU rank for one
step at 128 px on grounded shards (the synthetic world written by dataprep), is exported by launchers/export.py and
reloaded in diffusers, which generates one 64 px image.

Full finetuning or LoRA (docs/REALSHAPE.md has the measured table): what does not fit this 24 GiB machine runs
with `model.lora.rank=8`. Full finetuning of a U-Net with ZeRO-2 AdamW holds bf16 weights + fp32 master + two
fp32 moments (14 bytes per parameter: 12 GiB for SD1.4's 860 M, before gradients and activations; it was
OOM-killed at 23 GB), so the SD1.4 / SD2.1 / SDXL U-Net configs (TokenCompose, LDM-only, TokenCompose with the
finetuned text encoder) run LoRA; SepEn (only attn2.to_k trains, 10 M parameters) and the text-encoder stage (the
123 M text tower) run as shipped, full finetuning of what they train.

Each run asserts the user-visible result (the launcher exits 0, the step's losses are finite, the export loads
and generates, what trained differs from the base and nothing else does) and a peak resident set below
`PEAK_LIMIT_GIB` (24 GiB less 4 GiB headroom). Marked `realshape` (and `slow`): `make test-realshape` runs
only these (CI runs it beside `make test`, which leaves them out); every subprocess holds the heavy-memory lock.
Set TCSCALE_REALSHAPE_LOG=<file> to collect each step's wall time and peak memory.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers.launch import clean_env, deepspeed_cmd
from tests.helpers.realshape import run_measured

# the session fixtures (pipeline builds) count toward the first test that uses them
pytestmark = [pytest.mark.realshape, pytest.mark.slow, pytest.mark.timeout(3600)]

RESOLUTION = 128  # training px: latent 16², so SD's deepest block is 2² and every grounded layer exists
PEAK_LIMIT_GIB = 20.0
LORA = ["model.lora.rank=8"]
ONE_STEP = [
    "max_steps=1",
    "checkpoint.every_steps=0",  # the final checkpoint is still written
    "validation.every_steps=0",
    "deepspeed.train_micro_batch_size_per_gpu=1",
    "deepspeed.gradient_accumulation_steps=1",
    "batch.global_size=null",  # the recipes' global batch of 4 would take 4 micro-steps on this one rank
    "device=cpu",  # the shipped configs expect CUDA
    f"data.resolution={RESOLUTION}",
]


# -- session fixtures: what is built once ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def realshape_root():
    """One temp dir for the session's models and runs (~20 GiB at most), removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="tcscale_realshape_"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _build(root: Path, what: str, call: str) -> Path:
    """Build in a subprocess (measured; its memory is returned to the system at once): `call` returns the dir."""
    out = root / what
    code = f"from pathlib import Path\nfrom tests.helpers.realshape import *\n{call.format(out=repr(str(out)))}\n"
    run_measured(f"build {what}", [sys.executable, "-c", code], clean_env(), timeout=1200).check()
    return out


@pytest.fixture(scope="session")
def base_pipeline(realshape_root):
    """`base_pipeline("sd14" | "sd21" | "sdxl")`: the random-weight pipeline dir, built on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = _build(realshape_root, name, f"save_random_pipeline({name!r}, Path({{out}}), {RESOLUTION})")
        return built[name]

    return get


@pytest.fixture(scope="session")
def shards(realshape_root):
    """Grounded shards (the synthetic world, written by dataprep), 8 samples."""
    from dataprep.synthetic_shards import write_synthetic_shards

    out = realshape_root / "shards"
    write_synthetic_shards(str(out), 8, RESOLUTION, RESOLUTION, samples_per_shard=4, progress=False)
    return ["data.source=webdataset", f"data.shards={out}/synthetic-{{000000..000001}}.tar", "data.num_workers=0",
            "data.shuffle_buffer=4"]  # fmt: skip


def train(config: str, run_dir: Path, overrides: list[str]):
    """One step of configs/<config>.yaml through the launcher on one rank; returns the run's final metrics."""
    cmd = deepspeed_cmd(1, f"configs/{config}.yaml", [f"output_dir={run_dir}", *ONE_STEP, *overrides])
    run = run_measured(f"train {config}", cmd, clean_env(), timeout=1500).check()
    assert run.peak_rss_gib < PEAK_LIMIT_GIB, f"train {config}: peak {run.peak_rss_gib:.1f} GiB"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step1"
    return final_metrics(run_dir)


def final_metrics(run_dir: Path) -> dict[str, float]:
    import mlflow

    info = json.loads((run_dir / "run.json").read_text())
    run = mlflow.MlflowClient(tracking_uri=info["tracking_uri"]).get_run(info["mlflow_run_id"])
    metrics = run.data.metrics
    losses = {k: v for k, v in metrics.items() if k.startswith("loss/")}
    assert losses and all(math.isfinite(v) for v in losses.values()), metrics
    return metrics


def export(run_dir: Path, out: Path, *flags: str):
    cmd = [sys.executable, "launchers/export.py", "--run-dir", str(run_dir), "--out", str(out), *flags]
    result = run_measured(f"export {run_dir.name} {' '.join(flags)}".strip(), cmd, clean_env(), timeout=900).check()
    assert result.peak_rss_gib < PEAK_LIMIT_GIB
    return result


def reload(kind: str, export_dir: Path, base: Path) -> dict:
    cmd = [sys.executable, "-m", "tests.helpers.realshape_reload", kind, str(export_dir), str(base)]
    result = run_measured(f"reload {kind} {export_dir.name}", cmd, clean_env(), timeout=900).check()
    assert result.peak_rss_gib < PEAK_LIMIT_GIB
    line = next(x for x in result.output.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["image_shape"] == [1, 64, 64, 3]
    return out


def check_lora_export(run_dir: Path, base: Path, adapted_layers: int) -> None:
    """The adapter export is small and written without the base weights; diffusers loads it onto the base."""
    result = export(run_dir, run_dir / "export")
    weights = run_dir / "export" / "pytorch_lora_weights.safetensors"
    assert weights.stat().st_size < 200 * 2**20
    assert "a full pipeline needs" not in result.output  # the full-export path (base in fp32) was not taken
    loaded = reload("lora", run_dir / "export", base)
    assert loaded["base_model"] == str(base)
    assert loaded["lora_layers"] == adapted_layers
    assert loaded["lora_b_nonzero"] == adapted_layers  # B starts at zero: one optimizer step moved every adapter


@pytest.fixture(scope="session")
def sd14_tokencompose_run(realshape_root, base_pipeline, shards):
    run_dir = realshape_root / "runs" / "sd14_tokencompose"
    metrics = train("sd14_tokencompose", run_dir, [f"model.pretrained={base_pipeline('sd14')}", *shards, *LORA])
    return run_dir, metrics


@pytest.fixture(scope="session")
def text_encoder_export(realshape_root, base_pipeline, shards):
    """The text-encoder stage (full finetuning of SD1.4's text tower against CLIP ViT-L/14's image tower)."""
    clip = _build(realshape_root, "clip_vit_l14", "save_clip_vit_l14(Path({out}))")
    run_dir = realshape_root / "runs" / "sd14_text_encoder_infonce"
    section = "objective.text_encoder_infonce"
    metrics = train(
        "sd14_text_encoder_infonce",
        run_dir,
        [f"model.pretrained={base_pipeline('sd14')}", *shards, f"{section}.image_model={clip}",
         f"{section}.recall.enabled=false", "deepspeed.train_micro_batch_size_per_gpu=2"],
    )  # fmt: skip
    out = realshape_root / "exports" / "sd14_text_encoder"
    result = export(run_dir, out, "--text-encoder")
    assert "a full pipeline needs" in result.output  # said up front
    return out, metrics


# -- SD1.4 ------------------------------------------------------------------------------------------------------------
SD14_ATTENTION_PROJECTIONS = 16 * 2 * 4  # 16 transformer blocks x (attn1, attn2) x (q, k, v, out)


def test_sd14_tokencompose_lora_trains_exports_and_reloads(sd14_tokencompose_run, base_pipeline):
    run_dir, metrics = sd14_tokencompose_run
    assert metrics["loss/token"] > 0 and metrics["loss/pixel"] > 0
    check_lora_export(run_dir, base_pipeline("sd14"), SD14_ATTENTION_PROJECTIONS)


def test_sd14_tokencompose_lora_with_caption_dropout(sd14_tokencompose_run, realshape_root, base_pipeline, shards):
    """data.caption_dropout with TokenCompose at SD1.4's shapes: the step's one sample loses its caption, so it grounds
    nothing (token and pixel terms 0) and trains the unconditional branch with L_LDM alone, which the empty caption
    changes; the adapter exports and reloads as without it."""
    _, plain = sd14_tokencompose_run
    run_dir = realshape_root / "runs" / "sd14_tokencompose_caption_dropout"
    overrides = [f"model.pretrained={base_pipeline('sd14')}", *shards, *LORA, "data.caption_dropout=0.999"]
    dropped = train("sd14_tokencompose", run_dir, overrides)
    assert plain["loss/token"] > 0 and plain["loss/pixel"] > 0
    assert dropped["loss/token"] == 0.0 and dropped["loss/pixel"] == 0.0, dropped
    assert dropped["loss/ldm"] != plain["loss/ldm"], (dropped["loss/ldm"], plain["loss/ldm"])
    check_lora_export(run_dir, base_pipeline("sd14"), SD14_ATTENTION_PROJECTIONS)


@pytest.fixture(scope="session")
def sd14_ldm_run(realshape_root, base_pipeline, shards):
    run_dir = realshape_root / "runs" / "sd14_ldm"
    metrics = train("sd14_ldm", run_dir, [f"model.pretrained={base_pipeline('sd14')}", *shards, *LORA])
    return run_dir, metrics


def test_sd14_ldm_lora(sd14_ldm_run, base_pipeline):
    run_dir, _ = sd14_ldm_run
    check_lora_export(run_dir, base_pipeline("sd14"), SD14_ATTENTION_PROJECTIONS)


def test_sd14_ldm_lora_with_caption_dropout(sd14_ldm_run, realshape_root, base_pipeline, shards):
    """data.caption_dropout at SD1.4's shapes: the empty caption (SD1.4's tokenizer, 77 ids) replaces the step's
    caption, which changes the loss of the same step (noise and timesteps are drawn the same for any p) while the
    run trains and exports as without it."""
    _, plain = sd14_ldm_run
    run_dir = realshape_root / "runs" / "sd14_ldm_caption_dropout"
    # p 0.999: the step's one sample is dropped (the draw is a pure function of the run seed, so this is fixed)
    overrides = [f"model.pretrained={base_pipeline('sd14')}", *shards, *LORA, "data.caption_dropout=0.999"]
    dropped = train("sd14_ldm", run_dir, overrides)
    assert dropped["loss/ldm"] != plain["loss/ldm"], (dropped["loss/ldm"], plain["loss/ldm"])
    check_lora_export(run_dir, base_pipeline("sd14"), SD14_ATTENTION_PROJECTIONS)


@pytest.mark.parametrize("config", ["sd14_sepen_pairs", "sd14_sepen_large"])
def test_sd14_sepen_full_finetuning_changes_only_the_cross_attention_keys(config, realshape_root, base_pipeline):
    """SepEn trains attn2.to_k only: the exported U-Net differs from the base there and is equal elsewhere (the
    frozen weights come from the base model, not from the checkpoint's bf16 copy)."""
    run_dir = realshape_root / "runs" / config
    # 128 px: latent 16², so the 4² layers are the ones the config's 16² maps read at 512 px
    train(config, run_dir, [f"model.pretrained={base_pipeline('sd14')}", "objective.sepen.map_resolution=4"])
    result = export(run_dir, run_dir / "export")
    assert "a full pipeline needs" in result.output
    loaded = reload("pipeline", run_dir / "export", base_pipeline("sd14"))
    assert loaded["differing"] and all(".attn2.to_k." in n for n in loaded["differing"]), loaded["differing"][:5]


def test_sd14_text_encoder_stage_exports_a_trained_text_tower(text_encoder_export, base_pipeline):
    out, metrics = text_encoder_export
    loaded = reload("text_encoder", out, base_pipeline("sd14"))
    assert loaded["differing"], "one optimizer step left the text encoder unchanged"


def test_sd14_tokencompose_with_the_finetuned_text_encoder(realshape_root, base_pipeline, shards, text_encoder_export):
    out, _ = text_encoder_export
    run_dir = realshape_root / "runs" / "sd14_tokencompose_finetuned_text"
    overrides = [f"model.pretrained={base_pipeline('sd14')}", f"model.text_encoder_path={out}", *shards, *LORA]
    metrics = train("sd14_tokencompose_finetuned_text", run_dir, overrides)
    assert metrics["loss/token"] > 0
    check_lora_export(run_dir, base_pipeline("sd14"), SD14_ATTENTION_PROJECTIONS)


# -- SD2.1 and SDXL ---------------------------------------------------------------------------------------------------
def test_sd21_tokencompose_lora(realshape_root, base_pipeline, shards):
    run_dir = realshape_root / "runs" / "sd21_tokencompose"
    metrics = train("sd21_tokencompose", run_dir, [f"model.pretrained={base_pipeline('sd21')}", *shards, *LORA])
    assert metrics["loss/token"] > 0
    check_lora_export(run_dir, base_pipeline("sd21"), SD14_ATTENTION_PROJECTIONS)  # SD2.x keeps SD1.x's layout


# transformer blocks: down_blocks.1 2x2, down_blocks.2 2x10, mid 10, up_blocks.0 3x10, up_blocks.1 3x2 = 70
SDXL_ATTENTION_PROJECTIONS = (2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2) * 2 * 4


def test_sdxl_tokencompose_lora(realshape_root, base_pipeline, shards):
    run_dir = realshape_root / "runs" / "sdxl_tokencompose"
    metrics = train("sdxl_tokencompose", run_dir, [f"model.pretrained={base_pipeline('sdxl')}", *shards, *LORA])
    assert metrics["loss/token"] > 0
    check_lora_export(run_dir, base_pipeline("sdxl"), SDXL_ATTENTION_PROJECTIONS)


# -- the paper evaluation ---------------------------------------------------------------------------------------------
def test_sd14_paper_eval_with_released_shape_detectors(realshape_root, sd14_tokencompose_run, base_pipeline):
    """configs/eval/sd14_paper.yaml on the trained run: MultiGen on the first prompt of the COCO set with
    OWLv2-large's shapes (one 960 px detector pass per image; with both sets' first prompts this evaluation took
    580 CPU s; tests/test_eval_paper_configs.py reads both official sets), VISOR on two prompts with OWL-ViT-B/32's
    shapes, latency against the base; 4 PNDM steps
    (its fewest: PNDM's Runge-Kutta warm-up needs 4; 1 step fails inside diffusers) at 128 px, one image each.
    FID (C) and (F) are off here: they need COCO / Flickr30K images and Inception weights this machine cannot
    download (tests/test_eval_paper_configs.py runs the same config's FID suites with an injected extractor)."""
    run_dir, _ = sd14_tokencompose_run
    owlv2 = _build(realshape_root, "owlv2_large", "save_owlv2_large(Path({out}))")
    owlvit = _build(realshape_root, "owlvit_b32", "save_owlvit_base32(Path({out}))")
    out = realshape_root / "eval" / "sd14_paper"
    overrides = [
        f"model.run_dir={run_dir}", f"output_dir={out}", "model.dtype=fp32", "device=cpu",
        "sampler.num_inference_steps=4", f"sampler.resolution={RESOLUTION}", "sampler.batch_size=1",
        "multigen.limit=1", "multigen.rounds=1", "multigen.sets=[coco]", f"multigen.detector={owlv2}",
        "multigen.detector_batch_size=1",
        "visor.limit=2", "visor.rounds=1", f"visor.detector={owlvit}", "visor.detector_batch_size=1",
        "latency.prompts=1", f"latency.base={base_pipeline('sd14')}",
        "fid.enabled=false", "fid_flickr30k.enabled=false",
    ]  # fmt: skip
    cmd = [sys.executable, "launchers/eval.py", "--config", "configs/eval/sd14_paper.yaml", *overrides]
    result = run_measured("eval sd14_paper", cmd, clean_env(), timeout=1500).check()
    assert result.peak_rss_gib < PEAK_LIMIT_GIB
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    for key in ("multigen/coco/MG2", "visor/OA"):
        assert key in metrics and math.isfinite(metrics[key]), (key, sorted(metrics))
    assert any(k.startswith("latency/") for k in metrics), sorted(metrics)
