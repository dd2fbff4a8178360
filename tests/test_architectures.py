"""The random-weight SD architectures match the released models, and the kernel benchmark's layer shapes are
those of the real grounded layers (built on the meta device: shapes only, no memory, a few seconds)."""

from __future__ import annotations

import bench_grounded_attention as bench
import pytest

from tcscale.families.layout import UNET_LAYOUT, select_layers
from tcscale.models.architectures import architecture, build_random_components

# parameter counts of the released checkpoints (diffusers layout): U-Net, VAE, text encoder
PUBLISHED = {
    "sd14": (859_520_964, 83_653_863, 123_060_480),  # SD1.x U-Net; KL-f8 VAE; CLIP ViT-L/14 text tower
    "sd21": (865_910_724, 83_653_863, 340_387_840),  # SD2.x U-Net; same VAE; OpenCLIP ViT-H/14 text, 23 layers
}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", params=["sd14", "sd21"])
def meta_components(request):
    return request.param, build_random_components(request.param, device="meta")


def test_parameter_counts_match_released_models(meta_components):
    name, comps = meta_components
    assert (_count(comps.unet), _count(comps.vae), _count(comps.text_encoder)) == PUBLISHED[name]
    assert comps.unet.device.type == "meta"
    assert comps.prediction_type == ("v_prediction" if name == "sd21" else "epsilon")


def test_benchmark_shapes_are_the_grounded_layers(meta_components):
    """bench_grounded_attention's (H, Lq, d) list = the mid+up attn2 layers of the architecture at its resolution."""
    name, comps = meta_components
    unet = comps.unet
    side = architecture(name).resolution // 8
    seen = set()
    for layer in select_layers(unet, ["mid", "up"], None, side):
        attn = unet.get_submodule(layer)
        lq = UNET_LAYOUT.latent_side(unet, layer, side) ** 2
        seen.add((attn.heads, lq, attn.to_q.out_features // attn.heads, attn.to_k.in_features))
    shapes = {"sd14": bench.SD14_512, "sd21": bench.SD21_768}[name]
    cross_dim = architecture(name).cross_attention_dim
    assert seen == {(s.heads, s.lq, s.head_dim, cross_dim) for s in shapes}


def test_unknown_architecture_named():
    with pytest.raises(ValueError, match="sd15x"):
        build_random_components("sd15x", device="meta")
