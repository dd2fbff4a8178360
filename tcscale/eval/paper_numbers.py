"""Reference numbers from the papers, keyed by the MLflow metric names of results.json, and the protocol behind them.

These are the *papers'* numbers, printed by ``python -m tcscale.eval.compare`` in rows labelled
"paper: ...", never mixed with measured ones; a measured cell whose protocol (``PAPER_PROTOCOLS``) is not the
paper's is marked there with the reason. Sources:

* TokenCompose (Wang et al., CVPR 2024), Table 1 (as reproduced in the README of mlpc-ucsd/TokenCompose):
  MultiGen MG2–MG5 on COCO and ADE20K with their standard deviations over the 10 rounds (``_std``), VISOR object
  accuracy, FID on 10,000 COCO validation image-caption pairs (C) and 1,000 Flickr30K Entities validation pairs
  (F), latency (seconds per image, ± std), for SD1.4 and TokenCompose (SD1.4 finetuned).
* TokenCompose Table 4 (``daam_cocogen/miou``, also shown, marked, beside tcscale's own ``grounding/miou``):
  segmentation mIoU with DAAM on COCO-Gen after null-text inversion — SD1.4 frozen, LDM-only finetune,
  TokenCompose.
* VISOR (Gokhale et al. 2022), the microsoft/VISOR README table, row "SD" (whose OA, 29.86, is the
  SD1.4 object accuracy TokenCompose reports): VISOR_uncond, VISOR_cond, VISOR_1..4.
"""

from __future__ import annotations

from typing import Any


def _mg(prefix: str, *means_stds: tuple[float, float]) -> dict[str, float]:
    """MG2..MG5 of one prompt set, each with its standard deviation over rounds."""
    out: dict[str, float] = {}
    for k, (mean, std) in enumerate(means_stds, start=2):
        out[f"multigen/{prefix}/MG{k}"] = mean
        out[f"multigen/{prefix}/MG{k}_std"] = std
    return out


PAPER_ROWS: dict[str, dict[str, float]] = {
    "paper: SD1.4 (TokenCompose Tab. 1, 4; VISOR)": {
        **_mg("coco", (90.72, 1.33), (50.74, 0.89), (11.68, 0.45), (0.88, 0.21)),
        **_mg("ade20k", (89.81, 0.40), (53.96, 1.14), (16.52, 1.13), (1.89, 0.34)),
        "visor/OA": 29.86,
        "visor/uncond": 18.81,
        "visor/cond": 62.98,
        "visor/VISOR_1": 46.60,
        "visor/VISOR_2": 20.11,
        "visor/VISOR_3": 6.89,
        "visor/VISOR_4": 1.63,
        "fid/coco10k": 20.88,
        "fid/flickr30k1k": 71.46,
        "latency/s_per_image": 7.54,
        "latency/s_per_image_std": 0.17,
        "daam_cocogen/miou": 0.5371,
    },
    "paper: SD1.4 LDM-only finetune (TokenCompose Tab. 4)": {
        "daam_cocogen/miou": 0.5412,
    },
    "paper: TokenCompose SD1.4 (TokenCompose Tab. 1, 4)": {
        **_mg("coco", (98.08, 0.40), (76.16, 1.04), (28.81, 0.95), (3.28, 0.48)),
        **_mg("ade20k", (97.75, 0.34), (76.93, 1.09), (33.92, 1.47), (6.21, 0.62)),
        "visor/OA": 52.15,
        "fid/coco10k": 20.19,
        "fid/flickr30k1k": 71.13,
        "latency/s_per_image": 7.56,
        "latency/s_per_image_std": 0.14,
        "daam_cocogen/miou": 0.5876,
    },
}
"""{row label: {metric name: value}}; MultiGen and VISOR in percent, FID unitless, mIoU in [0, 1]."""

_SAMPLER = "pndm, 50 steps, CFG 7.5, 512 px"  # StableDiffusionPipeline's defaults for SD1.4, as gen_image_dist.py
PAPER_PROTOCOLS: dict[str, dict[str, Any]] = {
    # the official generation (multigen/gen_image_dist.py) loads the pipeline in float32 and calls it with defaults
    "multigen/coco": {"suite": "multigen", "precision": "fp32", "samples": 10000, "sampler": _SAMPLER},
    "multigen/ade20k": {"suite": "multigen", "precision": "fp32", "samples": 10000, "sampler": _SAMPLER},
    # VISOR: 25,280 relation prompts x 4 images; the generation precision is not stated in the sources
    "visor": {"suite": "visor", "precision": None, "samples": 101120, "sampler": None},
    # FID: "10,000 image-caption pairs sampled from the COCO validation set" / 1,000 from Flickr30K Entities val;
    # the FID generation script is not released, so its precision and sampler are not stated
    "fid/coco10k": {"suite": "fid", "precision": None, "samples": 10000, "sampler": None},
    "fid/flickr30k1k": {"suite": "fid_flickr30k", "precision": None, "samples": 1000, "sampler": None},
    # Table 4: DAAM on COCO-Gen after null-text inversion; tcscale's grounding suite is another protocol
    "grounding": {
        "suite": "daam_cocogen",
        "what": "DAAM heat maps on COCO-Gen after null-text inversion",
        "precision": None,
        "samples": None,
        "sampler": None,
    },
    "daam_cocogen": {"suite": "daam_cocogen", "precision": None, "samples": None},
    "latency": {"suite": "latency", "never": "timed on the paper's hardware"},
}
"""{metric prefix: the paper's protocol}: the suite, the sampling precision, the sample count (images or pairs) and
the sampler; None where the paper and its code do not state it (then not checked). "never": a reason no tcscale
measurement is comparable."""

PAPER_ALIASES: dict[str, str] = {"grounding/miou": "daam_cocogen/miou"}
"""{column: paper metric} shown in another suite's column (never as comparable: the suites differ), so that a
grounding mIoU is not read against Table 4 without its mark."""

__all__ = ["PAPER_ROWS", "PAPER_PROTOCOLS", "PAPER_ALIASES"]
