"""Reference numbers from the papers (docs/DESIGN.md §8), keyed by the MLflow metric names of results.json.

These are the *papers'* numbers, printed by ``python -m tcscale.eval.compare`` in rows labelled
"paper: ...", never mixed with measured ones. Sources:

* TokenCompose (Wang et al., CVPR 2024), Table 1: MultiGen MG2–MG5 on COCO and ADE20K, VISOR object
  accuracy, FID on 10k COCO val2017 captions, for SD1.4 and TokenCompose (SD1.4 finetuned).
* TokenCompose Table 4: grounding mIoU with DAAM on COCO-Gen — SD1.4 frozen, LDM-only finetune,
  TokenCompose.
* VISOR (Gokhale et al. 2022), the microsoft/VISOR README table, row "SD" (whose OA, 29.86, is the
  SD1.4 object accuracy TokenCompose reports): VISOR_uncond, VISOR_cond, VISOR_1..4.
"""

from __future__ import annotations

PAPER_ROWS: dict[str, dict[str, float]] = {
    "paper: SD1.4 (TokenCompose Tab. 1, 4; VISOR)": {
        "multigen/coco/MG2": 90.72,
        "multigen/coco/MG3": 50.74,
        "multigen/coco/MG4": 11.68,
        "multigen/coco/MG5": 0.88,
        "multigen/ade20k/MG2": 89.81,
        "multigen/ade20k/MG3": 53.96,
        "multigen/ade20k/MG4": 16.52,
        "multigen/ade20k/MG5": 1.89,
        "visor/OA": 29.86,
        "visor/uncond": 18.81,
        "visor/cond": 62.98,
        "visor/VISOR_1": 46.60,
        "visor/VISOR_2": 20.11,
        "visor/VISOR_3": 6.89,
        "visor/VISOR_4": 1.63,
        "fid/coco10k": 20.88,
        "grounding/miou": 0.5371,
    },
    "paper: SD1.4 LDM-only finetune (TokenCompose Tab. 4)": {
        "grounding/miou": 0.5412,
    },
    "paper: TokenCompose SD1.4 (TokenCompose Tab. 1, 4)": {
        "multigen/coco/MG2": 98.08,
        "multigen/coco/MG3": 76.16,
        "multigen/coco/MG4": 28.81,
        "multigen/coco/MG5": 3.28,
        "multigen/ade20k/MG2": 97.75,
        "multigen/ade20k/MG3": 76.93,
        "multigen/ade20k/MG4": 33.92,
        "multigen/ade20k/MG5": 6.21,
        "visor/OA": 52.15,
        "fid/coco10k": 20.19,
        "grounding/miou": 0.5876,
    },
}
"""{row label: {metric name: value}}; MultiGen and VISOR in percent, FID unitless, mIoU in [0, 1]."""

__all__ = ["PAPER_ROWS"]
