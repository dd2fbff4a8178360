"""The tiny SD3 models' T5 tokenizer, built offline: a sentencepiece-style Unigram model written from a word list.

SD3's third tokenizer is T5's sentencepiece Unigram model (32,128 pieces, ``▁`` marks a word start, ``</s>`` appended,
``<pad>`` id 0, ``</s>`` id 1, ``<unk>`` id 2). No package on this machine ships that model and the hub is out of
reach, so the tiny SD3 models use a tokenizer of the same kind written here with the `tokenizers` library (no
training run, so it is the same on every machine): the special pieces at T5's ids; one ``▁word`` piece per word of
the synthetic shapes world's captions (tcscale.data.synthetic), scored above everything else so Viterbi keeps a known
word whole; and single characters (``▁`` + letters, digits, punctuation) at a low score so any other text still
tokenizes, character by character. Wrapped as a `transformers.T5TokenizerFast` (``extra_ids=0``), it saves as a
``tokenizer.json`` that `StableDiffusion3Pipeline.from_pretrained` loads as its ``tokenizer_3``.

The released SD3 / SD3.5 shapes (`build_released`) take no T5 tokenizer: their benchmarks feed ids directly.
"""

from __future__ import annotations

import os
import string
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import T5TokenizerFast

T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length: what training conditions on
T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
WORD_SCORE, CHAR_SCORE = -1.0, -10.0  # log-probabilities: a known word beats any split of it into characters


def world_words() -> list[str]:
    """The words of the synthetic world's captions and phrases ("a photo of a red circle, a blue square and ...")."""
    from tcscale.data.synthetic import COLOURS, SHAPES

    return sorted({"a", "an", "photo", "of", "and", *COLOURS, *SHAPES})


def build_t5_tokenizer(words: list[str] | None = None, model_max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """A T5TokenizerFast over a Unigram model of `words` (default: the synthetic world's) plus single characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = world_words() if words is None else words
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [(tok, 0.0) for tok in T5_SPECIAL]
    vocab += [(f"\u2581{w}", WORD_SCORE) for w in words]
    vocab += [("\u2581", CHAR_SCORE)] + [(c, CHAR_SCORE) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=T5_SPECIAL.index("<unk>")))
    tok.normalizer = normalizers.Strip()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_SPECIAL.index("</s>"))]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=model_max_length,
    )  # fmt: skip


@lru_cache(maxsize=2)
def tiny_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """`build_t5_tokenizer()` saved once per machine (temp dir, atomic rename) and loaded back, so every process
    reads the same files a saved pipeline holds."""
    cache = Path(tempfile.gettempdir()) / f"tcscale_t5_tokenizer_{model_max_length}"
    if not (cache / "tokenizer.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
        build_t5_tokenizer(model_max_length=model_max_length).save_pretrained(str(tmp))
        try:
            os.replace(tmp, cache)  # another process may have won the race
        except OSError:
            pass
    return T5TokenizerFast.from_pretrained(str(cache))
