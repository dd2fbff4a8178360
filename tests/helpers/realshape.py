"""Released-shape models with random weights, saved locally, and measured subprocess runs (tests/test_realshape.py).

* `save_random_pipeline(name, out)`: `build_random_components(name)` (SD1.4 / SD2.1 / SDXL-base shapes) written by
  `save_pipeline_dir` with the real CLIP tokenizers, so `model.pretrained=<out>` goes through `from_pretrained`
  exactly as a hub checkpoint does. Weights are stored in fp16 (the released checkpoints' `fp16` variant) to halve
  the disk and write time; `from_pretrained` without a dtype loads them into fp32 modules, as it loads the fp32
  release.
* `save_clip_vit_l14`, `save_owlv2_large`, `save_owlvit_base32`: CLIP ViT-L/14 (the text-encoder stage's image
  tower), OWLv2 large patch14 ensemble and OWL-ViT base patch32 (the paper evaluation's detectors) at the hub
  configs' shapes, random weights, with their processors.
* `run_measured(cmd)`: a subprocess with its wall time and the peak resident set of its largest process (the
  launcher's workers included: `wait4` reports the maximum over the waited-for process tree).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.helpers.memory_lock import heavy_memory

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3


def _half(module: torch.nn.Module) -> torch.nn.Module:
    return module.to(torch.float16)


def save_random_pipeline(name: str, out: Path, resolution: int) -> Path:
    """A StableDiffusion(XL)Pipeline directory of architecture `name` with random weights (seed 0)."""
    from tcscale.models.architectures import build_random_components
    from tcscale.models.sd import save_pipeline_dir
    from tcscale.models.tokenizer import sd_clip_tokenizer, sdxl_second_tokenizer

    comps = build_random_components(name, resolution, tokenizer=sd_clip_tokenizer())
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(comps, part, None) is not None:
            setattr(comps, part, _half(getattr(comps, part)))
    if comps.text_encoder_2 is not None:
        comps.tokenizer_2 = sdxl_second_tokenizer()
    save_pipeline_dir(comps, out)
    del comps
    return out


def save_clip_vit_l14(out: Path) -> Path:
    """openai/clip-vit-large-patch14's shapes: ViT-L/14 at 224 px, 12-layer 768-wide text tower, projection 768."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tests.helpers.eval_models import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=768,
    )  # fmt: skip
    _half(CLIPModel(config)).save_pretrained(out)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=processor, tokenizer=clip_tokenizer(77, "<|endoftext|>")).save_pretrained(out)
    return out


def save_owlv2_large(out: Path) -> Path:
    """google/owlv2-large-patch14-ensemble's shapes: ViT-L/14 at 960 px (68² patches), text 12 x 768, proj 768."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from tests.helpers.eval_models import clip_tokenizer

    torch.manual_seed(0)
    config = Owlv2Config(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=960, patch_size=14),
        projection_dim=768,
    )  # fmt: skip
    _half(Owlv2ForObjectDetection(config)).save_pretrained(out)
    processor = Owlv2ImageProcessor(size={"height": 960, "width": 960})
    Owlv2Processor(image_processor=processor, tokenizer=clip_tokenizer(16)).save_pretrained(out)
    return out


def save_owlvit_base32(out: Path) -> Path:
    """google/owlvit-base-patch32's shapes: ViT-B/32 at 768 px (24² patches), text 12 x 512, projection 512."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    from tests.helpers.eval_models import clip_tokenizer

    torch.manual_seed(0)
    config = OwlViTConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=768, patch_size=32),
        projection_dim=512,
    )  # fmt: skip
    _half(OwlViTForObjectDetection(config)).save_pretrained(out)
    size = {"height": 768, "width": 768}
    processor = OwlViTImageProcessor(size=size, crop_size=size)
    OwlViTProcessor(image_processor=processor, tokenizer=clip_tokenizer(16)).save_pretrained(out)
    return out


@dataclass
class Measured:
    what: str
    returncode: int
    output: str
    wall_s: float
    peak_rss_gib: float

    def check(self) -> Measured:
        if self.returncode != 0:
            raise AssertionError(f"{self.what} failed (exit {self.returncode}):\n{self.output[-6000:]}")
        return self


def record(what: str, wall_s: float, peak_rss_gib: float, cpu_s: float) -> None:
    """Append one measurement to $TCSCALE_REALSHAPE_LOG (JSON lines) when it is set. `cpu_s` (user + system of the
    process tree) is about the wall time on an idle machine: the runs are single-threaded (OMP_NUM_THREADS=1)."""
    log = os.environ.get("TCSCALE_REALSHAPE_LOG")
    if log:
        entry = {
            "what": what,
            "wall_s": round(wall_s, 1),
            "cpu_s": round(cpu_s, 1),
            "peak_rss_gib": round(peak_rss_gib, 2),
        }
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")


def run_measured(what: str, cmd: list[str], env: dict[str, str], timeout: float = 900) -> Measured:
    """Run `cmd` in its own process group from the repository root, holding the heavy-memory lock
    (tests/helpers/memory_lock.py); kill the group after `timeout` seconds."""
    import tempfile

    with heavy_memory(), tempfile.TemporaryFile(mode="w+") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
        log.seek(0)
        output = log.read()
    peak = usage.ru_maxrss * 1024 / GIB  # Linux: KiB
    record(what, wall, peak, usage.ru_utime + usage.ru_stime)
    return Measured(what, proc.returncode, output, wall, peak)
