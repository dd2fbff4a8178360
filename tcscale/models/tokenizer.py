"""The SD1.x CLIP tokenizer built offline from the BPE vocabulary that ships inside open_clip_torch.

SD1.x uses OpenAI CLIP's BPE (49,408 tokens). open_clip bundles the same merges file, so a
`transformers.CLIPTokenizer` written from it tokenizes exactly like the hub's
`openai/clip-vit-large-patch14` tokenizer without any download.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer


def open_clip_bpe_path() -> Path:
    """Path of open_clip's bundled bpe_simple_vocab_16e6.txt.gz (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed: it ships the CLIP BPE vocabulary tcscale needs")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write vocab.json + merges.txt of the SD1.x CLIP tokenizer into out_dir and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]  # the same slice CLIP's own tokenizer takes
    merge_pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(pair) for pair in merge_pairs)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in merge_pairs) + "\n")
    return out


def save_clip_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 77) -> CLIPTokenizer:
    """Build the SD1.x tokenizer and save it in transformers format (as a pipeline's tokenizer/ subfolder)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp)
        tok = CLIPTokenizer(
            vocab_file=str(Path(tmp) / "vocab.json"),
            merges_file=str(Path(tmp) / "merges.txt"),
            model_max_length=model_max_length,
            pad_token="<|endoftext|>",
        )
    tok.save_pretrained(str(out_dir))
    return tok


@lru_cache(maxsize=2)
def sd_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The SD1.x CLIP tokenizer (cached per process)."""
    cache = Path(tempfile.gettempdir()) / f"tcscale_clip_tokenizer_{model_max_length}"
    if not (cache / "tokenizer_config.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
        save_clip_tokenizer(tmp, model_max_length)
        try:
            os.replace(tmp, cache)  # atomic publish; another process may have won the race
        except OSError:
            pass
    return CLIPTokenizer.from_pretrained(str(cache))


@lru_cache(maxsize=2)
def sdxl_second_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """SDXL's tokenizer_2 (OpenCLIP ViT-bigG): the same BPE, BOS and EOS as `sd_clip_tokenizer`, padded with "!"
    (id 0) instead of EOS, as stabilityai/stable-diffusion-xl-base-1.0's tokenizer_2 is."""
    sd_clip_tokenizer(model_max_length)  # writes the cached files
    cache = Path(tempfile.gettempdir()) / f"tcscale_clip_tokenizer_{model_max_length}"
    return CLIPTokenizer.from_pretrained(str(cache), pad_token="!")
