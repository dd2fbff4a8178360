"""The export holds only what it writes: frozen parameters come from the base model (never the checkpoint's bf16
copy rebuilt in fp32), an adapter export reads no base weight, a full export states its memory first."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tcscale.train import trainer as trainer_mod
from tcscale.train.export import export_pipeline, full_export_bytes

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def test_bf16_sepen_export_keeps_the_base_weights_exactly_where_nothing_trained(tmp_path, tiny_config, capsys):
    """SepEn trains attn2.to_k only. In bf16 the checkpoint's copy of the frozen weights is rounded to bf16; the
    export takes them from the fp32 base instead, so they equal the base bit for bit."""
    run = tmp_path / "run"
    cfg = tiny_config(run, "max_steps=1", "objective.name=sepen", "objective.sepen.map_resolution=8",
                      "deepspeed.bf16.enabled=true", "deepspeed.optimizer.params.lr=1e-2")  # fmt: skip
    trainer_mod.train(cfg)
    capsys.readouterr()
    out = export_pipeline(run, tmp_path / "export")
    said = capsys.readouterr().out
    base, exported = load_file(run / "base_model" / UNET_FILE), load_file(out / UNET_FILE)
    assert base.keys() == exported.keys()
    changed = sorted(k for k in base if not torch.equal(base[k], exported[k]))
    assert changed and all(".attn2.to_k." in k for k in changed), changed[:4]
    assert any(base[k].to(torch.bfloat16).float().ne(base[k]).any() for k in base)  # bf16 would have changed them
    need = full_export_bytes(run)
    trained = sum(v.numel() for k, v in base.items() if ".attn2.to_k." in k)
    assert need["trained"] == 4 * trained
    assert need["base"] >= 4 * sum(v.numel() for v in base.values())
    assert f"needs about {(need['base'] + need['trained']) / 1024**3:.1f} GiB" in said


def test_lora_adapter_export_reads_no_base_weight(tmp_path, tiny_config):
    """With the base U-Net's weights gone (its config kept), the adapter still exports, equal to the run's."""
    from tcscale.models.lora import WEIGHT_NAME, adapter_state_dict
    from tcscale.train.export import load_trained_components

    run = tmp_path / "run"
    trainer_mod.train(tiny_config(run, "model.lora.rank=4", "deepspeed.optimizer.params.lr=1e-2"))
    expected = adapter_state_dict(load_trained_components(run).unet)
    weights = run / "base_model" / UNET_FILE
    weights.rename(weights.with_suffix(".moved"))
    out = export_pipeline(run, tmp_path / "adapter")
    written = load_file(out / WEIGHT_NAME)
    assert {k.removeprefix("unet.") for k in written} == set(expected)
    for k, v in written.items():
        assert torch.equal(v, expected[k.removeprefix("unet.")].float()), k
    assert any(v.abs().max() > 0 for k, v in written.items() if "lora_B" in k or "lora.up" in k)
