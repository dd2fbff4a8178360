"""Separate-and-Enhance: losses against float64 loop references, and the deterministic prompt sampler."""

from __future__ import annotations

import math

import pytest
import torch

from tcscale.data.align import find_subsequence
from tcscale.losses.sepen import (
    enhance_loss,
    gaussian_kernel_3x3,
    norm_loss,
    object_maps,
    object_token_matrix,
    separate_loss,
    sepen_losses,
    smooth_maps,
)
from tcscale.objectives.sepen_prompts import (
    SepEnPromptSampler,
    large_concepts,
    load_concept_file,
    noun_token_positions,
    pair_concepts,
    split_seen_unseen,
)

LK = 77


def random_attn(B: int, H: int, side: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, side * side, LK, generator=g, dtype=torch.float64) * 2.0
    return logits.softmax(-1).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Independent references: plain Python loops over floats (float64).
# ---------------------------------------------------------------------------------------------------------
def ref_object_maps(attn_maps, object_tokens, side):
    """Returns per sample a list of K maps, each a side×side list of lists."""
    B = attn_maps[0].shape[0]
    out = []
    for b in range(B):
        maps_b = []
        for tokens in object_tokens[b]:
            grid = [[0.0] * side for _ in range(side)]
            for y in range(side):
                for x in range(side):
                    u = y * side + x
                    layer_vals = []
                    for a in attn_maps:
                        H = a.shape[1]
                        head_mean = [sum(float(a[b, h, u, i]) for h in range(H)) / H for i in tokens]
                        layer_vals.append(sum(head_mean) / len(tokens))
                    grid[y][x] = sum(layer_vals) / len(layer_vals)
            maps_b.append(grid)
        out.append(maps_b)
    return out


def ref_separate(maps):
    per_sample = []
    for maps_b in maps:
        side_y, side_x = len(maps_b[0]), len(maps_b[0][0])
        best = -math.inf
        for y in range(side_y):
            for x in range(side_x):
                vals = [m[y][x] for m in maps_b]
                prod = math.prod(vals)
                s = sum(vals)
                best = max(best, prod / s if s > 0 else 0.0)
        per_sample.append(best)
    return sum(per_sample) / len(per_sample)


def ref_gaussian(sigma):
    w = [[math.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma)) for dx in (-1, 0, 1)] for dy in (-1, 0, 1)]
    total = sum(sum(r) for r in w)
    return [[v / total for v in r] for r in w]


