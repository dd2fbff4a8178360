"""FID: the distance against an independent eigen-decomposition, statistics caching, the extractor, caption sampling."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tcscale.eval import frechet_distance
from tcscale.eval.fid import (
    InceptionFeatureExtractor,
    cached_statistics,
    extract_features,
    feature_statistics,
    fid_score,
    frechet_distance_from_stats,
    image_folder_files,
    load_caption_sample,
    load_statistics,
    open_images,
    reference_files,
    sample_coco_captions,
    save_statistics,
)
from tests.helpers.eval_models import TinyConvFeatures


def _fid_by_eigh(a: np.ndarray, b: np.ndarray) -> float:
    """FID without sqrtm: Tr((Σa Σb)^½) = Σ √λ(Σa^½ Σb Σa^½), a symmetric PSD matrix (eigh twice)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    cb = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root_a @ cb @ root_a)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None))))


@pytest.mark.parametrize("n_a, n_b, dim", [(400, 300, 8), (200, 500, 24)])
def test_frechet_distance_matches_eigen_decomposition(n_a, n_b, dim):
    rng = np.random.default_rng(dim)
    mix_a, mix_b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    a = rng.normal(size=(n_a, dim)) @ mix_a + 0.3
    b = (rng.normal(size=(n_b, dim)) @ mix_b - 0.2).astype(np.float32)  # float32 input: statistics still float64
    expected = _fid_by_eigh(a, b.astype(np.float64))
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)


def test_identical_sets_give_zero_and_a_shift_gives_the_squared_mean_difference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    assert abs(frechet_distance(a, a)) < 1e-6
    delta = rng.normal(size=16)
    assert frechet_distance(a, a + delta) == pytest.approx(float(delta @ delta), rel=1e-6, abs=1e-6)


def test_singular_product_is_handled_with_a_diagonal_offset():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64))  # fewer samples than dimensions: singular Σ
    value = frechet_distance(a, b)
    assert np.isfinite(value)
    assert value == pytest.approx(_fid_by_eigh(a, b), rel=1e-3)


def test_statistics_are_float64_with_n_minus_1():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]], dtype=np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [2.0, 2.0])
    np.testing.assert_allclose(sigma, [[4.0, 3.0], [3.0, 3.0]])  # Σ (x - μ)(x - μ)ᵀ / (3 - 1)
    assert frechet_distance_from_stats(mu, sigma, mu + 1.0, sigma) == pytest.approx(2.0, abs=1e-9)


@pytest.mark.parametrize(
    "a, b, message",
    [
        (np.zeros((5,)), np.zeros((5, 2)), r"\(N, D\)"),
        (np.zeros((1, 3)), np.zeros((5, 3)), "at least 2 samples"),
        (np.zeros((5, 3)), np.zeros((5, 4)), "dimensions differ"),
        (np.full((5, 3), np.nan), np.zeros((5, 3)), "NaN"),
    ],
)
def test_bad_features_raise(a, b, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(a, b)


def test_statistics_cache_roundtrip_without_pickle(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(50, 6))
    calls = []

    def compute():
        calls.append(1)
        return feats

    path = tmp_path / "stats" / "coco10k.npz"
    mu, sigma = cached_statistics(path, compute, meta={"extractor": "tiny", "n": 50})
    mu2, sigma2 = cached_statistics(path, compute, meta={"extractor": "tiny", "n": 50})
    assert calls == [1]  # second call read the cache
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert [p.name for p in path.parent.iterdir()] == ["coco10k.npz"]
    assert load_statistics(path)[2] == {"extractor": "tiny", "n": 50}
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        assert set(data.files) == {"mu", "sigma", "meta"}
    with pytest.raises(ValueError, match="were made with"):
        cached_statistics(path, compute, meta={"extractor": "other", "n": 50})
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "obj.npz").write_bytes((tmp_path / "obj.npy").read_bytes())
    with pytest.raises(ValueError, match="not a tcscale FID statistics file"):
        load_statistics(tmp_path / "obj.npz")  # an object array: refused, never unpickled
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "plain.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_statistics(tmp_path / "plain.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a tcscale FID statistics file"):
        load_statistics(tmp_path / "other.npz")
    save_statistics(tmp_path / "s.npz", mu, sigma)
    with pytest.raises(ValueError, match="mu"):
        save_statistics(tmp_path / "s.npz", mu, sigma[:2])


