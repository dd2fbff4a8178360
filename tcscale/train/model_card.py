"""The model card (`README.md`) an export carries: what the weights are and how they were made.

Hugging Face's card layout: YAML front matter (`library_name`, `base_model`, `tags`) that the hub and `huggingface_hub`
read, then prose: base model, objective and its options, which weights (trained or EMA), steps, data, batch and
optimizer, evaluation results when given (an evaluation's `results.json`), and the run's merged config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tcscale.config import TrainConfig, config_to_dict


@dataclass
class CardFacts:
    """What the card states besides the config."""

    run_dir: str
    tag: str
    what: str  # "pipeline" | "LoRA adapter" | "merged LoRA pipeline" | "text encoder"
    weights: str  # which weights: trained or EMA (with its decay and updates)
    eval_results: list[dict[str, Any]] = field(default_factory=list)


def read_eval_results(paths: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """The `results.json` files of evaluations (tcscale.eval), to list in the card."""
    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"--eval-results {p}: no results.json there")
        out.append(json.loads(path.read_text()))
    return out


def _step(tag: str) -> str:
    return tag[4:] if tag.startswith("step") and tag[4:].isdigit() else "?"


def _data_line(cfg: TrainConfig) -> str:
    data = cfg.data
    if data.source == "synthetic":
        return f"the built-in synthetic shapes world ({data.synthetic.num_samples} samples), {data.resolution} px"
    return f"WebDataset shards `{data.shards}`, {data.resolution} px"


def model_card(cfg: TrainConfig, facts: CardFacts) -> str:
    """The card's text (Markdown with YAML front matter)."""
    base = cfg.model.pretrained or "tiny random-init models (the run's base_model/)"
    objective = cfg.objective.name
    options = config_to_dict(cfg)["objective"].get(objective, {})
    ds = cfg.deepspeed
    micro, accum = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps")
    opt = ds.get("optimizer") or {}
    front = {
        "library_name": "diffusers",
        "tags": ["tcscale", objective, "stable-diffusion-xl" if cfg.model.family == "sdxl" else "stable-diffusion"],
    }
    if cfg.model.pretrained:
        front["base_model"] = cfg.model.pretrained
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {cfg.run_name} ({facts.what})",
        "",
        f"Finetuned with tcscale from `{facts.run_dir}`, checkpoint `{facts.tag}`.",
        "",
        f"* **Base model**: `{base}` (family `{cfg.model.family}`)",
        f"* **Objective**: `{objective}`, options `{json.dumps(options, sort_keys=True)}`",
        f"* **Weights**: {facts.weights}",
        f"* **Steps**: {_step(facts.tag)} optimizer steps (of max_steps {cfg.max_steps})",
        f"* **Data**: {_data_line(cfg)}",
        f"* **Batch**: micro-batch {micro} x accumulation {accum} per rank"
        + (f"; the recipe's global batch {cfg.batch.global_size}" if cfg.batch.global_size else ""),
        f"* **Optimizer**: {opt.get('type', '?')} {json.dumps(opt.get('params', {}), sort_keys=True)}",
    ]
    if cfg.model.lora is not None:
        lora = cfg.model.lora
        lines.append(f"* **LoRA**: rank {lora.rank}, alpha {lora.alpha or lora.rank}, targets {lora.target_modules}")
    lines += ["", "## Evaluation", ""]
    if facts.eval_results:
        lines += ["| evaluation | metric | value |", "|---|---|---|"]
        for res in facts.eval_results:
            for key, value in sorted((res.get("metrics") or {}).items()):
                shown = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
                lines.append(f"| {res.get('name', '?')} | `{key}` | {shown} |")
    else:
        lines.append("No evaluation results were given to the export (`launchers/export.py --eval-results`).")
    lines += [
        "",
        "## Config",
        "",
        "The run's merged config (`tcscale_config.yaml` beside this card):",
        "",
        "```yaml",
        yaml.safe_dump(config_to_dict(cfg), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(out_dir: Path, cfg: TrainConfig, facts: CardFacts) -> None:
    """README.md and tcscale_config.yaml into an export directory being written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "README.md").write_text(model_card(cfg, facts))
    (out_dir / "tcscale_config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