def reflect(i, n):
    """Index reflect padding by one pixel: -1 -> 1, n -> n-2 (edge not repeated, like numpy 'reflect')."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def ref_smooth(grid, sigma):
    hgt, wid = len(grid), len(grid[0])
    g = ref_gaussian(sigma)
    out = [[0.0] * wid for _ in range(hgt)]
    for y in range(hgt):
        for x in range(wid):
            acc = 0.0
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    acc += g[dy + 1][dx + 1] * grid[reflect(y + dy, hgt)][reflect(x + dx, wid)]
            out[y][x] = acc
    return out


def ref_enhance(maps, sigma=0.5):
    per_sample = []
    for maps_b in maps:
        peaks = [max(max(row) for row in ref_smooth(m, sigma)) for m in maps_b]
        per_sample.append(1.0 - min(peaks))
    return sum(per_sample) / len(per_sample)


def to_tensor_maps(maps):
    """Ragged reference maps -> padded (B, K, h, w) + valid."""
    B = len(maps)
    K = max(len(m) for m in maps)
    side_y, side_x = len(maps[0][0]), len(maps[0][0][0])
    out = torch.zeros(B, K, side_y, side_x, dtype=torch.float64)
    valid = torch.zeros(B, K, dtype=torch.bool)
    for b, maps_b in enumerate(maps):
        for k, m in enumerate(maps_b):
            out[b, k] = torch.tensor(m, dtype=torch.float64)
            valid[b, k] = True
    return out, valid


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [2, 3])
def test_object_maps_and_losses_match_loop_reference(K):
    side = 4
    attn_maps = [random_attn(2, 2, side, seed=1), random_attn(2, 3, side, seed=2)]  # head count differs by layer
    if K == 2:
        object_tokens = [[[5], [8, 9]], [[2, 3, 4], [10]]]
    else:
        object_tokens = [[[5], [8, 9], [12]], [[2, 3], [10], [20, 21, 22]]]
    maps, valid = object_maps(attn_maps, object_tokens)
    assert maps.shape == (2, K, side, side) and maps.dtype == torch.float64 and bool(valid.all())
    ref = ref_object_maps(attn_maps, object_tokens, side)
    torch.testing.assert_close(maps, to_tensor_maps(ref)[0], rtol=1e-12, atol=1e-14)

    torch.testing.assert_close(separate_loss(maps, valid), torch.tensor(ref_separate(ref), dtype=torch.float64))
    torch.testing.assert_close(enhance_loss(maps, valid), torch.tensor(ref_enhance(ref), dtype=torch.float64))
    torch.testing.assert_close(
        enhance_loss(maps, valid, sigma=1.3), torch.tensor(ref_enhance(ref, 1.3), dtype=torch.float64)
    )
    losses = sepen_losses(attn_maps, object_token_matrix(object_tokens, LK))
    torch.testing.assert_close(losses["sep"], torch.tensor(ref_separate(ref), dtype=torch.float64))
    torch.testing.assert_close(losses["en"], torch.tensor(ref_enhance(ref), dtype=torch.float64))


def test_variable_object_count_per_sample():
    side = 4
    attn_maps = [random_attn(3, 2, side, seed=3)]
    object_tokens = [[[5], [8]], [[2], [10], [11, 12]], [[7, 8], [30]]]  # K = 2, 3, 2
    maps, valid = object_maps(attn_maps, object_tokens)
    assert maps.shape == (3, 3, side, side)
    assert valid.tolist() == [[True, True, False], [True, True, True], [True, True, False]]
    assert float(maps[0, 2].abs().sum()) == 0.0
    ref = ref_object_maps(attn_maps, object_tokens, side)
    torch.testing.assert_close(separate_loss(maps, valid), torch.tensor(ref_separate(ref), dtype=torch.float64))
    torch.testing.assert_close(enhance_loss(maps, valid), torch.tensor(ref_enhance(ref), dtype=torch.float64))
    # Each sample alone gives the same value: padding changes nothing.
    per_sample = [separate_loss(maps[b : b + 1, : len(object_tokens[b])]) for b in range(3)]
    torch.testing.assert_close(separate_loss(maps, valid), torch.stack(per_sample).mean())


def test_gaussian_kernel_and_reflect_padding_by_hand():
    g = gaussian_kernel_3x3(0.5, dtype=torch.float64)
    torch.testing.assert_close(g, torch.tensor(ref_gaussian(0.5), dtype=torch.float64))
    assert abs(float(g.sum()) - 1.0) < 1e-15 and float(g[1, 1]) > 0.6  # σ = 0.5 is sharply peaked
    # A delta next to the corner, at (0, 1): reflect padding mirrors column 1 onto column −1 (the edge is not
    # repeated), so the corner pixel sees it twice: g[1, 0] + g[1, 2]; zero padding would give g[1, 2] only.
    A = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    A[0, 0, 0, 1] = 1.0
    A[0, 1, 2, 3] = 1.0
    smoothed = smooth_maps(A)
    assert float(smoothed[0, 0, 0, 0]) == pytest.approx(float(g[1, 0] + g[1, 2]), rel=1e-14)
    assert float(smoothed[0, 0, 1, 0]) == pytest.approx(float(g[0, 0] + g[0, 2]), rel=1e-14)
    assert float(smoothed[0, 1].amax()) == pytest.approx(float(g[1, 1]), rel=1e-14)
    ref = ref_enhance([[A[0, 0].tolist(), A[0, 1].tolist()]])
    torch.testing.assert_close(enhance_loss(A), torch.tensor(ref, dtype=torch.float64))
    assert float(enhance_loss(A)) == pytest.approx(1.0 - float(g[1, 1]), rel=1e-14)


def test_separate_overlapping_vs_disjoint():
    side = 8
    disjoint = torch.zeros(1, 2, side, side, dtype=torch.float64)
    disjoint[0, 0, :, :4] = 0.5
    disjoint[0, 1, :, 4:] = 0.5
    overlap = torch.zeros(1, 2, side, side, dtype=torch.float64)
    overlap[0, :, 2:6, 2:6] = 0.5
    assert float(separate_loss(disjoint)) == 0.0  # zero-sum pixels hit the 0/0 guard: no NaN
    assert float(separate_loss(overlap)) == pytest.approx(0.25)  # 0.5·0.5 / (0.5 + 0.5)
    # Softly disjoint maps (softmax-like, strictly positive): small, versus large for overlap.
    soft_disjoint = disjoint + 1e-4
    assert float(separate_loss(soft_disjoint)) < 1e-3 < 0.2 < float(separate_loss(overlap + 1e-4))
    # L_en: a sharp high peak per object gives a low enhance loss, flat low maps a high one.
    assert float(enhance_loss(overlap)) < float(enhance_loss(torch.full_like(overlap, 0.01)))


def test_separate_needs_two_objects():
    A = torch.rand(2, 2, 4, 4)
    with pytest.raises(ValueError, match="K >= 2"):
        separate_loss(A, torch.tensor([[True, True], [True, False]]))
    with pytest.raises(ValueError, match="no token positions"):
        object_maps([random_attn(1, 1, 4, 0)], [[[3], []]])


def test_gradients_flow_to_attention_logits():
    side = 4
    logits = [torch.randn(2, 2, side * side, LK, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    attn_maps = [lg.softmax(-1) for lg in logits]
    object_tokens = [[[5], [8, 9]], [[2], [10], [11]]]
    losses = sepen_losses(attn_maps, object_tokens)
    eps_pred = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    eps_frozen = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    ln = norm_loss(eps_pred, eps_frozen)
    (1.0 * losses["sep"] + 0.5 * losses["en"] + 0.5 * ln).backward()
    for lg in logits:
        assert lg.grad is not None and torch.isfinite(lg.grad).all() and float(lg.grad.abs().sum()) > 0
        # Only the object tokens' probabilities carry a loss; the softmax spreads it across the row.
        assert float(lg.grad[0, :, :, [5, 8, 9]].abs().sum()) > 0
    assert eps_frozen.grad is None and float(eps_pred.grad.abs().sum()) > 0

    # Gradient check of the whole chain (maps ties are unlikely with random logits).
    small = [torch.randn(1, 2, side * side, 12, dtype=torch.float64, requires_grad=True)]

    def f(lg):
        return sum(sepen_losses([lg.softmax(-1)], [[[1], [3, 4], [7]]]).values())

    assert torch.autograd.gradcheck(f, small, eps=1e-6, atol=1e-6)


def test_norm_loss_mean_reduction_and_low_precision():
    a = torch.randn(2, 4, 8, 8)
    b = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(norm_loss(a, b), ((a.double() - b.double()) ** 2).mean().float())
    out = norm_loss(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.float32
    maps, valid = object_maps([random_attn(1, 2, 4, 5, dtype=torch.bfloat16)], [[[3], [4]]])
    assert maps.dtype == torch.float32 and torch.isfinite(separate_loss(maps, valid))


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from tcscale.models.tokenizer import sd_clip_tokenizer

    return sd_clip_tokenizer()


def decode_positions(tokenizer, text, positions):
    ids = tokenizer(text, truncation=True, max_length=77).input_ids
    return tokenizer.decode([ids[p] for p in positions]).strip()


def test_concept_lists_and_split():
    pairs = pair_concepts()
    assert 15 <= len(pairs) <= 30 and all(a != b for a, b in pairs)
    split = large_concepts()
    assert (len(split.seen), len(split.unseen)) == (45, 15)
    assert not set(split.seen) & set(split.unseen)
    assert large_concepts() == split  # deterministic
    assert split_seen_unseen(["d", "c", "b", "a", "e"]) == split_seen_unseen(["a", "b", "c", "d", "e", "a"])
    assert split_seen_unseen(["d", "c", "b", "a", "e"]).unseen == ("d",)


def test_user_concept_file(tmp_path, tokenizer):
    f = tmp_path / "nouns.txt"
    f.write_text("# my nouns\nCat\n\ndog  # a comment\nteddy   bear\ncat\nfire hydrant\n")
    assert load_concept_file(f) == ["cat", "dog", "teddy bear", "fire hydrant"]
    sampler = SepEnPromptSampler.from_concepts(f, num_objects=(2, 4), tokenizer=tokenizer)
    assert set(sampler.nouns) == {"cat", "dog", "teddy bear", "fire hydrant"}
    seen = SepEnPromptSampler.from_concepts(f, split="seen", num_objects=(2, 2), tokenizer=tokenizer)
    assert seen.nouns == split_seen_unseen(load_concept_file(f)).seen


def test_sampler_deterministic_positions_decode(tokenizer):
    sampler = SepEnPromptSampler.from_concepts("large", num_objects=(2, 4), seed=7, tokenizer=tokenizer)
    assert set(sampler.nouns) == set(large_concepts().seen)
    a = sampler.multi(step=3, rank=1, batch_size=16)
    again = SepEnPromptSampler.from_concepts("large", num_objects=(2, 4), seed=7, tokenizer=tokenizer)
    assert again.multi(step=3, rank=1, batch_size=16) == a
    assert sampler.multi(step=3, rank=0, batch_size=16) != a
    assert sampler.multi(step=4, rank=1, batch_size=16) != a
    ks = set()
    for p in a:
        ks.add(len(p.objects))
        assert 2 <= len(p.objects) <= 4 and len(set(p.objects)) == len(p.objects)
        assert all(o in sampler.nouns for o in p.objects)
        flat = [i for pos in p.token_positions for i in pos]
        assert len(flat) == len(set(flat)) and min(flat) >= 1  # disjoint, never SOT
        for noun, pos in zip(p.objects, p.token_positions):
            assert decode_positions(tokenizer, p.text, pos) == noun
            assert noun_token_positions(tokenizer, p.text, noun) == pos  # first occurrence
            assert list(pos) == list(range(pos[0], pos[-1] + 1))
    assert len(ks) > 1
    m = object_token_matrix([p.token_positions for p in a], LK)
    assert m.shape == (16, 4, LK)


def test_sampler_pairs_and_single(tokenizer):
    sampler = SepEnPromptSampler.from_concepts("pairs", pair_index=0, seed=0, tokenizer=tokenizer)
    prompts = sampler.multi(step=0, rank=0, batch_size=12)
    assert {frozenset(p.objects) for p in prompts} == {frozenset(pair_concepts()[0])}
    assert {p.objects for p in prompts} == {("cat", "dog"), ("dog", "cat")}  # both orders drawn
    assert any(p.text == "a photo of a cat and a dog" for p in prompts)
    assert prompts[0].text in {"a photo of a cat and a dog", "a photo of a dog and a cat", "a cat and a dog",
                               "a dog and a cat"}  # fmt: skip
    for p in prompts:
        for noun, pos in zip(p.objects, p.token_positions):
            assert decode_positions(tokenizer, p.text, pos) == noun
    singles = SepEnPromptSampler.from_concepts("large", tokenizer=tokenizer).single(step=5, rank=2, batch_size=8)
    for p in singles:
        assert len(p.objects) == 1 and p.text.startswith("a photo of a")
        assert decode_positions(tokenizer, p.text, p.token_positions[0]) == p.objects[0]
    multi_word = SepEnPromptSampler(["teddy bear", "fire hydrant", "wine glass"], tokenizer=tokenizer)
    p = multi_word.multi(step=0, rank=0, batch_size=1)[0]
    assert all(len(pos) >= 2 for pos in p.token_positions)
    assert [decode_positions(tokenizer, p.text, pos) for pos in p.token_positions] == list(p.objects)


def test_sampler_k_at_least_two_and_ambiguity(tokenizer):
    with pytest.raises(ValueError, match="num_objects"):
        SepEnPromptSampler(["cat", "dog"], num_objects=(1, 2), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="cannot fill"):
        SepEnPromptSampler(["cat", "dog"], num_objects=(2, 3), tokenizer=tokenizer)
    # "dog" inside "hot dog": an object whose first occurrence is another object's token is redrawn.
    sampler = SepEnPromptSampler(["hot dog", "dog", "cat"], tokenizer=tokenizer)
    assert sampler.compose("{objects}", ["hot dog", "dog"]) is None
    ok = sampler.compose("{objects}", ["dog", "hot dog"])
    assert ok is not None and ok.token_positions == ((2,), (5, 6))
    for p in sampler.multi(step=0, rank=0, batch_size=24):
        assert [decode_positions(tokenizer, p.text, pos) for pos in p.token_positions] == list(p.objects)
        assert [noun_token_positions(tokenizer, p.text, n) for n in p.objects] == list(p.token_positions)
    assert find_subsequence([1, 2, 3, 2, 3], [2, 3], start=2) == 3
