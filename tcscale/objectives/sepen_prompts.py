"""Prompts for Separate-and-Enhance finetuning (data-free: concept nouns -> composed prompts + token positions).

Concept lists (text files under ``tcscale/objectives/concepts/``):

* ``"pairs"``: the individual-pair setting, ``pairs.txt``: 22 COCO-category object pairs (one model is
  usually finetuned per pair: ``pair_index``; None samples all pairs).
* ``"large"``: the large-scale setting, ``coco_large.txt``: 60 COCO category nouns with a fixed split
  (``split_seen_unseen``: sorted alphabetically, every 4th noun, sorted index % 4 == 3, is unseen ->
  45 seen / 15 unseen). Training samples the seen nouns; evaluation can use the unseen ones.
* a path: a user file, one noun per line (blank lines and ``#`` comments ignored); all nouns by default,
  or its own seen/unseen split by the same rule.

``SepEnPromptSampler`` is deterministic in (seed, step, rank): the same triple always gives the same
prompts, whichever process asks. ``multi`` composes K-object prompts ("a photo of a cat and a dog",
"a cat, a dog and a bird"); ``single`` gives single-concept prompts for L_norm ("a photo of a cat").

Prompt styles (``style``; docs/FIDELITY.md): ``paper`` — the templates above, nouns with a/an articles, any K;
``official_pairs`` — the official individual-pair template "a photo of {c1} and {c2}" (no articles);
``official_large`` — the official large-scale template "a photo of a {A} {and|with} a {B}" ("a" before every noun,
the conjunction drawn per prompt). The official styles name exactly two objects; single prompts are the same in
every style.
Each prompt carries, per object, the positions of all BPE tokens of its noun in the tokenized prompt
(indices into the 77 ``input_ids``, SOT = 0; the first occurrence of the noun's token sequence). A draw in
which an object's first occurrence is not the object itself (e.g. "dog" inside an earlier "hot dog", or a
noun repeated in the template) is redrawn, so positions by construction and by first-occurrence search agree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tcscale.data.align import PhraseAligner

CONCEPTS_DIR = Path(__file__).resolve().parent / "concepts"
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of {objects}", "{objects}")
SINGLE_TEMPLATES: tuple[str, ...] = ("a photo of {objects}",)
OFFICIAL_TEMPLATES: tuple[str, ...] = ("a photo of {objects}",)
PROMPT_STYLES: tuple[str, ...] = ("paper", "official_pairs", "official_large")
OFFICIAL_LARGE_CONJUNCTIONS: tuple[str, ...] = ("and", "with")
_MULTI_STREAM, _SINGLE_STREAM = 0, 1  # independent RNG streams per (seed, step, rank)
_MAX_REDRAWS = 100


@dataclass(frozen=True)
class ConceptSplit:
    """A concept list split into the nouns trained on (seen) and held out (unseen); disjoint."""

    seen: tuple[str, ...]
    unseen: tuple[str, ...]


@dataclass(frozen=True)
class ObjectPrompt:
    """One composed prompt and where each object's noun tokens sit in its tokenized form."""

    text: str
    objects: tuple[str, ...]  # object nouns in prompt order
    token_positions: tuple[tuple[int, ...], ...]  # per object: positions in input_ids (SOT = 0)


def _read_lines(path: str | os.PathLike) -> list[str]:
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(" ".join(line.lower().split()))
    return lines


def load_concept_file(path: str | os.PathLike) -> list[str]:
    """A user noun list: one noun (or multi-word noun, "teddy bear") per line; duplicates removed, order kept."""
    nouns = list(dict.fromkeys(_read_lines(path)))
    if not nouns:
        raise ValueError(f"no nouns in concept file {path}")
    return nouns


