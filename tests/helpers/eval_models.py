"""Tiny models for the evaluation tests, built from config objects (random weights) and saved locally.

Each ``build_*`` writes a ``save_pretrained`` directory (model + processor/tokenizer) that the real
loading code (``from_pretrained`` on a directory) then reads; nothing is downloaded. The CLIP BPE
vocabulary comes from open_clip's bundled file (``tcscale.models.tokenizer``); the BLIP text side
uses a small BERT word-piece vocabulary written here.
"""

from __future__ import annotations

import os
import tempfile
from functools import cache
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The shared data directory: ``$TCSCALE_SHARED_DIR``, else ``<repo>/../shared``; missing is an error."""
    path = Path(os.environ.get("TCSCALE_SHARED_DIR") or REPO_ROOT.parent / "shared")
    if not path.is_dir():
        raise FileNotFoundError(f"shared data directory not found: {path} (set TCSCALE_SHARED_DIR)")
    return path


@cache
def _clip_bpe_dir() -> Path:
    from tcscale.models.tokenizer import write_clip_tokenizer_files

    return write_clip_tokenizer_files(Path(tempfile.mkdtemp(prefix="tcscale_eval_bpe_")))


@cache
def clip_tokenizer(model_max_length: int, pad_token: str = "!"):
    """The real CLIP BPE tokenizer (offline; one instance per arguments, do not modify it). OWL models pad
    with "!" (id 0), as the hub's OWL tokenizers do."""
    from transformers import CLIPTokenizer

    d = _clip_bpe_dir()
    return CLIPTokenizer(
        vocab_file=str(d / "vocab.json"),
        merges_file=str(d / "merges.txt"),
        model_max_length=model_max_length,
        pad_token=pad_token,
    )


_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8)


def build_tiny_owlv2(out_dir: str | os.PathLike, image_size: int = 32, seed: int = 0) -> Path:
    """A random-weight Owlv2ForObjectDetection (2-layer 32-wide towers, 16 patches) + Owlv2Processor."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(seed)
    config = Owlv2Config(
        text_config=dict(_TEXT, max_position_embeddings=16),
        vision_config=dict(_VISION, image_size=image_size),
        projection_dim=32,
    )
    out = Path(out_dir)
    Owlv2ForObjectDetection(config).eval().save_pretrained(out)
    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=image_processor, tokenizer=clip_tokenizer(16)).save_pretrained(out)
    return out


def build_tiny_owlvit(out_dir: str | os.PathLike, image_size: int = 32, seed: int = 0) -> Path:
    """A random-weight OwlViTForObjectDetection + OwlViTProcessor, same tiny towers."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    torch.manual_seed(seed)
    config = OwlViTConfig(
        text_config=dict(_TEXT, max_position_embeddings=16),
        vision_config=dict(_VISION, image_size=image_size),
        projection_dim=32,
    )
    out = Path(out_dir)
    OwlViTForObjectDetection(config).eval().save_pretrained(out)
    size = {"height": image_size, "width": image_size}
    image_processor = OwlViTImageProcessor(size=size, crop_size=size)
    OwlViTProcessor(image_processor=image_processor, tokenizer=clip_tokenizer(16)).save_pretrained(out)
    return out


_BERT_WORDS = "a photo of cat dog and the on with red blue green two in sitting table".split()


def build_tiny_blip(out_dir: str | os.PathLike, image_size: int = 32, seed: int = 0) -> Path:
    """A random-weight BlipForConditionalGeneration + BlipProcessor (BERT tokenizer over a 21-token vocabulary)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + _BERT_WORDS
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(vocab_file), bos_token="[DEC]")
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=vocab.index("[DEC]"),
            eos_token_id=vocab.index("[SEP]"),
            sep_token_id=vocab.index("[SEP]"),
            pad_token_id=0,
        ),
        vision_config=dict(_VISION, image_size=image_size),
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).eval().save_pretrained(out)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A random-weight CLIPModel (tiny towers, 77-token text) + the real CLIP BPE tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(_TEXT, max_position_embeddings=77),
        vision_config=dict(_VISION, image_size=32),
        projection_dim=24,
    )
    out = Path(out_dir)
    CLIPModel(config).eval().save_pretrained(out)
    clip_tokenizer(77, pad_token="<|endoftext|>").save_pretrained(out)
    return out


class TinyConvFeatures(torch.nn.Module):
    """A fixed random conv net standing in for Inception: float (N, 3, 299, 299) in [0, 255] -> (N, 16)."""

    def __init__(self, seed: int = 0, dim: int = 16):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.conv2 = torch.nn.Conv2d(8, dim, 3, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x / 128.0 - 1.0))
        return torch.relu(self.conv2(h)).mean(dim=(2, 3))
