"""Training-step time: LDM-only (SDPA) vs TokenCompose with the reference or the fused grounding backend.

Measures one optimizer step (VAE encode + text encode + U-Net forward/backward + AdamW) of the
real objective code, side by side in one process, without DeepSpeed (the engine adds the same
overhead to every provider). docs/DESIGN.md §7 target: TokenCompose step <= 1.05x the LDM-only step.

    python benchmarks/bench_step.py --pretrained CompVis/stable-diffusion-v1-4 --resolution 512 --batch 4   # GPU
    python benchmarks/bench_step.py --arch sd14 --resolution 512 --batch 4      # GPU without the hub: random weights
    python benchmarks/bench_step.py --tiny --resolution 64 --batch 2 --steps 10                            # CPU smoke
    python benchmarks/bench_step.py --arch sdxl --resolution 1024 --batch 1 --finetune full,lora           # GPU

`--arch sd14|sd21|sdxl` builds the released architecture with random weights directly on the GPU: a step's time and
memory depend on the shapes, not on the weight values, so machines that cannot reach the model hub measure it too.

Full finetuning against LoRA (`--finetune full,lora --lora-rank 8`): every row also reports the trainable parameters,
the optimizer-state bytes AdamW holds after the step (measured: the tensors in `optimizer.state`) and the bytes
autograd keeps for backward during the forward (measured with saved-tensor hooks, each storage counted once).

Appends one JSON line per provider to benchmarks/results/step_time.jsonl (device, versions, shapes, date).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench_step.py` from a checkout without an install
    sys.path.insert(0, str(REPO))

from tcscale.config import ModelConfig, TrainConfig  # noqa: E402
from tcscale.models.architectures import build_random_components  # noqa: E402
from tcscale.models.sd import load_components  # noqa: E402
from tcscale.models.tokenizer import sd_clip_tokenizer  # noqa: E402
from tcscale.objectives import OBJECTIVES, BuildContext  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.jsonl"


def synthetic_batch(batch: int, resolution: int, phrases: int = 3) -> dict:
    """Random images, 3 rectangular phrase masks per sample, 2 tokens per phrase."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(batch, phrases, resolution, resolution)
    token_phrase = torch.full((batch, 77), -1, dtype=torch.long)
    for b in range(batch):
        for p in range(phrases):
            y0, x0 = (torch.randint(0, resolution // 2, (2,), generator=g)).tolist()
            masks[b, p, y0 : y0 + resolution // 3, x0 : x0 + resolution // 3] = 1
            token_phrase[b, 2 + 3 * p : 4 + 3 * p] = p
    return {
        "pixel_values": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
        "input_ids": torch.randint(0, 49406, (batch, 77), generator=g),
        "phrase_masks": masks,
        "token_phrase": token_phrase,
    }


class SavedBytes:
    """Bytes autograd saves for backward inside the context (saved-tensor hooks; each storage counted once)."""

    def __init__(self):
        self.bytes, self._seen = 0, set()

    def _pack(self, t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for state in opt.state.values() for v in state.values() if torch.is_tensor(v))


def time_provider(name: str, args, device: torch.device, dtype: torch.dtype, finetune: str = "full") -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # peak of this provider only
    if args.arch:
        comps = build_random_components(args.arch, args.resolution, device=device, tokenizer=sd_clip_tokenizer())
    else:
        comps = load_components(ModelConfig(pretrained=None if args.tiny else args.pretrained), args.resolution)
    comps.vae.requires_grad_(False).to(device, torch.float32)
    for tower in comps.text_towers:
        tower.requires_grad_(False).to(device, dtype)
    # the objectives as a run builds them (default grounded layers: mid + every up block attn2)
    cfg = TrainConfig(max_steps=1)
    cfg.model.family = comps.family
    cfg.data.resolution = args.resolution
    cfg.objective.name = "ldm" if name.startswith("ldm_") else "tokencompose"
    if name == "ldm_xformers":
        cfg.attention.ungrounded = "xformers"
    elif not name.startswith("ldm_"):
        cfg.attention.backend = name.split("_")[-1]
    spec = OBJECTIVES[cfg.objective.name]
    objective = spec.build(getattr(cfg.objective, spec.name), BuildContext(cfg, comps, dtype, device, args.batch))
    if finetune == "lora":
        from tcscale.config import LoRAConfig
        from tcscale.models.lora import apply_lora

        cfg.model.lora = LoRAConfig(rank=args.lora_rank)
        apply_lora(objective, cfg)
    unet = comps.unet.to(device, dtype).train()
    names = objective.plan.layers if objective.plan is not None else ()
    params = objective.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-6)
    batch = synthetic_batch(args.batch, args.resolution)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        gen = torch.Generator(device=device).manual_seed(i)
        sync()
        t0 = time.perf_counter()
        with SavedBytes() as saved:
            out = objective(unet, batch, gen)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    return {
        "provider": name,
        "finetune": finetune if finetune == "full" else f"lora_r{args.lora_rank}",
        "trainable_params": sum(p.numel() for p in params),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "saved_activation_bytes": saved.bytes,
        "ms_median": 1e3 * statistics.median(times),
        "ms_p20": 1e3 * q[0],
        "ms_p80": 1e3 * q[3],
        "peak_mib": peak,
        "steps": len(times),
        "grounded_layers": len(names),
    }


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default="CompVis/stable-diffusion-v1-4")
    ap.add_argument("--tiny", action="store_true", help="tiny random-init models (CPU smoke)")
    ap.add_argument(
        "--arch", choices=["sd14", "sd21", "sdxl"], help="released architecture with random weights (no hub)"
    )
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument(
        "--providers", default="ldm_sdpa,tokencompose_reference,tokencompose_fused", help="also ldm_xformers (GPU)"
    )
    ap.add_argument("--finetune", default="full", help="comma list of full | lora (each provider runs each)")
    ap.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA adapters (--finetune lora)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" and device.type == "cuda" else torch.float32
    providers = args.providers.split(",")
    if device.type == "cpu" and "tokencompose_fused" in providers:
        providers.remove("tokencompose_fused")  # the fused kernel needs a GPU (the interpreter is no timing)
    if "ldm_xformers" in providers:
        from tcscale.config import xformers_missing

        reason = xformers_missing()
        if reason:
            print(f"provider ldm_xformers skipped: it needs {reason}", file=sys.stderr)
            providers.remove("ldm_xformers")
    modes = args.finetune.split(",")
    if any(m not in ("full", "lora") for m in modes):
        ap.error(f"--finetune: full and/or lora, got {args.finetune!r}")
    rows = [time_provider(p, args, device, dtype, m) for m in modes for p in providers]
    base = next((r["ms_median"] for r in rows if r["provider"] == "ldm_sdpa" and r["finetune"] == "full"), None)
    meta = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({platform.processor() or 'x86_64'})",
        "torch": torch.__version__,
        "model": f"{args.arch} (random weights)" if args.arch else "tiny" if args.tiny else args.pretrained,
        "triton": _triton_version(),
        "resolution": args.resolution,
        "batch": args.batch,
        "dtype": str(dtype).replace("torch.", ""),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            r.update(meta)
            r["ratio_vs_ldm_sdpa"] = r["ms_median"] / base if base else None
            f.write(json.dumps(r) + "\n")
            print(
                f"{r['provider']:>24} {r['finetune']:>8}: {r['ms_median']:8.1f} ms (p20 {r['ms_p20']:.1f}, "
                f"p80 {r['ms_p80']:.1f})"
                + (f"  x{r['ratio_vs_ldm_sdpa']:.3f} vs ldm_sdpa" if base else "")
                + f"  trainable {r['trainable_params']:,}, optimizer state {r['optimizer_state_bytes'] / 2**20:.2f} "
                f"MiB, saved for backward {r['saved_activation_bytes'] / 2**20:.1f} MiB"
            )


if __name__ == "__main__":
    main()
