"""A synthetic grounded world: coloured shapes on grey backgrounds with exact per-object masks.

Sample `i` of a world with seed `s` is a pure function of `(s, i)`; it can be rendered at any
(height, width): object geometry lives in normalised coordinates and is rasterised at the size
asked for, and the image is painted from the masks, so masks are exact at every size.

Captions read "a photo of a red circle, a blue square and a green triangle". The grounded
phrases are colour + shape ("red circle"): a mask then grounds every token that names its
object, and two objects never share a phrase (shapes are distinct within an image).
`phrase="shape"` grounds only the shape noun ("circle"), as TokenCompose grounds nouns.

Six colour/shape combinations (one per colour and one per shape, so every colour and every shape
is still seen in training) never appear in the training world: `synthetic_combos()` lists the
split and `synthetic_eval_prompts()` composes prompts for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tcscale.data.config import COMBO_SPLITS, PHRASE_MODES

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "star")
# Held out: colour i with shape i+1 (a Latin-square diagonal): red square, green triangle, blue diamond,
# yellow hexagon, purple star, orange circle.
HELD_OUT: frozenset[tuple[str, str]] = frozenset((c, SHAPES[(i + 1) % len(SHAPES)]) for i, c in enumerate(COLOURS))


@dataclass
class SyntheticObject:
    colour: str
    shape: str
    cx: float  # centre x as a fraction of the width
    cy: float  # centre y as a fraction of the height
    radius: float  # circumradius as a fraction of min(height, width)
    angle: float  # rotation in radians (triangle, diamond, hexagon, star)


@dataclass
class SyntheticSample:
    key: str
    image: np.ndarray  # H x W x 3 uint8
    caption: str
    phrases: list[str]
    masks: np.ndarray  # P x H x W uint8 in {0, 1}, row p is phrase p (visible pixels of the object)
    objects: list[SyntheticObject]


def synthetic_combos() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train combos, held-out combos) as sorted (colour, shape) lists."""
    every = [(c, s) for c in COLOURS for s in SHAPES]
    return [cs for cs in every if cs not in HELD_OUT], sorted(HELD_OUT)


def compose_caption(objects: list[tuple[str, str]]) -> str:
    """'a photo of a red circle, a blue square and a green triangle'."""
    names = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in objects]
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return "a photo of " + body


def phrase_text(colour: str, shape: str, mode: str = "colour_shape") -> str:
    if mode not in PHRASE_MODES:
        raise ValueError(f"data.synthetic.phrase={mode!r} is not one of {list(PHRASE_MODES)}")
    return f"{colour} {shape}" if mode == "colour_shape" else shape


def synthetic_eval_prompts(
    num_objects: int = 2, split: str = "held_out", num_prompts: int = 32, seed: int = 0
) -> list[dict]:
    """Evaluation prompts: {"prompt", "objects": [[colour, shape], ...], "phrases": [...]}.

    split="held_out": every prompt names at least one held-out combination; split="train": only
    training combinations. Shapes are distinct within a prompt, as in the training world.
    """
    if split not in ("held_out", "train"):
        raise ValueError(f"split must be 'held_out' or 'train', got {split!r}")
    if not 1 <= num_objects <= len(SHAPES):
        raise ValueError(f"num_objects must be in 1..{len(SHAPES)}, got {num_objects}")
    train, held = synthetic_combos()
    rng = np.random.default_rng([seed, num_objects, 0 if split == "held_out" else 1])
    prompts, seen = [], set()
    for _ in range(num_prompts * 50):
        if len(prompts) >= num_prompts:
            break
        first = held[rng.integers(len(held))] if split == "held_out" else train[rng.integers(len(train))]
        objs = [first]
        pool = [cs for cs in train if cs[1] != first[1]]
        while len(objs) < num_objects:
            cand = pool[rng.integers(len(pool))]
            if all(cand[1] != o[1] for o in objs):
                objs.append(cand)
        order = rng.permutation(len(objs))
        objs = [objs[i] for i in order]
        if tuple(objs) in seen:
            continue
        seen.add(tuple(objs))
        prompts.append(
            {
                "prompt": compose_caption(objs),
                "objects": [list(o) for o in objs],
                "phrases": [f"{c} {s}" for c, s in objs],
            }
        )
    return prompts


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        n, radii, base = 4, [r], np.pi / 4
    elif shape == "diamond":  # a rhombus, taller than wide
        n, radii, base = 4, [0.6 * r, r], 0.0
    elif shape == "triangle":
        n, radii, base = 3, [r], -np.pi / 2
    elif shape == "hexagon":
        n, radii, base = 6, [r], 0.0
    elif shape == "star":
        n, radii, base = 10, [r, 0.45 * r], -np.pi / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    pts = []
    for k in range(n):
        t = base + angle + 2 * np.pi * k / n
        rad = radii[k % len(radii)]
        pts.append((cx + rad * np.cos(t), cy + rad * np.sin(t)))
    return pts


