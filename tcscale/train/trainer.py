"""The training loop: model + objective + data + DeepSpeed engine + checkpoints + MLflow.

Step semantics: `step` counts optimizer steps; each one is `gradient_accumulation_steps`
micro-batches per rank. Every random draw of a micro-step (timesteps, noise, VAE sample, data
order) derives from (seed, rank, micro_step), so a resumed run replays exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tcscale.attention.grounding_processor import (
    install_grounding_processors,
    layer_latent_side,
    select_layers,
)
from tcscale.config import TrainConfig, config_to_dict, save_config
from tcscale.models.sd import SDComponents, load_components, save_pipeline_dir
from tcscale.objectives.tokencompose import DiffusionObjective, StepOutput
from tcscale.tracking import build_tracker
from tcscale.train import checkpoint as ckpt
from tcscale.train.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_mean,
    all_reduce_min,
    any_rank,
    broadcast_object,
    init_distributed,
    print0,
    sum_counters,
)
from tcscale.train.engine import build_engine, compute_dtype, zero_stage
from tcscale.train.preemption import PreemptionFlag


class NonFiniteLossError(FloatingPointError):
    """A loss term or the gradient norm is NaN/inf; raised on every rank before anything is saved."""


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    run_id: str | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    preempted: bool = False


def step_generator(seed: int, rank: int, micro_step: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-step: a pure function of (seed, rank, micro_step)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank * 10_007 + micro_step) % (2**63 - 1))
    return g


def build_objective(cfg: TrainConfig, comps: SDComponents, dtype: torch.dtype, device: torch.device, rank: int = 0):
    """Objective + the names of the attn2 layers it grounds (empty for LDM-only)."""
    unet = comps.unet
    latent_side = cfg.data.resolution // 8
    if cfg.objective.name == "sepen":
        from tcscale.objectives.sepen import SepEnObjective

        obj = SepEnObjective(comps, cfg, dtype, device, rank)
        return obj, obj.layer_names
    if cfg.objective.name == "ldm" or cfg.attention.backend == "sdpa":
        return DiffusionObjective(comps, cfg.objective, None, dtype), []
    names = select_layers(unet, cfg.attention.blocks, cfg.attention.resolutions, latent_side)
    install_grounding_processors(unet, names, cfg.attention.backend)
    return DiffusionObjective(comps, cfg.objective, cfg.attention, dtype, names), names


def check_finite(out: StepOutput, step: int, micro_step: int, device: torch.device) -> None:
    """All ranks agree whether every term is finite; raise naming the step and the bad terms."""
    names = list(out.terms)
    finite = torch.tensor([float(torch.isfinite(out.terms[n].detach()).all()) for n in names], device=device)
    finite = all_reduce_min(finite)
    bad = [n for n, ok in zip(names, finite.tolist()) if ok < 1]
    if bad:
        local = {n: float(out.terms[n].detach()) for n in bad}
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (micro-step {micro_step}): term(s) {bad} are NaN/inf "
            f"(this rank's values: {local}); stopping before any checkpoint is written"
        )


def _train_loader(cfg: TrainConfig, comps: SDComponents, env: DistEnv, micro_bs: int, micro_step: int, names):
    from tcscale.data import build_train_loader

    side = cfg.data.resolution // 8
    sizes = sorted({(s, s) for s in (layer_latent_side(comps.unet, n, side) for n in names)})
    return build_train_loader(
        cfg.data,
        comps.tokenizer,
        rank=env.rank,
        world_size=env.world_size,
        micro_batch_size=micro_bs,
        seed=cfg.seed,
        start_step=micro_step,
        layer_sizes=sizes,
        layer_mask_mode=cfg.attention.mask_interpolation,
        layer_mask_threshold=cfg.attention.mask_threshold,
    )


def train(cfg: TrainConfig, preempt: PreemptionFlag | None = None) -> TrainResult:
    """Train per cfg on this process's rank (collective: every rank calls it). preempt: a SIGUSR1 flag."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # per-module dtype notices on every .to() drown the step lines
    env = init_distributed()
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if env.is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    torch.manual_seed(cfg.seed)

    ds = cfg.deepspeed
    dtype = compute_dtype(ds)
    micro_bs = int(ds["train_micro_batch_size_per_gpu"])
    accum = int(ds["gradient_accumulation_steps"])
    if cfg.ema.enabled and zero_stage(ds) == 3:
        raise ValueError("ema.enabled with deepspeed.zero_optimization.stage=3 is not supported (use ZeRO-2)")

    comps = load_components(cfg.model, cfg.data.resolution)
    if cfg.model.pretrained is None and env.is_rank0:
        save_pipeline_dir(comps, out_dir / "base_model")  # the tiny base, so export has a full pipeline
    comps.vae.requires_grad_(False).to(env.device, torch.float32).eval()
    comps.text_encoder.requires_grad_(False).to(env.device, dtype).eval()
    unet = comps.unet
    objective, layer_names = build_objective(cfg, comps, dtype, env.device, env.rank)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers default: torch checkpoint with use_reentrant=False
    unet.train()
    params = objective.trainable_parameters(unet)
    engine = build_engine(unet, params, ds)

    ema = None
    if cfg.ema.enabled:
        from diffusers.training_utils import EMAModel

        ema = EMAModel([p for p in engine.module.parameters() if p.requires_grad], decay=cfg.ema.decay)

    # --- resume --------------------------------------------------------------------------------
    step, run_id, data_state = 0, None, None
    resume = ckpt.resolve_resume(cfg.resume, ckpt_dir)
    if resume is not None:
        client = ckpt.load_checkpoint(engine, *resume)
        step, run_id, data_state = int(client["step"]), client.get("mlflow_run_id"), client.get("data")
        if ema is not None and (resume[0] / resume[1] / "ema.pt").is_file():
            ema.load_state_dict(torch.load(resume[0] / resume[1] / "ema.pt", map_location="cpu"))
        print0(f"resumed from {resume[0] / resume[1]} at step {step}")
    micro_step = step * accum

    tracker = build_tracker(cfg, env.is_rank0, env.world_size, run_id)
    run_id = broadcast_object(tracker.run_id if env.is_rank0 else None)
    print0(
        f"run {cfg.run_name}: world {env.world_size}, objective {cfg.objective.name}, "
        f"{len(layer_names)} grounded layers, mlflow run {run_id}"
    )

    loader = None
    if cfg.objective.name != "sepen":
        loader = _train_loader(cfg, comps, env, micro_bs, micro_step, layer_names)
        # one loader state per rank (the client state holds the list); a different world size restarts the
        # per-rank streams at the saved micro-step with fresh counters
        if isinstance(data_state, list) and len(data_state) == env.world_size:
            loader.load_state_dict(data_state[env.rank])
        elif data_state is not None:
            print0(f"resuming with world size {env.world_size} (checkpoint: {len(data_state)}): data streams restart")
    batches = iter(loader) if loader is not None else None

    def client_state() -> dict[str, Any]:
        return {
            "step": step,
            "micro_step": micro_step,
            "mlflow_run_id": run_id,
            "config": config_to_dict(cfg),
            "data": all_gather_objects(loader.state_dict()) if loader is not None else None,
            "world_size": env.world_size,
        }

    def save(at_step: int) -> None:
        extra = {"ema.pt": ema.state_dict()} if ema is not None else None
        path = ckpt.save_checkpoint(
            engine, ckpt_dir, at_step, client_state(), cfg.checkpoint.keep_last, env.is_rank0, extra
        )
        print0(f"checkpoint saved: {path}")

    preempt = preempt if preempt is not None else PreemptionFlag().install()
    result = TrainResult(step, out_dir, run_id)
    start_step = step
    status = "FAILED"
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            for _ in range(accum):
                gen = step_generator(cfg.seed, env.rank, micro_step, env.device)
                if batches is not None:
                    batch = next(batches)
                    out = objective(engine, batch, env.device, gen)
                else:
                    out = objective(engine, micro_step, env.device, gen)
                check_finite(out, step + 1, micro_step, env.device)
                engine.backward(out.loss)
                engine.step()
                micro_step += 1
                for k, v in out.terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
            step += 1
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else 0.0
            if not math.isfinite(grad_norm):  # the global norm: the same value on every rank
                raise NonFiniteLossError(f"non-finite gradient norm at step {step}; stopping before any checkpoint")
            if ema is not None:
                ema.step([p for p in engine.module.parameters() if p.requires_grad])
            names = sorted(sums)
            means = all_reduce_mean(torch.stack([sums[n] for n in names]).to(env.device)).tolist()
            elapsed = time.perf_counter() - t0
            metrics = {f"loss/{n}": v for n, v in zip(names, means)}
            metrics.update(
                {
                    "lr": float(engine.get_lr()[0]),
                    "grad_norm": grad_norm,
                    "samples_per_s": micro_bs * accum * env.world_size / max(elapsed, 1e-9),
                }
            )
            if loader is not None:  # summed over ranks: samples seen, skipped by reason, dropped phrases
                metrics.update({f"data/{k}": float(v) for k, v in sum_counters(loader.counters()).items()})
            result.last_metrics = metrics
            if step % cfg.tracking.log_every == 0:
                tracker.log_metrics(metrics, step)
            if step % cfg.log_to_stdout_every == 0:
                print0(f"step {step}/{cfg.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if cfg.validation.every_steps and step % cfg.validation.every_steps == 0:
                from tcscale.train.validation import run_validation

                run_validation(engine.module, comps, cfg, objective, tracker, step, env)
            stop = any_rank(preempt.requested, env.device)
            if stop or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
                save(step)
            if stop:
                if env.is_rank0:
                    (out_dir / "PREEMPTED").write_text(f"step {step}\n")
                print0(f"preemption signal: checkpoint at step {step} written, exiting for requeue")
                result.preempted = True
                break
        else:
            if (
                cfg.checkpoint.save_final
                and step > start_step
                and not (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
            ):
                save(step)
        status = "FINISHED" if not result.preempted else "KILLED"
    finally:
        tracker.end(status)
        if loader is not None and hasattr(loader, "close"):
            loader.close()
    result.step = step
    result.run_id = run_id
    return result