def pair_concepts() -> list[tuple[str, str]]:
    """The individual-pair setting's object pairs (``concepts/pairs.txt``)."""
    pairs = []
    for line in _read_lines(CONCEPTS_DIR / "pairs.txt"):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise ValueError(f"pairs.txt: expected 'noun, other noun', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def split_seen_unseen(nouns: Sequence[str], unseen_every: int = 4) -> ConceptSplit:
    """Deterministic split: sort the unique nouns; sorted index % unseen_every == unseen_every − 1 is unseen."""
    if unseen_every < 2:
        raise ValueError(f"unseen_every must be >= 2, got {unseen_every}")
    ordered = sorted(set(nouns))
    seen = tuple(n for i, n in enumerate(ordered) if i % unseen_every != unseen_every - 1)
    unseen = tuple(n for i, n in enumerate(ordered) if i % unseen_every == unseen_every - 1)
    return ConceptSplit(seen=seen, unseen=unseen)


def large_concepts() -> ConceptSplit:
    """The large-scale setting's 60 COCO nouns, split 45 seen / 15 unseen (``concepts/coco_large.txt``)."""
    return split_seen_unseen(load_concept_file(CONCEPTS_DIR / "coco_large.txt"))


def article(noun: str) -> str:
    """'a' or 'an' by the noun's first letter (good enough for concept nouns)."""
    return "an" if noun[:1].lower() in "aeiou" else "a"


def join_objects(nouns: Sequence[str]) -> str:
    """["cat"] -> "a cat"; ["cat", "dog"] -> "a cat and a dog"; 3+ -> "a cat, a dog and an apple"."""
    parts = [f"{article(n)} {n}" for n in nouns]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def join_objects_official(nouns: Sequence[str], style: str, conjunction: str = "and") -> str:
    """The official templates' object phrase: ``official_pairs`` "cat and dog"; ``official_large`` "a cat and a dog"
    or "a cat with a dog" (always "a"). Exactly two nouns."""
    if len(nouns) != 2:
        raise ValueError(f"the official {style} template names exactly 2 objects, got {list(nouns)}")
    a, b = nouns
    if style == "official_pairs":
        return f"{a} and {b}"
    if style == "official_large":
        if conjunction not in OFFICIAL_LARGE_CONJUNCTIONS:
            raise ValueError(f"conjunction must be one of {OFFICIAL_LARGE_CONJUNCTIONS}, got {conjunction!r}")
        return f"a {a} {conjunction} a {b}"
    raise ValueError(f"style must be one of {PROMPT_STYLES[1:]} here, got {style!r}")


@lru_cache(maxsize=1)
def _default_tokenizer() -> Any:
    from tcscale.models.tokenizer import sd_clip_tokenizer

    return sd_clip_tokenizer()


def noun_token_positions(tokenizer: Any, prompt: str, noun: str) -> tuple[int, ...]:
    """Positions (in the padded input_ids, SOT = 0) of all BPE tokens of ``noun``'s first occurrence in ``prompt``."""
    pos = PhraseAligner(tokenizer, max_length=tokenizer.model_max_length).first_occurrence(prompt, noun)
    if pos is None:
        raise ValueError(f"noun {noun!r} not found in the tokenized prompt {prompt!r} (truncated?)")
    return tuple(pos)


class SepEnPromptSampler:
    """Deterministic K-object and single-concept prompt sampler for SepEn finetuning.

    Args:
        nouns: the concepts to draw from (e.g. ``large_concepts().seen``); duplicates are dropped.
        pairs: instead of ``nouns``, fixed object pairs (individual-pair setting): every multi-object
            prompt names one pair (in random order); single prompts name one noun of the pairs.
        num_objects: (min, max) objects per multi-object prompt, K drawn uniformly; min ≥ 2.
        templates: multi-object templates with one ``{objects}`` field; one is drawn per prompt (None: the
            style's, ``DEFAULT_TEMPLATES`` for "paper", ``OFFICIAL_TEMPLATES`` for the official styles).
        single_templates: templates of the single-concept (L_norm) prompts.
        seed: run seed; prompts are a pure function of (seed, step, rank, index in batch).
        tokenizer: the model's CLIP tokenizer; None -> the SD1.x tokenizer (offline).
        style: "paper" | "official_pairs" | "official_large" (module docstring); the official ones need K = 2.
    """

    def __init__(
        self,
        nouns: Sequence[str] | None = None,
        *,
        pairs: Sequence[tuple[str, str]] | None = None,
        num_objects: tuple[int, int] = (2, 2),
        templates: Sequence[str] | None = None,
        single_templates: Sequence[str] = SINGLE_TEMPLATES,
        seed: int = 0,
        tokenizer: Any | None = None,
        style: str = "paper",
    ) -> None:
        if (nouns is None) == (pairs is None):
            raise ValueError("give exactly one of nouns (K-object prompts) or pairs (individual-pair setting)")
        if style not in PROMPT_STYLES:
            raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}")
        lo, hi = num_objects
        if lo < 2 or hi < lo:
            raise ValueError(f"num_objects must be (min, max) with 2 <= min <= max, got {num_objects}")
        if templates is None:
            templates = DEFAULT_TEMPLATES if style == "paper" else OFFICIAL_TEMPLATES
        self.style = style
        for t in (*templates, *single_templates):
            if t.count("{objects}") != 1:
                raise ValueError(f"template {t!r} must contain '{{objects}}' exactly once")
        if not templates or not single_templates:
            raise ValueError("templates and single_templates must not be empty")
        if pairs is not None:
            self.pairs: tuple[tuple[str, str], ...] | None = tuple((a, b) for a, b in pairs)
            if not self.pairs or any(a == b for a, b in self.pairs):
                raise ValueError("pairs must be non-empty pairs of two different nouns")
            self.nouns = tuple(dict.fromkeys(n for p in self.pairs for n in p))
            num_objects = (2, 2)
        else:
            self.pairs = None
            self.nouns = tuple(dict.fromkeys(nouns))
            if len(self.nouns) < num_objects[1]:
                raise ValueError(f"{len(self.nouns)} nouns cannot fill prompts of {num_objects[1]} distinct objects")
        if style != "paper" and num_objects[1] != 2:
            raise ValueError(f"prompt style {style!r} names exactly 2 objects, got num_objects={num_objects}")
        self.num_objects = num_objects
        self.templates = tuple(templates)
        self.single_templates = tuple(single_templates)
        self.seed = int(seed)
        self.tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
        self.aligner = PhraseAligner(self.tokenizer, max_length=self.tokenizer.model_max_length)

    @classmethod
    def from_concepts(
        cls,
        source: str | os.PathLike,
        *,
        split: str | None = None,
        pair_index: int | None = None,
        **kwargs: Any,
    ) -> SepEnPromptSampler:
        """Build from "pairs", "large" or a noun file.

        ``split``: "seen" | "unseen" | "all"; default "seen" for "large", "all" for a file (a file's split uses
        ``split_seen_unseen``); pairs take no split. ``pair_index`` picks one pair of "pairs" (None: all).
        """
        if str(source) == "pairs":
            if split not in (None, "all"):
                raise ValueError("the pairs setting has no seen/unseen split")
            pairs = pair_concepts()
            if pair_index is not None:
                if not 0 <= pair_index < len(pairs):
                    raise ValueError(f"pair_index must be in [0, {len(pairs)}) (pairs.txt), got {pair_index}")
                pairs = [pairs[pair_index]]
            return cls(pairs=pairs, **kwargs)
        if pair_index is not None:
            raise ValueError("pair_index applies to the 'pairs' concepts only")
        if str(source) == "large":
            nouns: Sequence[str] = load_concept_file(CONCEPTS_DIR / "coco_large.txt")
            split = split or "seen"
        else:
            nouns = load_concept_file(source)
            split = split or "all"
        if split == "all":
            return cls(nouns, **kwargs)
        if split not in ("seen", "unseen"):
            raise ValueError(f"split must be 'seen', 'unseen' or 'all', got {split!r}")
        return cls(getattr(split_seen_unseen(nouns), split), **kwargs)

    # ------------------------------------------------------------------------------------------------
    def _rng(self, step: int, rank: int, stream: int) -> np.random.Generator:
        if step < 0 or rank < 0:
            raise ValueError(f"step and rank must be >= 0, got step={step}, rank={rank}")
        return np.random.default_rng([self.seed, int(step), int(rank), stream])

    def compose(self, template: str, objects: Sequence[str], conjunction: str = "and") -> ObjectPrompt | None:
        """Fill ``template`` with ``objects`` in this sampler's style (``conjunction``: official_large's and|with, for
        multi-object prompts); None when an object's first occurrence is not itself (ambiguous)."""
        if self.style == "paper" or len(objects) == 1:
            phrase = join_objects(objects)
        else:
            phrase = join_objects_official(objects, self.style, conjunction)
        text = template.format(objects=phrase)
        alignment = self.aligner.align(text, list(objects))  # the loader's rule: longer phrases claim first
        positions = []
        for noun, pos in zip(objects, alignment.positions):
            if pos is None or self.aligner.first_occurrence(text, noun) != pos:
                return None
            positions.append(tuple(pos))
        return ObjectPrompt(text=text, objects=tuple(objects), token_positions=tuple(positions))

    def _draw(self, rng: np.random.Generator, templates: Sequence[str], k: int | None) -> ObjectPrompt:
        for _ in range(_MAX_REDRAWS):
            template = templates[int(rng.integers(len(templates)))]
            if k == 1:
                objects = [self.nouns[int(rng.integers(len(self.nouns)))]]
            elif self.pairs is not None:
                pair = self.pairs[int(rng.integers(len(self.pairs)))]
                objects = [pair[i] for i in rng.permutation(2)]
            else:
                n = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
                objects = [self.nouns[i] for i in rng.choice(len(self.nouns), size=n, replace=False)]
            conjunction = "and"
            if self.style == "official_large" and k != 1:  # drawn after the objects: the paper stream is unchanged
                conjunction = OFFICIAL_LARGE_CONJUNCTIONS[int(rng.integers(len(OFFICIAL_LARGE_CONJUNCTIONS)))]
            prompt = self.compose(template, objects, conjunction)
            if prompt is not None:
                return prompt
        raise ValueError(f"could not compose an unambiguous prompt in {_MAX_REDRAWS} draws; check the noun list")

    def multi(self, step: int, rank: int, batch_size: int) -> list[ObjectPrompt]:
        """``batch_size`` K-object prompts (K ≥ 2) for this (step, rank)."""
        rng = self._rng(step, rank, _MULTI_STREAM)
        return [self._draw(rng, self.templates, None) for _ in range(batch_size)]

    def single(self, step: int, rank: int, batch_size: int) -> list[ObjectPrompt]:
        """``batch_size`` single-concept prompts for L_norm ("a photo of a cat") for this (step, rank)."""
        rng = self._rng(step, rank, _SINGLE_STREAM)
        return [self._draw(rng, self.single_templates, 1) for _ in range(batch_size)]