class SyntheticWorld:
    """Deterministic world of `num_samples` grounded images (sample i depends on (seed, i) only)."""

    def __init__(
        self,
        num_samples: int = 64,
        max_objects: int = 3,
        seed: int = 1234,
        phrase: str = "colour_shape",
        combos: str = "train",
        min_objects: int = 1,
    ):
        if num_samples <= 0:
            raise ValueError(f"data.synthetic.num_samples must be > 0, got {num_samples}")
        if not 1 <= max_objects <= len(SHAPES):
            raise ValueError(f"data.synthetic.max_objects must be in 1..{len(SHAPES)}, got {max_objects}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"data.synthetic.min_objects must be in 1..max_objects={max_objects}, got {min_objects}")
        self.min_objects = min_objects
        phrase_text("red", "circle", phrase)  # validates the mode
        if combos not in COMBO_SPLITS:
            raise ValueError(f"data.synthetic.combos={combos!r} is not one of {list(COMBO_SPLITS)}")
        self.combos = combos
        self.num_samples = num_samples
        self.max_objects = max_objects
        self.seed = seed
        self.phrase = phrase
        self._train_by_shape = {s: [c for c, s2 in synthetic_combos()[0] if s2 == s] for s in SHAPES}

    def __len__(self) -> int:
        return self.num_samples

    def layout(self, index: int) -> list[SyntheticObject]:
        """Objects of sample `index` in normalised coordinates (rendering-size independent)."""
        rng = np.random.default_rng([self.seed, index])
        n = int(rng.integers(1, self.max_objects + 1))
        if n < self.min_objects:  # a separate draw, so worlds with min_objects=1 keep their layouts
            n = int(np.random.default_rng([self.seed, index, 2]).integers(self.min_objects, self.max_objects + 1))
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
        held = None
        if self.combos == "held_out":  # one object is a held-out combination, placed at a random position
            held = sorted(HELD_OUT)[int(rng.integers(len(HELD_OUT)))]
            others = [s for s in shapes if s != held[1]][: n - 1]
            shapes = others[:]
            shapes.insert(int(rng.integers(n)), held[1])
        objects: list[SyntheticObject] = []
        for shape in shapes:
            colours = self._train_by_shape[shape]
            colour = colours[int(rng.integers(len(colours)))]
            if held is not None and shape == held[1]:
                colour = held[0]
            radius = float(rng.uniform(0.12, 0.22)) * (1.0 if n < 3 else 0.85)
            best = None
            for _ in range(30):  # rejection sampling: objects do not overlap (in a square frame)
                cx, cy = (float(v) for v in rng.uniform(radius, 1 - radius, size=2))
                gap = min((np.hypot(cx - o.cx, cy - o.cy) - radius - o.radius for o in objects), default=1.0)
                if best is None or gap > best[0]:
                    best = (gap, cx, cy)
                if gap > 0.02:
                    break
            _, cx, cy = best
            objects.append(SyntheticObject(colour, shape, cx, cy, radius, float(rng.uniform(0, 2 * np.pi / 12))))
        return objects

    def render(self, index: int, size: tuple[int, int] | int = 64) -> SyntheticSample:
        """Sample `index` rendered at size (height, width) (an int means square)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"synthetic sample {index} out of range 0..{self.num_samples - 1}")
        h, w = (size, size) if isinstance(size, int) else size
        objects = self.layout(index)
        rng = np.random.default_rng([self.seed, index, 1])
        grey = int(rng.integers(100, 180))
        ramp = np.linspace(-12, 12, w, dtype=np.float32)[None, :] + np.linspace(-8, 8, h, dtype=np.float32)[:, None]
        image = np.clip(grey + ramp, 0, 255).astype(np.uint8)[..., None].repeat(3, axis=2)
        masks = np.zeros((len(objects), h, w), dtype=np.uint8)
        scale = min(h, w)
        for p, obj in enumerate(objects):
            canvas = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(canvas)
            cx, cy, r = obj.cx * w, obj.cy * h, obj.radius * scale
            if obj.shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
            else:
                draw.polygon(_polygon(obj.shape, cx, cy, r, obj.angle), fill=1)
            m = np.asarray(canvas, dtype=np.uint8)
            masks[:p][:, m > 0] = 0  # a later object occludes earlier ones: masks are the visible pixels
            masks[p] = m
            image[m > 0] = COLOURS[obj.colour]
        pairs = [(o.colour, o.shape) for o in objects]
        return SyntheticSample(
            key=f"synth{self.seed}_{index:08d}",
            image=image,
            caption=compose_caption(pairs),
            phrases=[phrase_text(c, s, self.phrase) for c, s in pairs],
            masks=masks,
            objects=objects,
        )


def all_combos_in_world(world: SyntheticWorld) -> set[tuple[str, str]]:
    """The (colour, shape) combinations the world's samples use (for checks: no held-out combo)."""
    return {(o.colour, o.shape) for i in range(len(world)) for o in world.layout(i)}


__all__ = [
    "COLOURS",
    "SHAPES",
    "HELD_OUT",
    "SyntheticObject",
    "SyntheticSample",
    "SyntheticWorld",
    "synthetic_combos",
    "synthetic_eval_prompts",
    "compose_caption",
    "phrase_text",
    "all_combos_in_world",
]
