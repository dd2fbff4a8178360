"""Fréchet Inception Distance: statistics, the distance, cached real statistics, image-caption pair sampling.

FID(a, b) = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½), with μ, Σ the mean and the unbiased
(N − 1) covariance of the (N, D) features, all in float64. The distance itself is clean-fid's
``cleanfid.fid.frechet_distance`` (``scipy.linalg.sqrtm``; a product with no finite square root, e.g.
fewer samples than dimensions, is retried with ε·I added to both covariances; the imaginary part
round-off leaves is dropped); tcscale only checks what goes in (shapes, NaN) and what comes out.

Feature extractor: **clean-fid** (``clean-fid==0.1.35``), mode "clean". Why clean-fid rather than
torch-fidelity: docs/DESIGN.md §8 asks for clean resizing, and that is clean-fid's own contribution (Parmar
et al., CVPR 2022): each channel is resized to 299×299 as a float image with PIL's antialiased
bicubic filter and is not re-quantised, so the score does not depend on the resizing library.
torch-fidelity resizes inside the network with a re-implementation of TensorFlow 1's bilinear
resize (no antialiasing) to match the legacy TF FID; both use the same TF-Inception-2015 weights
(clean-fid loads NVIDIA's TorchScript export, ``inception-2015-12-05.pt``). The weights are
downloaded on first use, which cannot happen on the development machines, so
``InceptionFeatureExtractor`` looks for them in a local directory (``weights_dir``) and downloads
only with ``allow_download=True``; every function that needs features takes any extractor, a
callable mapping a uint8 (N, H, W, 3) batch or a list of PIL images to (N, D) float features.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

FeatureExtractor = Callable[[np.ndarray | Sequence[Image.Image]], np.ndarray]
"""Maps a uint8 (N, H, W, 3) batch or a list of N PIL images to (N, D) float features."""

INCEPTION_WEIGHTS = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


# --------------------------------------------------------------------------- statistics and distance


def _features_2d(features: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) feature matrix, got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ (D,), Σ (D, D)) of (N, D) features in float64; Σ is the unbiased covariance (divides by N − 1)."""
    arr = _features_2d(features, "features")
    return arr.mean(axis=0), np.cov(arr, rowvar=False, ddof=1).reshape(arr.shape[1], arr.shape[1])


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """FID between two Gaussians given by their means (D,) and covariances (D, D), in float64.

    The distance is ``cleanfid.fid.frechet_distance`` (the library the features come from); this wrapper checks
    the inputs first (shapes, finiteness: clean-fid only asserts equal shapes) and the result after. ``eps`` is
    clean-fid's diagonal offset when (Σ1 Σ2)^½ is not finite (default 1e-6).
    """
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,):
        raise ValueError(f"means must both be (D,) vectors, got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must both be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    value = float(cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps))
    if not np.isfinite(value):
        raise ValueError(f"the Fréchet distance is {value}: the covariances are not valid")
    return value


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID of two (N, D) feature sets (sizes may differ, D must match); statistics in float64."""
    a, b = _features_2d(features_a, "features_a"), _features_2d(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(*feature_statistics(a), *feature_statistics(b))


# --------------------------------------------------------------------------- cached statistics


def _atomic_tmp(path: Path, suffix: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return tmp


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, *, meta: dict | None = None) -> Path:
    """Write (μ, Σ) and optional JSON-able ``meta`` to an .npz (temporary name, then rename). Returns the path."""
    out = Path(path)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"statistics must be mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    tmp = _atomic_tmp(out, ".npz")
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta or {}, sort_keys=True)))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """(μ, Σ, meta) from ``save_statistics`` output; never unpickles (``allow_pickle=False``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a tcscale FID statistics file ({err})") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a tcscale FID statistics file (a single array, not an .npz archive)")
    try:
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: not a tcscale FID statistics file ({err})") from err
    finally:
        data.close()
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: statistics have shapes {mu.shape} and {sigma.shape}, expected (D,) and (D, D)")
    return mu, sigma, meta


def cached_statistics(
    path: str | os.PathLike, compute_features: Callable[[], np.ndarray], *, meta: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) from the cache at ``path``, or from ``compute_features()`` (then cached with ``meta``).

    When the cache exists and ``meta`` is given, the stored meta must match (e.g. the extractor, the
    image count, the caption-sample seed); a mismatch raises ValueError instead of mixing statistics.
    """
    path = Path(path)
    if path.is_file():
        mu, sigma, stored = load_statistics(path)
        if meta is not None and json.loads(json.dumps(meta, sort_keys=True)) != stored:
            raise ValueError(f"{path}: cached statistics were made with {stored}, not {meta}; delete it to recompute")
        return mu, sigma
    mu, sigma = feature_statistics(compute_features())
    save_statistics(path, mu, sigma, meta=meta)
    return mu, sigma


# --------------------------------------------------------------------------- features


def _as_uint8_batch(images: np.ndarray | Sequence[Image.Image] | Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 (N, H, W, 3) array or a list of PIL images / HWC arrays -> list of uint8 (H, W, 3) arrays."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"an image batch must be uint8 (N, H, W, 3), got shape {images.shape}")
        return [np.asarray(im, dtype=np.uint8) for im in images]
    out = []
    for i, im in enumerate(images):
        arr = np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"image {i} must be RGB (H, W, 3), got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"image {i} must be uint8, got {arr.dtype}")
        out.append(arr)
    return out


class InceptionFeatureExtractor:
    """Inception-V3 pool features (2048-D) through clean-fid's "clean" mode.

    Images are resized to 299×299 per channel as float images with PIL's bicubic filter
    (``cleanfid.resize.build_resizer("clean")``), then fed in [0, 255] to clean-fid's TorchScript
    Inception (``InceptionV3W``, which normalises inside). Callable on a uint8 (N, H, W, 3) batch or a
    list of PIL images; returns float64 (N, 2048).

    Args:
        weights_dir: directory holding ``inception-2015-12-05.pt`` (default ``$TCSCALE_FID_WEIGHTS``
            or ``~/.cache/tcscale/fid``).
        device: torch device for the network (default "cpu").
        batch_size: images per forward pass (default 32).
        allow_download: fetch the weights from NVIDIA's CDN when missing (default False: no network
            on the development machines); otherwise a missing file raises FileNotFoundError.
        model: use this module instead of loading the weights (tests: a tiny local network taking a
            float (N, 3, 299, 299) batch in [0, 255] and returning (N, D)).
    """

    def __init__(
        self,
        weights_dir: str | os.PathLike | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        allow_download: bool = False,
        model: object | None = None,
    ):
        import torch
        from cleanfid.resize import build_resizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.resize = build_resizer("clean")
        if model is None:
            from cleanfid.inception_torchscript import InceptionV3W

            wdir = Path(weights_dir or os.environ.get("TCSCALE_FID_WEIGHTS", Path.home() / ".cache/tcscale/fid"))
            if not (wdir / INCEPTION_WEIGHTS).is_file() and not allow_download:
                raise FileNotFoundError(
                    f"Inception weights not found: {wdir / INCEPTION_WEIGHTS} (download {INCEPTION_URL} there, "
                    "or pass allow_download=True on a machine with network access)"
                )
            wdir.mkdir(parents=True, exist_ok=True)
            model = InceptionV3W(str(wdir), download=allow_download, resize_inside=False)
        self.model = model.to(self.device).eval()

    def __call__(self, images: np.ndarray | Sequence[Image.Image]) -> np.ndarray:
        import torch

        arrays = _as_uint8_batch(images)
        feats = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = np.stack([self.resize(im) for im in arrays[start : start + self.batch_size]])  # (n, 299, 299, 3)
            batch = torch.from_numpy(chunk.transpose(0, 3, 1, 2).astype(np.float32)).to(self.device)
            with torch.no_grad():
                feats.append(self.model(batch).reshape(len(chunk), -1).double().cpu().numpy())
        if not feats:
            raise ValueError("no images to extract features from")
        return np.concatenate(feats)


def extract_features(
    images: Iterable[Image.Image | np.ndarray], extractor: FeatureExtractor, *, batch_size: int = 64
) -> np.ndarray:
    """(N, D) float64 features of a stream of images (PIL or uint8 HWC), ``batch_size`` images per call."""
    feats, batch = [], []
    for im in images:
        batch.append(im)
        if len(batch) == batch_size:
            feats.append(np.asarray(extractor(batch), dtype=np.float64))
            batch = []
    if batch:
        feats.append(np.asarray(extractor(batch), dtype=np.float64))
    if not feats:
        raise ValueError("no images to extract features from")
    out = np.concatenate(feats)
    if out.ndim != 2:
        raise ValueError(f"the extractor returned features of shape {out.shape}, expected (N, D)")
    return out


def fid_score(
    generated: Iterable[Image.Image | np.ndarray],
    real: Iterable[Image.Image | np.ndarray] | Callable[[], Iterable[Image.Image | np.ndarray]],
    extractor: FeatureExtractor,
    *,
    real_cache: str | os.PathLike | None = None,
    meta: dict | None = None,
    batch_size: int = 64,
) -> float:
    """FID of generated images against real ones, the real statistics cached at ``real_cache`` if given.

    ``real`` may be a zero-argument callable returning the images, so they are only read when the cache
    is missing; ``meta`` (e.g. extractor name, caption-sample seed, image count) guards the cache.
    """
    mu_g, sigma_g = feature_statistics(extract_features(generated, extractor, batch_size=batch_size))

    def real_features() -> np.ndarray:
        return extract_features(real() if callable(real) else real, extractor, batch_size=batch_size)

    if real_cache is None:
        mu_r, sigma_r = feature_statistics(real_features())
    else:
        mu_r, sigma_r = cached_statistics(real_cache, real_features, meta=meta)
    return frechet_distance_from_stats(mu_g, sigma_g, mu_r, sigma_r)


def image_folder_files(folder: str | os.PathLike, exts: Sequence[str] = (".png", ".jpg", ".jpeg")) -> list[Path]:
    """Sorted image files of a folder (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in exts)
    if not files:
        raise ValueError(f"no {'/'.join(exts)} images in {folder}")
    return files


