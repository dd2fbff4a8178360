"""Caption tokenization and phrase -> token-position alignment with the model's own tokenizer.

A phrase's token positions are all BPE tokens of the phrase at its first occurrence in the
tokenized caption, matched case-insensitively on whole words ("wine glass" -> [wine</w>, glass</w>];
"glass" never matches the tail of "eyeglass"). A phrase that cannot be aligned is dropped with a
reason, never asserted:

* ``not_found``  the phrase's tokens do not occur in the caption's tokens;
* ``truncated``  they occur only beyond the tokenizer's max_length (cut away by truncation);
* ``overlap``    every occurrence shares tokens with another phrase (a token carries one phrase: longer
                 phrases claim first, and a phrase whose first occurrence is taken uses its next free one);
* ``empty``      the phrase tokenizes to nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DROP_REASONS = ("not_found", "truncated", "overlap", "empty")


@dataclass
class Alignment:
    input_ids: list[int]  # max_length ids (padded, truncated)
    positions: list[list[int] | None]  # per phrase: token positions in input_ids, or None when dropped
    reasons: list[str | None] = field(default_factory=list)  # per phrase: None or a DROP_REASONS entry


class _LRU(OrderedDict):
    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def put(self, key, value):
        self[key] = value
        if len(self) > self.maxsize:
            self.popitem(last=False)


class PhraseAligner:
    """Tokenizes captions (max_length, padding="max_length", truncation) and aligns phrases to tokens.

    Works with any Hugging Face BPE tokenizer whose word-final tokens end with "</w>" (CLIP, SD1.x/2.x);
    for other tokenizers the whole-word check is skipped. Results are cached per caption and phrase.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 77, cache_size: int = 4096):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._captions = _LRU(cache_size)
        self._phrases = _LRU(cache_size)
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id

    def __getstate__(self):  # caches are per process
        state = dict(self.__dict__)
        state["_captions"] = _LRU(self._captions.maxsize)
        state["_phrases"] = _LRU(self._phrases.maxsize)
        return state

    def _content(self, caption: str) -> tuple[list[int], list[int], list[str]]:
        """(padded ids, untruncated content ids, untruncated content tokens) of a caption."""
        hit = self._captions.get(caption)
        if hit is None:
            ids = self.tokenizer(caption, max_length=self.max_length, padding="max_length", truncation=True).input_ids
            # the whole caption, to tell phrases beyond max_length apart: tokenize() does not warn that a caption
            # over 77 tokens "will result in indexing errors" (nothing indexes a model with these ids)
            full = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(caption))
            hit = (list(ids), list(full), self.tokenizer.convert_ids_to_tokens(full))
            self._captions.put(caption, hit)
        return hit

    def phrase_ids(self, phrase: str) -> list[int]:
        hit = self._phrases.get(phrase)
        if hit is None:
            hit = list(self.tokenizer(phrase.lower().strip(), add_special_tokens=False, truncation=False).input_ids)
            self._phrases.put(phrase, hit)
        return hit

    def tokenize(self, caption: str) -> list[int]:
        return list(self._content(caption)[0])

    def align(self, caption: str, phrases: list[str]) -> Alignment:
        """Token positions of each phrase in the tokenized caption (see the module docstring)."""
        ids, full, tokens = self._content(caption)
        word_marks = any(t.endswith("</w>") for t in tokens)
        # content positions in input_ids are 1..n_kept (position 0 is <|startoftext|>)
        has_bos = self.bos_id is not None and ids and ids[0] == self.bos_id
        offset = 1 if has_bos else 0
        n_kept = min(len(full), self.max_length - offset - 1)
        claimed: set[int] = set()
        positions: list[list[int] | None] = [None] * len(phrases)
        reasons: list[str | None] = [None] * len(phrases)
        pids = [self.phrase_ids(p) for p in phrases]
        # longer phrases claim their tokens first ("microwave oven" before "oven"); a phrase whose first
        # occurrence is already claimed takes its next unclaimed occurrence ("Dog ... the dog")
        for i in sorted(range(len(phrases)), key=lambda k: -len(pids[k])):
            pid = pids[i]
            if not pid:
                reasons[i] = "empty"
                continue
            start, reason = -1, "not_found"
            while True:
                start = self._find(full, tokens, pid, word_marks, start + 1)
                if start is None:
                    break
                if start + len(pid) > n_kept:
                    reason = "truncated" if reason == "not_found" else reason
                    break
                pos = [offset + start + k for k in range(len(pid))]
                if claimed.intersection(pos):
                    reason = "overlap"
                    continue
                claimed.update(pos)
                positions[i], reason = pos, None
                break
            reasons[i] = reason
        return Alignment(input_ids=list(ids), positions=positions, reasons=reasons)

    def first_occurrence(self, caption: str, phrase: str) -> list[int] | None:
        """Token positions (in input_ids) of the phrase's first whole-word occurrence in the caption, ignoring
        what other phrases claim; None when it does not occur within max_length."""
        ids, full, tokens = self._content(caption)
        pid = self.phrase_ids(phrase)
        start = self._find(full, tokens, pid, any(t.endswith("</w>") for t in tokens)) if pid else None
        offset = 1 if self.bos_id is not None and ids and ids[0] == self.bos_id else 0
        if start is None or start + len(pid) > min(len(full), self.max_length - offset - 1):
            return None
        return [offset + start + k for k in range(len(pid))]

    @staticmethod
    def _find(full: list[int], tokens: list[str], pid: list[int], word_marks: bool, begin: int = 0) -> int | None:
        s = begin
        while (s := find_subsequence(full, pid, s)) is not None:
            if not (word_marks and s > 0 and not tokens[s - 1].endswith("</w>")):  # not starting inside a word
                return s
            s += 1
        return None


def find_subsequence(ids: Sequence[int], sub: Sequence[int], start: int = 0) -> int | None:
    """Index of the first occurrence of ``sub`` in ``ids`` at or after ``start``, else None."""
    n = len(sub)
    if n == 0:
        return None
    sub = list(sub)
    for i in range(start, len(ids) - n + 1):
        if ids[i] == sub[0] and list(ids[i : i + n]) == sub:
            return i
    return None
