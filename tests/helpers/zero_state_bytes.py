"""Per-rank optimizer-state bytes of a real DeepSpeed engine on the tiny U-Net, for the memory planner's test.

    deepspeed --num_gpus 2 tests/helpers/zero_state_bytes.py --config configs/tiny_cpu.yaml [key=value ...]

Builds the engine as the trainer does (tcscale.train.engine.build_engine), runs one optimizer step (AdamW creates
its states on the first step) and prints one line per rank: ``ZERO_STATE {"rank", "world_size", "trainable",
"optimizer_bytes", "ema_bytes"}``: the bytes of the inner optimizer's fp32 m, v states and of the fp32 EMA
(tcscale.train.ema.ShardedEMA) this rank keeps of them.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from tcscale.config import load_config
    from tcscale.memory.planner import build_models
    from tcscale.train.distributed import init_distributed
    from tcscale.train.ema import ShardedEMA
    from tcscale.train.engine import build_engine

    cfg = load_config(args.config, args.overrides)
    env = init_distributed()
    unet = build_models(cfg, "tiny", "cpu").unet
    params = [p for p in unet.parameters() if p.requires_grad]
    engine = build_engine(unet, params, cfg.deepspeed)
    side = cfg.data.resolution // 8
    x = torch.randn(1, 4, side, side, dtype=engine.module.dtype)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=engine.module.dtype)
    loss = engine(x, torch.tensor([10]), text).sample.float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    ema = ShardedEMA(engine, decay=0.9999)
    inner = engine.optimizer.optimizer  # the torch AdamW over this rank's fp32 partition
    states = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    record = {
        "rank": env.rank,
        "world_size": env.world_size,
        "trainable": sum(p.numel() for p in params),
        "optimizer_bytes": sum(t.numel() * t.element_size() for t in states),
        "ema_bytes": sum(share.shadow.numel() * share.shadow.element_size() for share in ema.shares),
    }
    print("ZERO_STATE " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