def open_images(paths: Iterable[str | os.PathLike]) -> Iterable[Image.Image]:
    """Open images lazily as RGB (one file open at a time)."""
    for p in paths:
        with Image.open(p) as im:
            yield im.convert("RGB")


# --------------------------------------------------------------------------- image-caption pairs


def read_captions_file(captions_json: str | os.PathLike) -> tuple[dict[int, str], dict[int, list[tuple[int, str]]]]:
    """({image id: file name}, {image id: [(annotation id, caption)]}) of a COCO-captions-shaped file (COCO val2014 /
    val2017, or what ``tcscale.eval.flickr30k`` writes); captions whitespace-normalised, an image's repeated
    caption text kept once."""
    path = Path(captions_json)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise ValueError(f"{path}: expected a COCO captions file with 'images' and 'annotations' lists")
    files: dict[int, str] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise ValueError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        files[int(im["id"])] = str(im["file_name"])
    captions: dict[int, dict[str, int]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{path}: annotations[{i}] needs 'image_id' and 'caption'")
        image_id = int(ann["image_id"])
        if image_id not in files:
            raise ValueError(f"{path}: annotations[{i}] names image {image_id}, which 'images' lacks")
        text = " ".join(str(ann["caption"]).split())
        if text:
            seen = captions.setdefault(image_id, {})
            seen[text] = min(seen.get(text, int(ann.get("id", i))), int(ann.get("id", i)))
    return files, {k: sorted((a, t) for t, a in v.items()) for k, v in captions.items()}


def sample_coco_captions(
    captions_json: str | os.PathLike, n: int = 10000, seed: int = 0, *, out_path: str | os.PathLike | None = None
) -> list[dict]:
    """``n`` distinct image-caption pairs from a COCO captions file (val2014 or val2017 shaped).

    Spread over the images as evenly as the captions allow: every image gives one pair before any gives a second,
    and so on (val2014, 40,504 images: 10,000 pairs of 10,000 different images; val2017, 5,000 images with 5-7
    captions each: each image in exactly two of 10,000 pairs). Which images come first and which of an image's
    captions are used are drawn with ``numpy.random.default_rng(seed)`` over images sorted by id and captions sorted
    by annotation id, so the sample is a function of (file, n, seed), and a smaller n is a prefix of a larger one.
    Returns ``[{"image_id", "file_name", "caption"}]`` (no two equal). With ``out_path`` the pairs are also written
    as JSON ``{"source", "seed", "n", "images", "captions": [...]}`` (temporary name, then rename) for reuse.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    path = Path(captions_json)
    files, captions = read_captions_file(path)
    ids = sorted(captions)
    total = sum(len(c) for c in captions.values())
    if n > total:
        raise ValueError(f"{path}: asked for {n} image-caption pairs but only {total} exist ({len(ids)} images)")
    rng = np.random.default_rng(seed)
    image_rank = {ids[k]: r for r, k in enumerate(rng.permutation(len(ids)).tolist())}  # which image goes first
    ranked = []  # (caption round j, image rank, image id, caption): round j holds every image's j-th drawn caption
    for image_id in ids:
        caps = captions[image_id]
        for j, k in enumerate(rng.permutation(len(caps)).tolist()):
            ranked.append((j, image_rank[image_id], image_id, caps[k][1]))
    ranked.sort()
    sample = [{"image_id": i, "file_name": files[i], "caption": c} for _, _, i, c in ranked[:n]]
    if out_path is not None:
        record = {
            "source": path.name, "seed": seed, "n": n, "images": len({s["image_id"] for s in sample}),
            "captions": sample,
        }  # fmt: skip
        out = Path(out_path)
        tmp = _atomic_tmp(out, ".json")
        try:
            Path(tmp).write_text(json.dumps(record, indent=1), encoding="utf-8")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return sample


def reference_files(pairs: Sequence[dict], reference: str = "images") -> list[str]:
    """The real side of FID for sampled pairs: ``"images"`` each distinct image once (first-appearance order),
    ``"pairs"`` one image per pair (an image in two pairs counts twice). docs/FIDELITY.md says why "images"."""
    if reference == "pairs":
        return [p["file_name"] for p in pairs]
    if reference != "images":
        raise ValueError(f"reference must be 'images' or 'pairs', got {reference!r}")
    return list(dict.fromkeys(p["file_name"] for p in pairs))


def load_caption_sample(path: str | os.PathLike) -> list[dict]:
    """The ``captions`` list (the pairs) of a ``sample_coco_captions(..., out_path=...)`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption sample not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    caps = data.get("captions") if isinstance(data, dict) else None
    if not isinstance(caps, list) or not all(
        isinstance(c, dict) and {"image_id", "file_name", "caption"} <= set(c) for c in caps
    ):
        raise ValueError(f"{path}: expected {{'captions': [{{'image_id', 'file_name', 'caption'}}, ...]}}")
    return caps


__all__ = [
    "FeatureExtractor",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "save_statistics",
    "load_statistics",
    "cached_statistics",
    "InceptionFeatureExtractor",
    "extract_features",
    "fid_score",
    "image_folder_files",
    "open_images",
    "read_captions_file",
    "sample_coco_captions",
    "reference_files",
    "load_caption_sample",
]