def test_inception_extractor_with_an_injected_network():
    net = TinyConvFeatures()
    extractor = InceptionFeatureExtractor(model=net, batch_size=3)
    rng = np.random.default_rng(4)
    batch = rng.integers(0, 256, size=(5, 40, 56, 3), dtype=np.uint8)
    feats = extractor(batch)
    assert feats.shape == (5, 16) and feats.dtype == np.float64
    # same as clean-fid's resizer (PIL bicubic per float channel to 299x299, no re-quantisation) + the network
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    x = torch.from_numpy(np.stack([resize(im) for im in batch]).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(feats, net(x).double().numpy(), rtol=1e-5, atol=1e-6)
    pil = [Image.fromarray(im) for im in batch]
    np.testing.assert_allclose(extract_features(pil, extractor, batch_size=2), feats, rtol=1e-6)


def test_fid_score_from_image_folders_with_a_cached_real_side(tmp_path):
    extractor = InceptionFeatureExtractor(model=TinyConvFeatures(), batch_size=4)
    rng = np.random.default_rng(5)
    for name, shift in (("real", 0), ("fake", 60)):
        (tmp_path / name).mkdir()
        for i in range(6):
            im = np.clip(rng.integers(0, 196, size=(24, 24, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(im).save(tmp_path / name / f"{i:03d}.png")
    real_files, fake_files = image_folder_files(tmp_path / "real"), image_folder_files(tmp_path / "fake")
    expected = frechet_distance(
        extract_features(open_images(fake_files), extractor), extract_features(open_images(real_files), extractor)
    )
    cache = tmp_path / "real_stats.npz"
    value = fid_score(open_images(fake_files), lambda: open_images(real_files), extractor, real_cache=cache)
    assert value == pytest.approx(expected, rel=1e-9) and cache.is_file()
    unused = lambda: pytest.fail("the cached real statistics were not used")  # noqa: E731
    assert fid_score(open_images(fake_files), unused, extractor, real_cache=cache) == pytest.approx(expected, rel=1e-9)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png"):
        image_folder_files(tmp_path / "empty")


def test_inception_extractor_without_weights_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"inception-2015-12-05\.pt"):
        InceptionFeatureExtractor(tmp_path / "no_weights")


def _fake_captions(path, n_images=30, per_image=5):
    images = [{"id": 1000 + 7 * i, "file_name": f"{1000 + 7 * i:012d}.jpg"} for i in range(n_images)]
    anns = [
        {"id": 10 * i + k, "image_id": im["id"], "caption": f" image {im['id']}  caption {k} "}
        for i, im in enumerate(images)
        for k in range(per_image)
    ]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return images


def test_sample_coco_captions(tmp_path):
    src = tmp_path / "captions_val2017.json"
    images = _fake_captions(src)
    out = tmp_path / "sample" / "coco10k_seed7.json"
    sample = sample_coco_captions(src, n=12, seed=7, out_path=out)
    assert len(sample) == 12 and len({s["image_id"] for s in sample}) == 12  # fewer pairs than images: one each
    by_id = {im["id"]: im["file_name"] for im in images}
    for s in sample:
        assert set(s) == {"image_id", "file_name", "caption"}
        assert s["file_name"] == by_id[s["image_id"]]
        assert s["caption"].startswith(f"image {s['image_id']} caption ")  # its own caption, whitespace normalised
    assert sample_coco_captions(src, n=12, seed=7) == sample  # the seed fixes the sample
    assert sample_coco_captions(src, n=12, seed=8) != sample
    assert load_caption_sample(out) == sample
    assert json.loads(out.read_text())["seed"] == 7 and json.loads(out.read_text())["images"] == 12
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert len(sample_coco_captions(src, n=30, seed=0)) == 30
    more = sample_coco_captions(src, n=31, seed=0)  # more pairs than images: one image gives a second caption
    assert len({(s["image_id"], s["caption"]) for s in more}) == 31 and len({s["image_id"] for s in more}) == 30
    assert more[:30] == sample_coco_captions(src, n=30, seed=0)  # a smaller sample is a prefix of a larger one
    assert len(sample_coco_captions(src, n=150, seed=0)) == 150  # every pair of the file
    with pytest.raises(ValueError, match="151 image-caption pairs but only 150 exist"):
        sample_coco_captions(src, n=151, seed=0)
    src.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'images' and 'annotations'"):
        sample_coco_captions(src, n=1, seed=0)


def _coco_shaped(path, n_images, seed):
    """A captions file shaped like COCO's: ids not contiguous, 5-7 captions per image, one repeated caption text."""
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(600_000, size=n_images, replace=False).tolist())
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
    anns, k = [], 0
    for i in ids:
        for j in range(int(rng.integers(5, 8))):
            anns.append({"id": 900_000 - k, "image_id": i, "caption": f"A photo {i} number {j}."})
            k += 1
    anns.append({"id": 1, "image_id": ids[0], "caption": "A photo  " + f"{ids[0]} number 0."})  # same text again
    rng.shuffle(anns)
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return len(anns) - 1


def test_ten_thousand_distinct_pairs_from_a_val2017_shaped_file(tmp_path):
    src = tmp_path / "captions_val2017.json"
    captions = _coco_shaped(src, 5000, seed=0)
    assert 25000 <= captions <= 35000
    sample = sample_coco_captions(src, n=10000, seed=0)
    assert len(sample) == 10000 and len({(s["image_id"], s["caption"]) for s in sample}) == 10000
    per_image = Counter(s["image_id"] for s in sample)
    assert len(per_image) == 5000 and set(per_image.values()) == {2}  # every val2017 image in exactly two pairs
    assert reference_files(sample) == list(dict.fromkeys(s["file_name"] for s in sample))
    assert len(reference_files(sample, "images")) == 5000 and len(reference_files(sample, "pairs")) == 10000
    again = tmp_path / "copy.json"
    again.write_bytes(src.read_bytes())
    assert sample_coco_captions(again, n=10000, seed=0) == sample  # a function of the file's content, n and seed


def test_a_val2014_shaped_file_gives_pairs_of_distinct_images(tmp_path):
    src = tmp_path / "captions_val2014.json"
    _coco_shaped(src, 12000, seed=1)
    sample = sample_coco_captions(src, n=10000, seed=3)
    assert len({s["image_id"] for s in sample}) == 10000  # more images than pairs: no image twice


def test_frechet_distance_is_clean_fids_on_the_same_statistics():
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(300, 12)), rng.normal(size=(250, 12)) * 1.3 + 0.1
    (mu_a, sig_a), (mu_b, sig_b) = feature_statistics(a), feature_statistics(b)
    assert frechet_distance(a, b) == float(cleanfid_frechet_distance(mu_a, sig_a, mu_b, sig_b))
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance_from_stats(mu_a, sig_a, mu_b, np.full_like(sig_b, np.nan))


def test_flickr30k_entities_import(tmp_path):
    from tcscale.eval.flickr30k import flickr30k_captions, strip_entities, write_flickr30k_captions

    assert strip_entities("[/EN#18/people A child] in [/EN#19/clothing/other a pink  dress] runs .") == (
        "A child in a pink dress runs ."
    )
    root = tmp_path / "flickr30k_entities"
    (root / "annotations" / "Sentences").mkdir(parents=True)
    ids = ["1000092795", "10002456", "1000268201"]
    (root / "val.txt").write_text("\n".join(ids[:2]) + "\n")
    (root / "test.txt").write_text(ids[2] + "\n")
    for i in ids:
        lines = [f"[/EN#{k}/people Person {k}] of image {i} [/EN#0/notvisual stands] ." for k in range(1, 6)]
        (root / "annotations" / "Sentences" / f"{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "UNRELATED_CAPTIONS").write_text("# format: <imageID> <sentence number>\n10002456 5\n")
    data = flickr30k_captions(root, "val")
    assert [im["file_name"] for im in data["images"]] == ["1000092795.jpg", "10002456.jpg"]
    caps = [a["caption"] for a in data["annotations"]]
    assert len(caps) == 9 and "Person 5 of image 10002456 stands ." not in caps  # the unrelated caption dropped
    assert caps[0] == "Person 1 of image 1000092795 stands ."
    out = write_flickr30k_captions(root, "val", tmp_path / "f.json")
    sample = sample_coco_captions(out, n=4, seed=0)
    assert len(sample) == 4 and Counter(s["image_id"] for s in sample) == {1000092795: 2, 10002456: 2}
    with pytest.raises(FileNotFoundError, match="train.txt"):
        flickr30k_captions(root, "train")
    (root / "val.txt").write_text("123\n")
    with pytest.raises(FileNotFoundError, match="Sentences/123.txt"):
        flickr30k_captions(root, "val")
