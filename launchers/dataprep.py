"""Grounded-data pipeline entry point (one process; SLURM array tasks each run one shard range).

    python launchers/dataprep.py --config configs/dataprep_grounded_sam.yaml \
        input=data/coco_captions.jsonl work_dir=data/work out_dir=data/shards
    python launchers/dataprep.py --config CFG --stages grounding --shards 0-3      # one stage, four shards
    python launchers/dataprep.py --config CFG --plan                                # shard count + array spec

Flags are shorthands for config keys (`--stages a,b` = `stages=[a,b]`, `--shards 0-3` = `shards=0-3`,
`--device cpu` = `device=cpu`); `key=value` overrides any config key (strict: unknown keys are errors).
Under `sbatch --array`, `SLURM_ARRAY_TASK_ID` selects shards [t*n, (t+1)*n) with n = `shards_per_task`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dataprep.pipeline import STAGES, DataprepConfigError, Pipeline, load_config  # noqa: E402
from dataprep.stages.common import StageError  # noqa: E402
from tcscale.logs import add_log_level_argument  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (keys of dataprep.pipeline.DataprepConfig)")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default: config / all)")
    p.add_argument("--shards", help="shard indices, e.g. 0-9,12 (default: SLURM array range, else all)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--plan", action="store_true", help="print item/shard counts and the sbatch --array spec; exit")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys)")
    add_log_level_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.stages:
        overrides.append(f"stages=[{args.stages}]")
    if args.shards:
        overrides.append(f"shards='{args.shards}'")
    if args.device:
        overrides.append(f"device={args.device}")
    try:
        cfg = load_config(args.config, overrides)
        pipeline = Pipeline(cfg)
        if args.plan:
            tasks = math.ceil(pipeline.num_shards / cfg.shards_per_task)
            plan = {
                "num_items": len(pipeline.items),
                "num_shards": pipeline.num_shards,
                "shards_per_task": cfg.shards_per_task,
                "array": f"0-{tasks - 1}",
            }
            print(json.dumps(plan))
            return 0
        summary = pipeline.run()
    except (DataprepConfigError, StageError, ValueError) as exc:
        print(f"dataprep: error: {exc}", file=sys.stderr)
        return 2
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    print(json.dumps({"slurm_array_task": task, **{k: v for k, v in summary.items() if k != "writer"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
