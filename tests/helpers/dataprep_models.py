"""Tiny, random-init stand-ins for the dataprep models, saved in each library's own format.

Nothing is downloaded: every model is built from a config, saved locally and then loaded back by the
dataprep stages through the same code path as the real checkpoints (`CLIPModel.from_pretrained(dir)`,
`SequenceTagger.load(path)`, Grounding DINO's `SLConfig.fromfile` + `torch.load(checkpoint)`,
`sam_model_registry[...](checkpoint=path)`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from tcscale.models.tokenizer import write_clip_tokenizer_files

# Words the test captions use; BERT's WordPiece falls back to single letters ("##x") for anything else.
_BERT_WORDS = (
    "a an the of on in with and at by to is are sits sitting lying standing astronaut cat cup coffee rocket "
    "blanket table saucer spoon flag suit space launch pad tower sky smoke white red brown orange small big "
    "tabby mug wooden plate person man woman dog"
).split()


@dataclass(frozen=True)
class TinyModels:
    """Paths of the locally saved tiny models."""

    bert_dir: Path  # transformers BERT dir (Grounding DINO's text encoder and the flair tagger's embeddings)
    clip_dir: Path  # transformers CLIPModel + CLIPProcessor dir
    flair_tagger: Path  # flair SequenceTagger file (.pt)
    gdino_config: Path  # the package's own GroundingDINO_SwinT_OGC.py (text encoder overridden with bert_dir)
    gdino_checkpoint: Path  # {"model": state_dict} as the official checkpoints are stored
    sam_checkpoint: Path  # SAM-HQ vit_tiny state dict
    sam_model_type: str = "vit_tiny"


def write_tiny_bert(out_dir: Path) -> Path:
    """A 2-layer, 32-wide uncased BERT with a small WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "!", "'", "-"]
    vocab += letters + ["##" + c for c in letters] + _BERT_WORDS
    (out_dir / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizer(str(out_dir / "vocab.txt"), do_lower_case=True).save_pretrained(out_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(dict.fromkeys(vocab)),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(out_dir)
    return out_dir


def write_tiny_clip(out_dir: Path) -> Path:
    """transformers CLIPModel (tiny text + vision towers) with the real CLIP tokenizer and a 32-px processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer_files(out_dir)  # the real CLIP BPE, from the file open_clip ships
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out_dir)
    return out_dir


# Penn Treebank tags: the tiny tagger can emit any of them, so a random model still produces nouns.
_PTB_TAGS = (
    "CC CD DT EX FW IN JJ JJR JJS LS MD NN NNS NNP NNPS PDT POS PRP PRP$ RB RBR RBS RP SYM TO UH VB VBD VBG VBN "
    "VBP VBZ WDT WP WP$ WRB , . : HYPH"
).split()


def write_tiny_flair_tagger(path: Path, bert_dir: Path) -> Path:
    """A flair SequenceTagger (label type "pos", like flair/pos-english) on the tiny BERT's word embeddings."""
    from flair.data import Dictionary
    from flair.embeddings import TransformerWordEmbeddings
    from flair.models import SequenceTagger

    tags = Dictionary(add_unk=False)
    for tag in _PTB_TAGS:
        tags.add_item(tag)
    torch.manual_seed(0)
    embeddings = TransformerWordEmbeddings(str(bert_dir), layers="-1", fine_tune=False)
    tagger = SequenceTagger(
        embeddings=embeddings,
        tag_dictionary=tags,
        tag_type="pos",
        use_rnn=False,
        use_crf=False,
        reproject_embeddings=False,
    )
    _fit_linear_head(tagger)
    path.parent.mkdir(parents=True, exist_ok=True)
    tagger.save(path)
    return path


# Gold POS tags of a few test-like captions: a few Adam steps on the tagger's output layer (embeddings frozen) make
# the random-embedding tagger emit nouns on such captions, so the end-to-end test grounds real phrases.
_GOLD_POS = (
    ("a tabby cat lying on a blanket", "DT JJ NN VBG IN DT NN"),
    ("an astronaut in a white space suit", "DT NN IN DT JJ NN NN"),
    ("a rocket on the launch pad with smoke", "DT NN IN DT NN NN IN NN"),
    ("a cup of coffee on a saucer", "DT NN IN NN IN DT NN"),
)


def _fit_linear_head(tagger, steps: int = 100) -> None:
    from flair.data import Sentence

    sentences = []
    for text, tags in _GOLD_POS:
        sentence = Sentence(text)
        for token, tag in zip(sentence, tags.split()):
            token.add_label("pos", tag)
        sentences.append(sentence)
    optimizer = torch.optim.Adam(tagger.linear.parameters(), lr=0.05)
    tagger.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _count = tagger.forward_loss(sentences)
        loss.backward()
        optimizer.step()
    tagger.eval()
    for sentence in sentences:
        sentence.clear_embeddings()


def write_tiny_grounding_dino(out_dir: Path, bert_dir: Path) -> tuple[Path, Path]:
    """Grounding DINO built from the package's own SwinT-OGC config with the text encoder set to the tiny BERT
    (what `grounding.text_encoder` does at load time). Random init; only the BERT is tiny.

    Returns (config .py, checkpoint). The checkpoint is stored as the official ones are: {"model": state_dict}.
    """
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.find_spec("groundingdino")
    assert spec is not None and spec.origin is not None, "groundingdino-py is not installed"
    config_path = Path(spec.origin).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    args = SLConfig.fromfile(str(config_path))
    args.text_encoder_type = str(bert_dir)
    args.device = "cpu"
    torch.manual_seed(0)
    model = build_model(args)
    checkpoint_path = out_dir / "groundingdino_tiny.pth"
    torch.save({"model": model.state_dict()}, checkpoint_path)
    return config_path, checkpoint_path


def write_tiny_sam_hq(path: Path, model_type: str = "vit_tiny") -> Path:
    """A random-init SAM-HQ state dict of `model_type`, loadable through `sam_model_registry[model_type]`."""
    from segment_anything_hq import sam_model_registry

    torch.manual_seed(0)
    model = sam_model_registry[model_type](checkpoint=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def build_tiny_models(root: Path) -> TinyModels:
    """Build and save every tiny model under `root`."""
    bert_dir = write_tiny_bert(root / "bert")
    gdino_config, gdino_checkpoint = write_tiny_grounding_dino(root / "groundingdino", bert_dir)
    return TinyModels(
        bert_dir=bert_dir,
        clip_dir=write_tiny_clip(root / "clip"),
        flair_tagger=write_tiny_flair_tagger(root / "flair" / "pos-tiny.pt", bert_dir),
        gdino_config=gdino_config,
        gdino_checkpoint=gdino_checkpoint,
        sam_checkpoint=write_tiny_sam_hq(root / "sam_hq_vit_tiny.pth"),
    )


# Real photos shipped with scikit-image, with captions written for them.
PHOTOS = {
    "astronaut": ("astronaut", ["an astronaut in a white space suit", "a woman with a flag"]),
    "chelsea": ("chelsea", ["a tabby cat lying on a blanket"]),
    "coffee": ("coffee", ["a cup of coffee on a saucer", "a red cup on a wooden table", "coffee"]),
}


def write_photos(folder: Path, names: tuple[str, ...] = ("astronaut", "chelsea", "coffee")) -> list[Path]:
    """Save skimage photos as JPEG files; returns their paths."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.jpg"
        if not path.exists():
            Image.fromarray(getattr(data, PHOTOS[name][0])()).save(path, quality=90)
        paths.append(path)
    return paths
