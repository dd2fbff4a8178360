"""Model families (tcscale.families): the registry, the one reader of a pipeline's model_index.json, the layouts'
grounded layers at the released shapes, and the components each family builds."""

from __future__ import annotations

import json

import pytest
import torch

from tcscale.families import FAMILIES, family_of_pipeline, pipeline_family, select_layers
from tcscale.models.architectures import architecture, build_random_components, build_tiny_components
from tcscale.models.config import TinyModelConfig


def test_registry_holds_sd_and_sdxl():
    assert set(FAMILIES) >= {"sd", "sdxl"}
    assert FAMILIES["sd"].pipeline_class == "StableDiffusionPipeline"
    assert FAMILIES["sdxl"].pipeline_class == "StableDiffusionXLPipeline"
    assert FAMILIES["sd"].released_architecture("CompVis/stable-diffusion-v1-4") == "sd14"
    assert FAMILIES["sd"].released_architecture("stabilityai/stable-diffusion-2-1") == "sd21"
    assert FAMILIES["sdxl"].released_architecture("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert FAMILIES["sd"].released_architecture("someone/other-model") is None


@pytest.mark.parametrize(
    ("arch", "side", "expected"),
    [
        ("sd14", 64, {8: 1, 16: 3, 32: 3, 64: 3}),  # mid + up at 512 px: the 10 layers TokenCompose grounds
        ("sdxl", 128, {32: 10 + 30, 64: 6}),  # mid (10 deep) + up (3 x 10 at 32², 3 x 2 at 64²): 46 layers
    ],
)
def test_layouts_find_the_grounded_layers_of_the_released_unets(arch, side, expected):
    family = FAMILIES[architecture(arch).family]
    comps = build_random_components(arch, device="meta")
    assert comps.family == family.name
    names = select_layers(comps.unet, ["mid", "up"], None, side, family.layout)
    sides = [family.layout.latent_side(comps.unet, n, side) for n in names]
    counts = {s: sides.count(s) for s in sorted(set(sides))}
    assert counts == expected
    assert all(family.layout.place(n) in ("mid", "up") for n in names)


def test_pipeline_family_reads_model_index(tmp_path):
    tiny = TinyModelConfig()
    sd = build_tiny_components(tiny, 64, "sd")
    FAMILIES["sd"].pipeline(sd).save_pretrained(str(tmp_path / "sd"))
    assert pipeline_family(tmp_path / "sd") is FAMILIES["sd"]
    xl = build_tiny_components(tiny, 64, "sdxl")
    assert xl.family == "sdxl" and len(xl.text_towers) == 2 and len(sd.text_towers) == 1
    pipe = FAMILIES["sdxl"].pipeline(xl)
    pipe.save_pretrained(str(tmp_path / "xl"))
    assert pipeline_family(tmp_path / "xl") is FAMILIES["sdxl"] is family_of_pipeline(pipe)
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match=r"FluxPipeline.*StableDiffusionPipeline \(model.family=sd\)"):
        pipeline_family(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pipeline_family(empty) is FAMILIES["sd"]  # unreadable: the default; the loader reports what fails


def test_encode_is_the_family_s(tmp_path):
    """SD conditions on the tower's last states; SDXL on both towers' penultimate states plus micro-conditioning."""
    tiny = TinyModelConfig()
    ids = torch.full((2, 77), 49407)
    ids[:, 0] = 49406
    sd = build_tiny_components(tiny, 64, "sd")
    cond = FAMILIES["sd"].encode(sd, ids, dtype=torch.float32, device="cpu")
    assert cond.added_cond_kwargs is None and cond.text.shape == (2, 77, tiny.cross_attention_dim)
    xl = build_tiny_components(tiny, 64, "sdxl")
    with pytest.raises(ValueError, match="target image size"):
        FAMILIES["sdxl"].encode(xl, ids, dtype=torch.float32, device="cpu")
    cond = FAMILIES["sdxl"].encode(xl, ids, dtype=torch.float32, device="cpu", target_size=(64, 64))
    assert cond.text.shape == (2, 77, tiny.cross_attention_dim + tiny.text_encoder_2_hidden)
    assert set(cond.added_cond_kwargs) == {"text_embeds", "time_ids"}
