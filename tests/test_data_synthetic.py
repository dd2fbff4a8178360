"""Synthetic shapes world and the synthetic training source: exact masks, held-out split, determinism, resume."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from tcscale.data import DataConfig, SyntheticDataConfig, build_train_loader
from tcscale.data.synthetic import (
    COLOURS,
    HELD_OUT,
    SyntheticWorld,
    all_combos_in_world,
    synthetic_combos,
    synthetic_eval_prompts,
)
from tcscale.models.tokenizer import sd_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return sd_clip_tokenizer()


def test_world_is_deterministic_and_masks_are_exact_at_any_size():
    world = SyntheticWorld(num_samples=16, max_objects=3, seed=7)
    for i in range(16):
        a, b = world.render(i, 64), world.render(i, 64)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks) and a.caption == b.caption
        for size in [(64, 64), (90, 150)]:
            s = world.render(i, size)
            assert s.image.shape == (*size, 3) and s.masks.shape == (len(s.phrases), *size)
            for p, obj in enumerate(s.objects):
                m = s.masks[p].astype(bool)
                assert m.any(), f"object {p} of sample {i} invisible at {size}"
                assert (s.image[m] == COLOURS[obj.colour]).all()  # image painted from the mask
            assert s.masks.sum(0).max() <= 1  # visible parts do not overlap
        assert [f"{o.colour} {o.shape}" for o in s.objects] == s.phrases
    other = SyntheticWorld(num_samples=16, max_objects=3, seed=8)
    assert any(other.render(i, 32).caption != world.render(i, 32).caption for i in range(16))


def test_held_out_combos_never_in_training_world():
    train, held = synthetic_combos()
    assert len(held) == len(COLOURS) and not set(train) & set(held)
    assert {c for c, _ in held} == set(COLOURS) and len({s for _, s in held}) == len(held)
    world = SyntheticWorld(num_samples=400, max_objects=3, seed=1)
    assert not all_combos_in_world(world) & HELD_OUT
    for p in synthetic_eval_prompts(2, "held_out", 10):
        assert any(tuple(o) in HELD_OUT for o in p["objects"])
        assert all(ph in p["prompt"] for ph in p["phrases"])
    for p in synthetic_eval_prompts(3, "train", 10):
        assert not any(tuple(o) in HELD_OUT for o in p["objects"])


def _cfg(**kw) -> DataConfig:
    return DataConfig(source="synthetic", resolution=64, synthetic=SyntheticDataConfig(num_samples=64, seed=3), **kw)


def _same(a: dict, b: dict) -> bool:
    tensors = ["pixel_values", "input_ids", "phrase_masks", "token_phrase"]
    return (
        all(torch.equal(a[k], b[k]) for k in tensors)
        and a["keys"] == b["keys"]
        and a["layer_masks"].keys() == b["layer_masks"].keys()
        and all(torch.equal(a["layer_masks"][k], b["layer_masks"][k]) for k in a["layer_masks"])
    )


def test_synthetic_batches_are_a_function_of_seed_rank_step_and_resume_exactly(tokenizer):
    cfg = _cfg(random_flip=True, center_crop=True)
    kw = dict(rank=1, world_size=2, micro_batch_size=3, seed=11, layer_sizes=[(8, 8), (4, 4)], full_masks=True)
    run = build_train_loader(cfg, tokenizer, **kw)
    it = iter(run)
    full = [next(it) for _ in range(8)]
    again = iter(build_train_loader(cfg, tokenizer, **kw))
    assert all(_same(next(again), b) for b in full)
    resumed = build_train_loader(cfg, tokenizer, start_step=5, **kw)
    assert all(_same(next(iter(resumed)), b) for b in full[5:6])
    it_r = iter(resumed)
    assert all(_same(next(it_r), b) for b in full[6:8])
    # a checkpointed state restores the same position
    state = run.state_dict()
    assert state["step"] == 8 and state["seed"] == 11 and state["rank"] == 1
    restored = build_train_loader(cfg, tokenizer, **kw)
    restored.load_state_dict({**state, "step": 6})
    assert (
        _same(next(iter(restored)), full[6])
        and restored.counters()["samples_seen"] == state["counters"]["samples_seen"] + 3
    )
    other_rank = build_train_loader(cfg, tokenizer, **{**kw, "rank": 0})
    assert not _same(next(iter(other_rank)), full[0])
    other_seed = build_train_loader(cfg, tokenizer, **{**kw, "seed": 12})
    assert not _same(next(iter(other_seed)), full[0])


def test_synthetic_with_workers_matches_in_process(tokenizer):
    cfg0, cfg2 = _cfg(), _cfg(num_workers=2)
    kw = dict(rank=0, world_size=1, micro_batch_size=2, seed=0, start_step=3, layer_sizes=[(8, 8)], full_masks=True)
    a, b = iter(build_train_loader(cfg0, tokenizer, **kw)), iter(build_train_loader(cfg2, tokenizer, **kw))
    for _ in range(4):
        assert _same(next(a), next(b))


def test_synthetic_epoch_covers_world_once_across_ranks(tokenizer):
    cfg = DataConfig(source="synthetic", resolution=32, synthetic=SyntheticDataConfig(num_samples=16, seed=5))
    keys = []
    for rank in range(2):
        it = iter(build_train_loader(cfg, tokenizer, rank=rank, world_size=2, micro_batch_size=2, seed=1))
        for _ in range(4):
            keys += next(it)["keys"]
    assert sorted(keys) == sorted(f"synth5_{i:08d}" for i in range(16))


def test_synthetic_masks_sit_under_their_tokens_and_colours(tokenizer):
    cfg = _cfg(random_flip=True)
    loader = build_train_loader(
        cfg, tokenizer, rank=0, world_size=1, micro_batch_size=8, seed=2, layer_sizes=[(8, 8)], full_masks=True
    )
    batch = next(iter(loader))
    b, p = batch["phrase_masks"].shape[:2]
    for i in range(b):
        words = batch["captions"][i].replace(",", "").split()
        n = int(batch["token_phrase"][i].max()) + 1
        for slot in range(p):
            toks = (batch["token_phrase"][i] == slot).nonzero().flatten()
            if slot >= n:
                assert len(toks) == 0 and batch["phrase_masks"][i, slot].sum() == 0  # padding
                continue
            text = tokenizer.decode(batch["input_ids"][i, toks]).strip()
            colour, shape = text.split()
            assert colour in COLOURS and shape in words
            m = batch["phrase_masks"][i, slot].bool()
            pix = ((batch["pixel_values"][i, :, m] + 1) * 127.5).round()  # 3 x n_pixels
            want = torch.tensor(COLOURS[colour], dtype=torch.float32)[:, None]
            assert (pix - want).abs().max() <= 1.0, f"mask of {text!r} is not over its object"
    assert batch["layer_masks"][(8, 8)].shape == (b, p, 64)
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].abs().max() <= 1.0
    assert batch["input_ids"].dtype == torch.int64 and batch["token_phrase"].dtype == torch.int64


def test_small_synthetic_world_is_fast(tokenizer):
    loader = build_train_loader(
        _cfg(), tokenizer, rank=0, world_size=1, micro_batch_size=4, seed=0, layer_sizes=[(8, 8), (4, 4), (2, 2)]
    )
    it = iter(loader)
    for _ in range(20):  # render cache warm-up (64 samples)
        next(it)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t)
    assert float(np.median(times)) < 0.02, f"median batch time {np.median(times) * 1e3:.1f} ms"
    c = loader.counters()
    assert c["samples_seen"] == 50 * 4 and c["phrases_kept"] > 0


def test_layer_masks_replace_full_masks_and_follow_the_rule(tokenizer):
    """With layer grids (a grounding plan) the batch carries the layer masks only, equal to the mask rule applied to
    the full-resolution masks that `full_masks=True` adds; without grids the full masks travel."""
    from tcscale.attention.masks import MaskRule

    rule = MaskRule("nearest", 0.5)
    kw = dict(rank=0, world_size=1, micro_batch_size=4, seed=3, layer_sizes=[(8, 8), (4, 4)], mask_rule=rule)
    lean = next(iter(build_train_loader(_cfg(), tokenizer, **kw)))
    full = next(iter(build_train_loader(_cfg(), tokenizer, **kw, full_masks=True)))
    assert "phrase_masks" not in lean and "phrase_masks" in full
    for size in ((8, 8), (4, 4)):
        torch.testing.assert_close(lean["layer_masks"][size], rule.apply(full["phrase_masks"], size))
    plain = next(iter(build_train_loader(_cfg(), tokenizer, rank=0, world_size=1, micro_batch_size=4, seed=3)))
    assert "phrase_masks" in plain and plain["layer_masks"] == {}


def test_held_out_world_shows_one_held_out_combination_per_image_and_min_objects():
    from tcscale.data.synthetic import HELD_OUT, SyntheticWorld

    world = SyntheticWorld(200, max_objects=3, seed=11233, combos="held_out", min_objects=2)
    for i in range(len(world)):
        objs = world.layout(i)
        combos = [(o.colour, o.shape) for o in objs]
        assert 2 <= len(objs) <= 3 and len({o.shape for o in objs}) == len(objs)
        assert sum(c in HELD_OUT for c in combos) == 1, combos
    train = SyntheticWorld(200, max_objects=3, seed=1234)
    assert all((o.colour, o.shape) not in HELD_OUT for i in range(200) for o in train.layout(i))
    assert SyntheticWorld(50, 3, 1234, min_objects=1).layout(7) == train.layout(7)  # default layouts unchanged
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticWorld(4, max_objects=2, min_objects=3)
