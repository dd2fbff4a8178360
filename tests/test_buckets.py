"""Aspect-ratio buckets (tcscale/data/buckets.py): bucket lists, crop windows, one bucket per micro-batch, masks that
line up with the latent of a bucketed sample, SDXL's crop time ids (the bucketed 2-rank SDXL
run that resumes is tests/test_sdxl.py's family run)."""

from __future__ import annotations

import numpy as np
import torch

from tcscale.config import load_config
from tcscale.data import build_train_loader
from tcscale.data.buckets import generate_buckets, nearest_bucket
from tcscale.data.synthetic import COLOURS, SyntheticWorld
from tcscale.data.transforms import crop_params, window_for
from tcscale.models.tokenizer import sd_clip_tokenizer
from tests.helpers.buckets import BUCKETED
from tests.helpers.paths import TINY_CONFIG


def test_generated_bucket_lists():
    sdxl = generate_buckets(1024**2, 64, 2.0)
    assert (1024, 1024) in sdxl and (832, 1216) in sdxl and (1216, 832) in sdxl and (768, 1344) in sdxl
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 and max(h, w) / min(h, w) <= 2 for h, w in sdxl)
    assert all(h * w > 0.9 * 1024**2 for h, w in sdxl)  # ~1 MP each
    assert generate_buckets(512**2, 64, 2.0) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert nearest_bucket(480, 640, generate_buckets(512**2, 64, 2.0)) == (448, 576)  # 4:3 -> 0.78, not 0.6
    assert nearest_bucket(500, 500, generate_buckets(512**2, 64, 2.0)) == (512, 512)


def test_crop_window_has_the_bucket_aspect_and_is_centred():
    assert window_for(60, 100, (48, 80)) == (60, 100)  # the same aspect: the whole image
    assert window_for(40, 120, (48, 80)) == (40, 67)  # wider: full height
    assert window_for(120, 40, (80, 48)) == (67, 40)
    p = crop_params(40, 120, target=(48, 80))
    assert (p.top, p.left, p.window) == (0, 26, (40, 67))


def loader(cfg, rank=0, world=1, batch=2, **kw):
    return build_train_loader(
        cfg.data, sd_clip_tokenizer(), rank=rank, world_size=world, micro_batch_size=batch, seed=0, **kw
    )  # fmt: skip


def test_synthetic_micro_batches_hold_one_bucket_and_do_not_depend_on_the_world_size(tmp_path):
    cfg = load_config(TINY_CONFIG, [*BUCKETED, "data.synthetic.num_samples=16"])
    one = loader(cfg)
    seq = [one.next_batch() for _ in range(12)]  # 16 samples -> 8 full batches per epoch: 1.5 epochs
    shapes = {tuple(b["pixel_values"].shape[-2:]) for b in seq}
    assert shapes == {(48, 80), (80, 48), (64, 64)}
    for b in seq:
        assert len(b["keys"]) == 2
    first_epoch = [k for b in seq[:8] for k in b["keys"]]
    assert len(set(first_epoch)) == 16  # every sample once per epoch (no bucket remainder at these counts)
    ranks = [loader(cfg, rank=r, world=2) for r in range(2)]
    for n in range(6):  # micro-step n of rank r is batch 2n + r of the one-rank sequence
        for r in range(2):
            b = ranks[r].next_batch()
            assert b["keys"] == seq[2 * n + r]["keys"]
            assert torch.equal(b["pixel_values"], seq[2 * n + r]["pixel_values"])
    resumed = loader(cfg, rank=1, world=2)
    resumed.load_state_dict({**ranks[1].state_dict(), "step": 3})
    assert resumed.next_batch()["keys"] == seq[2 * 3 + 1]["keys"]


