"""One transform for image and masks: an off-centre object in a non-square image lands where expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataprep.record import GroundedRecord
from dataprep.writer import write_shards
from tcscale.attention.masks import masks_to_layer
from tcscale.data import DataConfig, build_train_loader
from tcscale.data.transforms import crop_params, transform_image_and_masks
from tcscale.models.tokenizer import sd_clip_tokenizer

H, W, R = 120, 200, 60
# object rows 20..50, cols 120..150 of the 120 x 200 image; center crop keeps cols 40..160 (shorter side 120),
# so the object is at cols 80..110 of the crop; resizing 120 -> 60 halves it: rows 10..25, cols 40..55
OBJ = (20, 50, 120, 150)
EXPECTED = (10, 25, 40, 55)
RED = (230, 20, 20)


def _scene() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((H, W, 3), 128, dtype=np.uint8)
    mask = np.zeros((H, W), dtype=np.uint8)
    t, b, left, r = OBJ
    mask[t:b, left:r] = 1
    image[mask > 0] = RED
    return image, mask


def _box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = mask.nonzero(as_tuple=True)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def test_center_crop_moves_mask_with_image():
    image, mask = _scene()
    params = crop_params(H, W, center_crop=True)
    assert (params.top, params.left, params.size) == (0, 40, 120)
    pixels, masks = transform_image_and_masks(image, mask[None], R, params)
    assert pixels.shape == (3, R, R) and masks.shape == (1, R, R)
    expected = torch.zeros(R, R)
    t, b, left, r = EXPECTED
    expected[t:b, left:r] = 1
    assert torch.equal(masks[0], expected)
    red = ((pixels + 1) * 127.5)[0] > 200
    assert torch.equal(red, expected.bool())


@pytest.mark.parametrize("seed", range(6))
def test_random_crop_and_flip_keep_image_and_mask_together(seed):
    image, mask = _scene()
    rng = np.random.default_rng(seed)
    params = crop_params(H, W, center_crop=False, random_flip=True, rng=rng)
    pixels, masks = transform_image_and_masks(image, mask[None], R, params)
    red = ((pixels + 1) * 127.5)[0] > 175  # the object's pixels in the transformed image
    assert torch.equal(red, masks[0].bool()), params
    # geometry: object columns in the crop, halved, mirrored when flipped
    t, b, left, r = OBJ
    left, r = max(left - params.left, 0), min(r - params.left, params.size)
    if r > left:
        lo, hi = left // 2, (r + 1) // 2
        if params.flip:
            lo, hi = R - hi, R - lo
        assert _box(masks[0]) == (t // 2, b // 2, lo, hi), params


def test_off_centre_object_through_shards_and_every_layer_resolution(tmp_path):
    image, mask = _scene()
    rec = GroundedRecord(
        key="offcentre",
        image=image,
        caption="a red box on grey",
        phrases=["red box"],
        masks=[mask],
        source={"dataset": "test"},
        provenance={},
    )
    write_shards([rec], lambda items: list(items), tmp_path, prefix="g", samples_per_shard=1, progress=False)
    cfg = DataConfig(source="webdataset", shards=str(tmp_path / "g-000000.tar"), resolution=R, shuffle_buffer=1)
    sizes = [(15, 15), (8, 8), (4, 4)]
    loader = build_train_loader(
        cfg, sd_clip_tokenizer(), rank=0, world_size=1, micro_batch_size=1, seed=0, layer_sizes=sizes, full_masks=True
    )
    batch = next(iter(loader))
    full = batch["phrase_masks"][0, 0]
    assert _box(full) == EXPECTED  # JPEG round trip of the image does not touch the mask
    t, b, left, r = EXPECTED
    for h, w in sizes:
        lm = batch["layer_masks"][(h, w)][0, 0].reshape(h, w)
        assert torch.equal(lm, masks_to_layer(full, (h, w)).reshape(h, w))
        # the object's centre lands in the same relative place at every resolution
        rows, cols = lm.nonzero(as_tuple=True)
        cy, cx = (rows.float().mean() + 0.5) / h, (cols.float().mean() + 0.5) / w
        assert abs(cy - (t + b) / 2 / R) < 1.0 / h and abs(cx - (left + r) / 2 / R) < 1.0 / w
        above, leftof = max(int(h * t / R) - 1, 0), max(int(w * left / R) - 1, 0)  # cells clear of the object
        assert lm[:above].sum() == 0 and lm[:, :leftof].sum() == 0
    slot = batch["token_phrase"][0]
    assert sd_clip_tokenizer().decode(batch["input_ids"][0, slot == 0]).strip() == "red box"
