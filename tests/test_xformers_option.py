"""attention.ungrounded: xformers for the layers no objective reads, accepted only where it can run, applied to
exactly the non-grounded layers; the project works without the package (CUDA and the package are simulated)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers.models.attention_processor import Attention

import tcscale.config as config_mod
from tcscale.attention.processors import GroundingAttnProcessor, PlainAttnProcessor, XFormersPlainProcessor
from tcscale.config import ConfigError

REAL_FIND_SPEC = importlib.util.find_spec


def fake_environment(monkeypatch, *, package: bool, cuda: bool, kernels: bool = True) -> None:
    def find_spec(name, *args):
        if name == "xformers":
            return object() if package else None
        return REAL_FIND_SPEC(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(config_mod, "xformers_kernels_loaded", lambda: kernels)


@pytest.mark.parametrize(
    "package, cuda, kernels, reason",
    [
        (False, True, True, "the xformers package"),
        (True, False, True, "a CUDA GPU"),
        (True, True, False, "xformers kernels that load beside torch"),
    ],
)
def test_refused_with_the_named_reason(monkeypatch, tiny_config, tmp_path, package, cuda, kernels, reason):
    fake_environment(monkeypatch, package=package, cuda=cuda, kernels=kernels)
    with pytest.raises(ConfigError, match=rf"attention\.ungrounded=xformers needs {reason}"):
        tiny_config(tmp_path, "attention.ungrounded=xformers")


def test_accepted_with_the_package_and_cuda(monkeypatch, tiny_config, tmp_path):
    fake_environment(monkeypatch, package=True, cuda=True)
    assert tiny_config(tmp_path, "attention.ungrounded=xformers").attention.ungrounded == "xformers"
    assert tiny_config(tmp_path).attention.ungrounded == "sdpa"  # the default needs nothing


@pytest.mark.parametrize("objective", ["tokencompose", "ldm"])
def test_xformers_goes_to_exactly_the_non_grounded_layers(monkeypatch, tiny_config, tmp_path, objective):
    """On the tiny U-Net: TokenCompose grounds the 5 mid/up attn2 layers; every other attention layer (all the
    self-attention, the down blocks' attn2) gets xformers. LDM-only grounds nothing: all layers get it."""
    from tcscale.models.architectures import build_tiny_components
    from tcscale.objectives import OBJECTIVES, BuildContext

    fake_environment(monkeypatch, package=True, cuda=True)
    cfg = tiny_config(tmp_path, f"objective.name={objective}", "attention.ungrounded=xformers")
    comps = build_tiny_components(cfg.model.tiny, cfg.data.resolution)
    spec = OBJECTIVES[objective]
    obj = spec.build(getattr(cfg.objective, objective), BuildContext(cfg, comps, torch.float32, torch.device("cpu"), 2))
    kinds = {n: type(m.processor) for n, m in comps.unet.named_modules() if isinstance(m, Attention)}
    grounded = sorted(n for n, k in kinds.items() if k is GroundingAttnProcessor)
    xformers = sorted(n for n, k in kinds.items() if k is XFormersPlainProcessor)
    assert grounded == sorted(obj.plan.layers if obj.plan else [])
    assert xformers == sorted(set(kinds) - set(grounded)) and PlainAttnProcessor not in kinds.values()
    if objective == "tokencompose":
        assert len(grounded) == 5 and len(xformers) == len(kinds) - 5
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in xformers
        assert all(n.endswith("attn1") or n.startswith("down_blocks") for n in xformers)
