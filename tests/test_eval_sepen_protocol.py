"""SepEn protocol: the success rule on hand-made detections, BLIP captions and CLIP text similarity on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tcscale.eval.sepen_protocol import (
    BlipCaptioner,
    ClipTextEmbedder,
    sepen_scores,
    sepen_success,
    sepen_success_rate,
    success_threshold,
    text_text_similarity,
)
from tests.helpers.eval_models import build_tiny_blip, build_tiny_clip


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sepen")
    return {"blip": build_tiny_blip(root / "blip"), "clip": build_tiny_clip(root / "clip")}


def test_success_needs_every_object_above_the_setting_threshold():
    objs = ["cat", "dog"]
    assert success_threshold("individual") == 0.7 and success_threshold("large_scale") == 0.3
    assert sepen_success(objs, ["cat", "dog"], [0.71, 0.9], threshold=0.7)
    assert not sepen_success(objs, ["cat", "dog"], [0.7, 0.9], threshold=0.7)  # strictly above
    assert not sepen_success(objs, ["cat", "cat"], [0.9, 0.9], threshold=0.7)  # the dog is missing
    assert sepen_success(objs, ["cat", "dog", "cow"], [0.5, 0.4, 0.1], threshold=0.3)
    records = [
        {"objects": objs, "labels": ["cat", "dog"], "scores": [0.8, 0.75]},  # both settings
        {"objects": objs, "labels": ["cat", "dog"], "scores": [0.8, 0.5]},  # large-scale only
        {"objects": objs, "labels": ["dog"], "scores": [0.99]},  # neither
        {"objects": objs, "labels": [], "scores": []},  # neither
    ]
    assert sepen_success_rate(records) == pytest.approx(25.0)
    assert sepen_success_rate(records, setting="large_scale") == pytest.approx(50.0)
    assert sepen_success_rate(records, threshold=0.1) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="record 1 has no 'scores'"):
        sepen_success_rate([records[0], {"objects": objs, "labels": []}])
    with pytest.raises(ValueError, match="setting must be one of"):
        sepen_success_rate(records, setting="pairs")


def test_text_similarity_is_the_cosine_of_embeddings():
    table = {"a": [1.0, 0.0], "b": [0.0, 2.0], "c": [3.0, 3.0]}

    def embed(texts):
        return np.array([table[t] for t in texts])

    np.testing.assert_allclose(text_text_similarity(["a", "a", "c"], ["a", "b", "b"], embed), [1.0, 0.0, 2**-0.5])
    # templated prompts: the mean of the normalised template embeddings, normalised
    table.update({"x a": [1.0, 0.0], "y a": [0.0, 5.0]})
    sims = text_text_similarity(["c"], ["a"], embed, prompt_templates=["x {}", "y {}"])
    np.testing.assert_allclose(sims, [1.0])  # (1, 1)/√2 against c = (1, 1)/√2


def test_blip_captioner_and_clip_embedder_from_local_dirs(model_dirs):
    captioner = BlipCaptioner.from_pretrained(model_dirs["blip"], max_new_tokens=6, batch_size=2)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(3)]
    captions = captioner(images)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captioner(images[:1]) == captions[:1]  # greedy decoding: deterministic, batch-independent
    vocab = set((model_dirs["blip"] / "vocab.txt").read_text().split())
    assert all(set(c.split()) <= vocab - {"[DEC]", "[SEP]", "[PAD]", "[CLS]"} for c in captions)

    embedder = ClipTextEmbedder.from_pretrained(model_dirs["clip"], batch_size=2)
    texts = ["a photo of a cat and a dog", "a dog", "two red cats sitting on a table"]
    emb = embedder(texts)
    assert emb.shape == (3, 24) and emb.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0)
    # the same as CLIPModel.get_text_features on each text alone, normalised
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(model_dirs["clip"]).eval()
    tok = CLIPTokenizer.from_pretrained(model_dirs["clip"])
    for text, row in zip(texts, emb):
        with torch.no_grad():
            ref = model.get_text_features(**tok([text], return_tensors="pt"))[0].double().numpy()
        np.testing.assert_allclose(row, ref / np.linalg.norm(ref), atol=1e-5)

    records = [
        {
            "prompt": "a cat and a dog",
            "objects": ["cat", "dog"],
            "labels": ["cat", "dog"],
            "scores": [0.9, 0.8],
            "image": images[0],
        },
        {
            "prompt": "a cat and a dog",
            "objects": ["cat", "dog"],
            "labels": ["cat"],
            "scores": [0.9],
            "caption": "a cat and a dog",
        },
    ]
    out = sepen_scores(records, captioner=captioner, embedder=embedder)
    assert out["success_rate"] == pytest.approx(50.0) and out["images"] == 2
    sims = text_text_similarity([captions[0], "a cat and a dog"], ["a cat and a dog"] * 2, embedder)
    assert out["text_similarity"] == pytest.approx(sims.mean())
    assert sims[1] == pytest.approx(1.0)  # a caption equal to its prompt
    assert set(sepen_scores(records)) == {"success_rate", "images"}  # no embedder: no similarity
    with pytest.raises(ValueError, match="no captioner"):
        sepen_scores(records, embedder=embedder)


def test_missing_model_dir_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        BlipCaptioner.from_pretrained(tmp_path / "blip")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "clip")):
        ClipTextEmbedder.from_pretrained(tmp_path / "clip")
