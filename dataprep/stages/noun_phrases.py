"""Noun phrases: POS-tag the chosen caption, merge runs of noun tags into phrases, dedupe, keep caption order.

Rule (exact, tested with a fake tagger):
* a phrase is a maximal run of consecutive tokens tagged NN / NNS / NNP / NNPS;
* its text is the caption substring from the run's first character to its last (so "t-shirt" stays "t-shirt"
  and the loader finds the phrase verbatim in the caption);
* duplicates (case-insensitive, whitespace-collapsed) keep the first occurrence; order = caption order.

The tagger is flair's `SequenceTagger` (`flair/pos-english` by default, or a local model file) behind the
`PosTagger` protocol; anything implementing `NounPhraseExtractor.extract` can replace the whole stage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from tqdm import tqdm

from dataprep.stages.common import Item, StageError, batched, require_keys, resolve_device

log = logging.getLogger(__name__)

STAGE = "noun_phrases"
NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})


@dataclass
class NounPhrasesConfig:
    model: str = "flair/pos-english"  # flair model name or local path of a saved SequenceTagger (.pt)
    batch_size: int = 64  # captions per tagger call


class TaggedToken(NamedTuple):
    text: str
    tag: str
    start: int  # character offset of the token in the caption
    end: int  # exclusive end offset


class PosTagger(Protocol):
    def tag(self, captions: list[str]) -> list[list[TaggedToken]]:
        """One list of tagged tokens per caption, in caption order."""
        ...


class NounPhraseExtractor(Protocol):
    def extract(self, captions: list[str]) -> list[list[str]]:
        """One list of noun phrases per caption."""
        ...


def merge_noun_runs(caption: str, tokens: Sequence[TaggedToken]) -> list[str]:
    """Maximal runs of noun-tagged tokens -> caption substrings, deduplicated, in caption order."""
    phrases: list[str] = []
    seen: set[str] = set()
    run: list[TaggedToken] = []

    def flush() -> None:
        if not run:
            return
        text = caption[run[0].start : run[-1].end].strip()
        norm = " ".join(text.lower().split())
        if text and norm not in seen:
            seen.add(norm)
            phrases.append(text)
        run.clear()

    for tok in tokens:
        if tok.tag in NOUN_TAGS:
            run.append(tok)
        else:
            flush()
    flush()
    return phrases


class TaggerNounPhraseExtractor:
    """NounPhraseExtractor on top of any PosTagger."""

    def __init__(self, tagger: PosTagger) -> None:
        self.tagger = tagger

    def extract(self, captions: list[str]) -> list[list[str]]:
        tagged = self.tagger.tag(captions)
        if len(tagged) != len(captions):
            raise StageError(f"POS tagger returned {len(tagged)} results for {len(captions)} captions")
        return [merge_noun_runs(c, toks) for c, toks in zip(captions, tagged)]


class FlairPosTagger:
    """flair SequenceTagger, loaded once (`SequenceTagger.load` accepts a hub name or a local file)."""

    def __init__(self, model: str = "flair/pos-english", device: str = "auto", batch_size: int = 64) -> None:
        import flair
        from flair.models import SequenceTagger

        flair.device = resolve_device(device)
        try:
            self.tagger = SequenceTagger.load(model)
        except Exception as exc:  # noqa: BLE001 - flair raises several types for a missing / bad model
            raise StageError(f"config 'noun_phrases.model': cannot load flair tagger {model!r}: {exc}") from exc
        self.label_type = self.tagger.label_type
        self.batch_size = batch_size
        self.name = model

    def tag(self, captions: list[str]) -> list[list[TaggedToken]]:
        from flair.data import Sentence

        sentences = [Sentence(c) for c in captions]
        nonempty = [s for s in sentences if len(s) > 0]
        if nonempty:
            self.tagger.predict(nonempty, mini_batch_size=self.batch_size, label_name=self.label_type)
        return [
            [
                TaggedToken(t.text, t.get_label(self.label_type).value, t.start_position, t.end_position)
                for t in sentence
            ]
            for sentence in sentences
        ]


def extract_noun_phrases(
    items: Sequence[Item], extractor: NounPhraseExtractor, batch_size: int = 64, progress: bool = True
) -> list[Item]:
    """Return copies of `items` with "phrases" extracted from each item's "caption"."""
    out = [dict(it) for it in items]
    for it in out:
        require_keys(it, ("id", "caption"), STAGE)
    bar = tqdm(total=len(out), desc="noun phrases", unit="cap", disable=not progress)
    for batch in batched(out, batch_size):
        phrases = extractor.extract([it["caption"] for it in batch])
        if len(phrases) != len(batch):
            raise StageError(f"noun-phrase extractor returned {len(phrases)} results for {len(batch)} captions")
        for it, ps in zip(batch, phrases):
            it["phrases"] = list(ps)
        bar.update(len(batch))
    bar.close()
    return out
