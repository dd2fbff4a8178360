"""Caption tokenization and phrase -> token-position alignment with the model's own tokenizer.

A phrase's token positions are all BPE tokens of the phrase at its first occurrence in the
tokenized caption, matched case-insensitively on whole words ("wine glass" -> [wine</w>, glass</w>];
"glass" never matches the tail of "eyeglass"). A phrase that cannot be aligned is dropped with a
reason, never asserted:

* ``not_found``  the phrase's tokens do not occur in the caption's tokens;
* ``truncated``  they occur only beyond the tokenizer's max_length (cut away by truncation);
* ``overlap``    its first occurrence shares tokens with an earlier phrase (a token carries one phrase);
* ``empty``      the phrase tokenizes to nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

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

    def __init__(self, tokenizer, max_length: int = 77, cache_size: int = 4096):
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
            full = self.tokenizer(caption, add_special_tokens=False, truncation=False).input_ids
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
        positions: list[list[int] | None] = []
        reasons: list[str | None] = []
        for phrase in phrases:
            pid = self.phrase_ids(phrase)
            if not pid:
                positions.append(None)
                reasons.append("empty")
                continue
            start = self._find(full, tokens, pid, word_marks)
            if start is None:
                positions.append(None)
                reasons.append("not_found")
                continue
            if start + len(pid) > n_kept:
                positions.append(None)
                reasons.append("truncated")
                continue
            pos = [offset + start + k for k in range(len(pid))]
            if claimed.intersection(pos):
                positions.append(None)
                reasons.append("overlap")
                continue
            claimed.update(pos)
            positions.append(pos)
            reasons.append(None)
        return Alignment(input_ids=list(ids), positions=positions, reasons=reasons)

    @staticmethod
    def _find(full: list[int], tokens: list[str], pid: list[int], word_marks: bool) -> int | None:
        n, m = len(full), len(pid)
        first = pid[0]
        for s in range(n - m + 1):
            if full[s] != first or full[s : s + m] != pid:
                continue
            if word_marks and s > 0 and not tokens[s - 1].endswith("</w>"):
                continue  # would start inside a word
            return s
        return None
