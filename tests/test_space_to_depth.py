"""The exact space-to-depth autoencoder: inverse, shapes, config, and a StableDiffusionPipeline save/load/generate."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tcscale.models.space_to_depth import ExactLatentDistribution, SpaceToDepthAutoencoder
from tcscale.models.tokenizer import sd_clip_tokenizer


@pytest.mark.parametrize("factor", [2, 4])
def test_encode_decode_is_an_exact_inverse(factor):
    vae = SpaceToDepthAutoencoder(factor=factor)
    x = torch.rand(3, 3, 32, 48) * 2 - 1
    dist = vae.encode(x).latent_dist
    assert isinstance(dist, ExactLatentDistribution)
    z = dist.sample(generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 3 * factor**2, 32 // factor, 48 // factor)
    assert torch.equal(z, dist.mode())  # a point mass: sampling draws no noise
    assert torch.equal(vae.decode(z).sample, x)  # bit-exact, not just close
    assert torch.equal(vae.decode(z, return_dict=False)[0], x)
    assert torch.equal(vae(x).sample, x)
    # a latent channel is one pixel of every factor x factor block: channel c*f*f + i*f + j holds x[c, i::f, j::f]
    c, i, j = 2, factor - 1, 0
    assert torch.equal(z[:, c * factor * factor + i * factor + j], x[:, c, i::factor, j::factor])
    # decode(encode) is the identity and so is encode(decode)
    z2 = torch.randn_like(z)
    assert torch.equal(vae.encode(vae.decode(z2).sample).latent_dist.mode(), z2)


def test_config_matches_the_pipeline_conventions():
    vae = SpaceToDepthAutoencoder()
    assert vae.config.block_out_channels == [3, 12] and vae.config.latent_channels == 12
    assert vae.config.scaling_factor == 3.5 and vae.config.factor == 2
    assert SpaceToDepthAutoencoder(factor=4).config.block_out_channels == [3, 12, 48]
    assert sum(p.numel() for p in vae.parameters()) == 0 and len(vae.state_dict()) == 0
    assert vae.device == torch.device("cpu") and vae.dtype == torch.float32
    assert vae.to(torch.float64).dtype == torch.float64
    for bad in (1, 3, 6):
        with pytest.raises(ValueError, match="power of two"):
            SpaceToDepthAutoencoder(factor=bad)
    with pytest.raises(ValueError, match="block_out_channels"):
        SpaceToDepthAutoencoder(factor=2, block_out_channels=(3, 12, 48))
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match="decode input"):
        vae.decode(torch.zeros(1, 4, 16, 16))


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}  # without diffusers' private bookkeeping


def test_save_pretrained_round_trip(tmp_path):
    vae = SpaceToDepthAutoencoder(factor=4, scaling_factor=2.0)
    vae.save_pretrained(tmp_path / "vae")
    loaded = SpaceToDepthAutoencoder.from_pretrained(tmp_path / "vae")
    assert _public(loaded.config) == _public(vae.config)
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded.decode(loaded.encode(x).latent_dist.mode()).sample, x)
    assert SpaceToDepthAutoencoder.from_pretrained(tmp_path, subfolder="vae").config.factor == 4
    assert SpaceToDepthAutoencoder.from_pretrained(tmp_path / "vae", torch_dtype=torch.float16).dtype == torch.float16


def _tiny_pipeline():
    tokenizer = sd_clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=12,
        out_channels=12,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=SpaceToDepthAutoencoder(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_stable_diffusion_pipeline_saves_loads_and_generates(tmp_path):
    pipe = _tiny_pipeline()
    assert pipe.vae_scale_factor == 2
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    # diffusers records the full module path of a class from a library it does not know
    assert index["vae"] == ["tcscale.models.space_to_depth", "SpaceToDepthAutoencoder"]
    assert (tmp_path / "vae" / "config.json").is_file()

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.vae, SpaceToDepthAutoencoder) and loaded.vae_scale_factor == 2
    loaded.set_progress_bar_config(disable=True)
    out = loaded(
        "a photo of a red circle and a blue square",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    # same seed, same image: the loaded pipeline is the saved one
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a photo of a red circle and a blue square",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert torch.allclose(out, ref, atol=1e-5)
