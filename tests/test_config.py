"""Config: schema <- YAML <- dotlist, strict; every shipped YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tcscale.config import ConfigError, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TRAIN_CONFIGS = [p for p in CONFIGS if not p.name.startswith("dataprep")]


def test_shipped_configs_exist():
    names = {p.stem for p in TRAIN_CONFIGS}
    for required in (
        "tiny_cpu",
        "sd14_tokencompose",
        "sd21_tokencompose",
        "sd14_ldm",
        "sd14_sepen_pairs",
        "sd14_sepen_large",
    ):
        assert required in names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")  # the saved merged config loads back identically
    assert again == cfg


def test_paper_settings():
    sd14 = load_config(Path("configs/sd14_tokencompose.yaml"))
    sd21 = load_config(Path("configs/sd21_tokencompose.yaml"))
    for cfg, steps, res in ((sd14, 24000, 512), (sd21, 32000, 768)):
        ds = cfg.deepspeed
        assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 5e-6
        assert "scheduler" not in ds  # constant lr
        assert cfg.batch.global_size == 4 and ds["train_micro_batch_size_per_gpu"] == 1  # 1 x accumulation 4 on 1 GPU
        assert cfg.max_steps == steps and cfg.data.resolution == res
        tc = cfg.objective.tokencompose
        assert tc.token_loss_weight == 1e-3 and tc.pixel_loss_weight == 5e-5
    assert sd21.model.prediction_type == "v_prediction"


def test_overrides_apply_and_are_typed():
    cfg = load_config(Path("configs/tiny_cpu.yaml"), ["max_steps=7", "data.resolution=32", "attention.blocks=[up]"])
    assert cfg.max_steps == 7 and cfg.data.resolution == 32 and cfg.attention.blocks == ["up"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("max_stepz=3", "max_stepz"),
        ("data.resolutionn=64", "data.resolutionn"),
        ("max_steps=many", "max_steps"),
        ("attention.backend=flash", "attention.backend"),
        ("objective.name=magic", "objective.name"),
        ("data.resolution=60", "data.resolution"),
        ("attention.blocks=[left]", "attention.blocks"),
        ("model.lora.rnk=3", "model.lora.rnk"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(Path("configs/tiny_cpu.yaml"), [override])
    assert "\n" not in str(info.value)  # one line: what the launchers print


def test_unknown_key_in_yaml_names_it(tmp_path):
    data = yaml.safe_load(Path("configs/tiny_cpu.yaml").read_text())
    data["model"]["pretrainedd"] = "x"
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"model\.pretrainedd"):
        load_config(p)


def test_deepspeed_auto_and_missing_keys_rejected(tmp_path):
    data = yaml.safe_load(Path("configs/tiny_cpu.yaml").read_text())
    data["deepspeed"]["gradient_clipping"] = "auto"
    p = tmp_path / "auto.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"deepspeed\.gradient_clipping"):
        load_config(p)
    del data["deepspeed"]["gradient_clipping"]
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="gradient_clipping must be set"):
        load_config(p)


def test_missing_file_and_required_key(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(None, [])
