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


def test_text_token_embedding_std_rescales_only_the_token_embeddings_and_separates_words():
    """model.tiny.text_token_embedding_std: the same seeded draw at another scale, nothing else changed; at std 1 the
    frozen random encoder's states for "red" and "blue" at their own position differ, at CLIP's 0.02 they barely do."""
    import torch

    from tcscale.config import ConfigError, load_config
    from tcscale.models.architectures import tiny_text_encoder
    from tcscale.models.config import TinyModelConfig
    from tcscale.models.tokenizer import sd_clip_tokenizer

    tok = sd_clip_tokenizer()
    ids = torch.tensor(tok(["a photo of a red circle", "a photo of a blue circle"], padding="max_length",
                           max_length=77).input_ids)  # fmt: skip
    colour = 5  # <bos> a photo of a [colour]
    cosines = {}
    for std in (None, 1.0):
        torch.manual_seed(0)
        encoder = tiny_text_encoder(TinyModelConfig(cross_attention_dim=64, text_token_embedding_std=std), len(tok))
        states = encoder(ids)[0].detach()
        cosines[std] = torch.nn.functional.cosine_similarity(states[0, colour], states[1, colour], dim=0).item()
        weights = dict(encoder.state_dict())
        if std is None:
            default = weights
    emb = "text_model.embeddings.token_embedding.weight"
    torch.testing.assert_close(weights[emb], default[emb] * 50.0)  # CLIP's draw is N(0, 0.02²)
    assert all(torch.equal(weights[k], default[k]) for k in default if k != emb)
    assert cosines[None] > 0.9 and cosines[1.0] < 0.5, cosines
    with pytest.raises(ConfigError, match=r"model\.tiny\.text_token_embedding_std must be > 0"):
        load_config("configs/tiny_cpu.yaml", ["model.tiny.text_token_embedding_std=0"])
