"""What a user meets first at launch: the recipe's global batch on any world size (tcscale.train.batch), `device:
cuda` without a GPU, `--log-level` and `--help` on every launcher, the model card of an export.

`deepspeed --num_gpus 8 launchers/train.py --config configs/sd14_tokencompose.yaml` is simulated by the world size
the trainer hands `resolve_batch` (WORLD_SIZE=8); one real 2-rank launch shows the refusal through the launcher.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcscale.config import ConfigError, load_config
from tcscale.train.batch import BatchError, resolve_batch
from tests.helpers import launch

REPO = Path(__file__).resolve().parents[1]
SD14 = REPO / "configs" / "sd14_tokencompose.yaml"


def plan_for(world: int, *overrides: str):
    cfg = load_config(SD14, list(overrides))
    return resolve_batch(cfg.deepspeed, cfg.batch.global_size, cfg.batch.lr_scaling, world)


@pytest.mark.parametrize(("world", "accum"), [(1, 4), (2, 2), (4, 1)])
def test_paper_batch_is_kept_on_1_2_4_gpus(world, accum):
    plan = plan_for(world)
    assert (plan.micro_batch, plan.accumulation, plan.global_batch) == (1, accum, 4)
    ranks = f"{world} rank{'s' if world > 1 else ''}"
    assert plan.describe() == (
        f"batch: global 4 samples per optimizer step = micro-batch 1 x accumulation {accum} x {ranks} "
        "(the recipe's batch.global_size=4, kept)"
    )
    ds = plan.deepspeed_section(load_config(SD14).deepspeed)
    assert ds["gradient_accumulation_steps"] == accum and ds["optimizer"]["params"]["lr"] == 5e-6


def test_eight_gpus_refuse_in_one_line_naming_the_choices():
    with pytest.raises(BatchError) as info:
        plan_for(8)  # deepspeed --num_gpus 8 ... sd14_tokencompose.yaml
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("batch.global_size=4 cannot be kept on 8 rank(s) at micro-batch 1")
    assert "run on 1, 2, 4 rank(s)" in msg  # the world sizes that keep it
    assert "no deepspeed.train_micro_batch_size_per_gpu makes one on 8 ranks" in msg and "accumulation" in msg
    assert "batch.lr_scaling=linear|sqrt, to train at global batch 8" in msg
    with pytest.raises(BatchError, match="on 3 rank"):
        plan_for(3)


@pytest.mark.parametrize(("rule", "factor"), [("linear", 2.0), ("sqrt", math.sqrt(2.0))])
def test_eight_gpus_adapt_with_a_named_lr_rule(rule, factor):
    plan = plan_for(8, f"batch.lr_scaling={rule}")
    assert (plan.accumulation, plan.global_batch) == (1, 8)
    ds = plan.deepspeed_section(load_config(SD14).deepspeed)
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(5e-6 * factor)
    assert (
        "NOT the recipe's batch.global_size=4" in plan.describe() and "optimizer.params.lr 5e-06 ->" in plan.describe()
    )
    three = plan_for(3, f"batch.lr_scaling={rule}")  # 4 / 3 rounds to accumulation 1: global 3
    assert three.global_batch == 3 and three.lr_scale == pytest.approx(0.75 if rule == "linear" else math.sqrt(0.75))


def test_scheduler_lrs_scale_too_and_explicit_accumulation_must_agree():
    cfg = load_config(REPO / "configs" / "demo_cpu.yaml", ["batch.global_size=4", "batch.lr_scaling=linear"])
    plan = resolve_batch(cfg.deepspeed, 4, "linear", 1)  # micro-batch 8 on one rank: global 8
    ds = plan.deepspeed_section(cfg.deepspeed)
    assert plan.global_batch == 8 and ds["scheduler"]["params"]["warmup_max_lr"] == pytest.approx(4e-4)
    with pytest.raises(BatchError, match=r"gradient_accumulation_steps=4 gives global batch 8 on 2 rank\(s\)"):
        plan_for(2, "deepspeed.gradient_accumulation_steps=4")
    with pytest.raises(ConfigError, match="batch.lr_scaling=linear needs batch.global_size"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["batch.lr_scaling=linear"])
    tiny = load_config(REPO / "configs" / "tiny_cpu.yaml")  # no recipe batch: it follows the world size
    line = resolve_batch(tiny.deepspeed, None, "none", 3).describe()
    assert line.endswith("accumulation 1 x 3 ranks (batch.global_size not set: it follows the world size)")


@pytest.mark.distributed
def test_two_rank_launch_of_the_paper_config_refuses_before_any_model(tmp_path):
    """micro-batch 3 on 2 ranks cannot make 4: exit 2, one line, nothing written, no model loaded."""
    cmd = launch.deepspeed_cmd(2, str(SD14), [f"output_dir={tmp_path / 'run'}", "device=cpu",
                                              "deepspeed.train_micro_batch_size_per_gpu=3"])  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=launch.clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "batch.global_size=4 cannot be kept" in line]
    assert len(lines) == 1 and "on 2 rank(s) at micro-batch 3" in lines[0]  # rank 0 only
    assert "set deepspeed.train_micro_batch_size_per_gpu=1 or 2" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def train_main():
    spec = importlib.util.spec_from_file_location("train_launcher", REPO / "launchers" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_config_without_gpu_exits_2_in_one_line(train_main, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--config", "configs/tiny_cpu.yaml", "device=cuda", f"output_dir={run}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "device: cuda, but no CUDA GPU is visible" in err[0] and "device=cpu" in err[0]
    assert not run.exists()  # refused before anything is written


@pytest.mark.parametrize("launcher", ["train.py", "eval.py", "export.py", "dataprep.py", "demo.py"])
def test_help_on_every_launcher_starts_no_work(launcher, tmp_path):
    demo_out = REPO / "runs" / "demo"
    before = demo_out.stat().st_mtime_ns if demo_out.exists() else None
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / launcher), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--log-level" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran
    assert (demo_out.stat().st_mtime_ns if demo_out.exists() else None) == before  # the demo did not start


def test_log_level_warning_hides_progress_lines(train_main, tmp_path, capsys):
    args = ["--config", "configs/tiny_cpu.yaml", "max_steps=1", "tracking.enabled=false", "checkpoint.every_steps=0"]
    assert train_main([*args, f"output_dir={tmp_path / 'quiet'}", "--log-level", "warning"]) == 0
    quiet = capsys.readouterr().out
    assert train_main([*args, f"output_dir={tmp_path / 'info'}"]) == 0
    info = capsys.readouterr().out
    assert "step 1/1" in info and "batch: global 2 samples per optimizer step" in info
    assert "step 1/1" not in quiet and "batch: global" not in quiet


def test_model_card_states_base_objective_weights_steps_data_and_eval(tmp_path):
    import yaml

    from tcscale.train.model_card import CardFacts, model_card, read_eval_results

    results = tmp_path / "eval" / "results.json"
    results.parent.mkdir()
    results.write_text('{"name": "sd14_paper", "metrics": {"multigen/coco/MG3": 0.52, "fid/coco10k": 20.1}}')
    cfg = load_config(SD14)
    card = model_card(cfg, CardFacts("runs/x", "step24000", "pipeline", "EMA (decay 0.9999)",
                                     read_eval_results([results.parent])))  # fmt: skip
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "diffusers" and front["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert "`CompVis/stable-diffusion-v1-4`" in card and "`tokencompose`" in card and "token_loss_weight" in card
    assert "**Weights**: EMA (decay 0.9999)" in card and "**Steps**: 24000 optimizer steps" in card
    assert "grounded-{000000..000009}.tar" in card and "the recipe's global batch 4" in card
    assert "| sd14_paper | `multigen/coco/MG3` | 0.52 |" in card
    assert yaml.safe_load(card.split("```yaml")[1].split("```")[0])["max_steps"] == 24000  # the whole config
    with pytest.raises(FileNotFoundError, match="no results.json"):
        read_eval_results([tmp_path / "nowhere"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_eval_config_without_gpu_exits_2_in_one_line(tmp_path, capsys):
    """configs/eval/sd14_paper.yaml samples on GPUs (its default device); without one it stops before loading
    anything, naming the override, instead of sampling on the CPU for days."""
    spec = importlib.util.spec_from_file_location("eval_launcher", REPO / "launchers" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "eval"
    args = ["--config", "configs/eval/sd14_paper.yaml", "model.run_dir=runs/none", f"output_dir={out}"]
    assert module.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "device: cuda, but no CUDA GPU is visible" in err[0] and "device=cpu" in err[0]
    assert not out.exists()