def test_sdxl_time_ids_come_from_the_real_crop(tmp_path):
    cfg = load_config(TINY_CONFIG, [*BUCKETED, "data.synthetic.num_samples=4"])
    batches = [loader(cfg, batch=1).next_batch() for _ in range(1)]
    it = loader(cfg, batch=1)
    seen = {}
    for _ in range(4):
        b = it.next_batch()
        seen[tuple(b["original_sizes"][0].tolist())] = (b["crop_top_lefts"][0].tolist(), b["target_sizes"][0].tolist())
    assert batches
    # 40 x 120 -> bucket 48 x 80: window 40 x 67 at left 26, scaled by 80 / 67 -> 31 in the 48 x 80 image
    assert seen[(40, 120)] == ([0, round(26 * 80 / 67)], [48, 80])
    assert seen[(60, 100)] == ([0, 0], [48, 80]) and seen[(64, 64)] == ([0, 0], [64, 64])


def test_bucketed_masks_line_up_with_the_cached_latent(tmp_path):
    """Exact latent (space_to_depth, 2 px per cell) written by the cache stage for bucketed shards of the shapes world:
    unfolded back to pixels, the latent under each phrase's latent-grid mask has the object's colour, and the mask's
    centroid is where the world's own (exact, original-size) mask puts the object after the bucket's crop."""
    from dataprep.stages import latents as stage
    from dataprep.synthetic_shards import write_synthetic_shards

    world = SyntheticWorld(6, 3, 1234, "colour_shape")  # write_synthetic_shards' defaults
    write_synthetic_shards(str(tmp_path / "a"), 6, 120, 360, samples_per_shard=6, prefix="wide", progress=False)
    shards = f"{tmp_path}/a/wide-000000.tar"
    common = ["model.tiny.latent=space_to_depth", "data.source=webdataset", "data.buckets.enabled=true",
              "data.buckets.step=16", "data.shuffle_buffer=1", "data.resampled=false"]  # fmt: skip
    cfg = load_config(TINY_CONFIG, [*common, f"data.shards={shards}"])
    stage.run(cfg, tmp_path / "cached", progress=False)
    cfg = load_config(TINY_CONFIG, [*common, f"data.shards={tmp_path}/cached/wide-000000.tar", "data.latents=cached"])
    batch = loader(cfg, batch=6, layer_sizes=[(32, 32)]).next_batch()  # the 64 px latent grid -> 24 x 40 at 48 x 80
    mean = batch["latent_mean"]  # (B, 12, 24, 40): 3 channels x 2 x 2 pixels per cell
    assert mean.shape == (6, 12, 24, 40)
    pixels = torch.nn.functional.pixel_shuffle(mean, 2)  # (B, 3, 48, 80) in [-1, 1]
    masks = batch["layer_masks"][(24, 40)]  # (B, P, 24 * 40)
    window = window_for(120, 360, (48, 80))  # 120 x 200, centred
    left = (360 - window[1]) // 2
    checked = 0
    for b, key in enumerate(batch["keys"]):
        sample = world.render(int(key.rsplit("_", 1)[1]), (120, 360))
        for p, obj in enumerate(sample.objects):
            m = masks[b, p].reshape(24, 40)
            exact = sample.masks[p][:, left : left + window[1]]  # the world's mask inside the bucket's window
            if m.sum() < 12 or exact.sum() < 200:
                continue  # (almost) outside the crop
            colour = torch.tensor(COLOURS[obj.colour]) / 127.5 - 1
            inner = m.clone()  # cells whose 4 neighbours are in the mask too (JPEG blurs the edges)
            inner[1:-1, 1:-1] *= m[:-2, 1:-1] * m[2:, 1:-1] * m[1:-1, :-2] * m[1:-1, 2:]
            cells = pixels[b].reshape(3, 24, 2, 40, 2).mean((2, 4))[:, inner > 0]  # (3, cells) mean colour per cell
            assert cells.shape[1] >= 2 and (cells - colour[:, None]).abs().mean() < 0.05, (key, obj)
            ys, xs = np.nonzero(exact)
            want = ((ys.mean() + 0.5) * 24 / window[0], (xs.mean() + 0.5) * 40 / window[1])  # centroid, in cells
            gy, gx = torch.nonzero(m, as_tuple=True)
            got = (float(gy.float().mean()) + 0.5, float(gx.float().mean()) + 0.5)
            assert abs(got[0] - want[0]) < 0.5 and abs(got[1] - want[1]) < 0.5, (key, obj, got, want)
            checked += 1
    assert checked >= 4
