"""The trainer: build the run once, then one `train_step` per optimizer step.

    trainer = Trainer(cfg)          # process group, models, objective, engine, checkpointer, tracker, data
    result = trainer.fit()          # the loop: train_step, log, validate, checkpoint, honour preemption

Step semantics: `step` counts optimizer steps; each one is `gradient_accumulation_steps` micro-batches per rank.
Every random draw of a micro-step (timesteps, noise, VAE sample, data order) derives from (seed, the global sample
slot its micro-batch starts at), so a resumed run replays exactly what an uninterrupted run would have done.

Elastic resume: a checkpoint saved on another number of ranks loads through DeepSpeed's universal layout
(`tcscale.train.checkpoint`), and the data continue the same global slot sequence (`DataAnchor`): micro-step m of
rank r reads slots anchor.slot + ((m - anchor.step) * world + r) * micro_batch + [0, micro_batch). When the
global batch (world x micro-batch x accumulation) is kept, e.g. 2 ranks -> 1 rank with twice the accumulation,
every optimizer step sees the same samples and random draws as the uninterrupted run.

The objective (`tcscale.objectives.OBJECTIVES[cfg.objective.name]`) decides what is trained and how a batch
becomes a loss; nothing here branches on which objective it is.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tcscale.config import TrainConfig, config_to_dict, save_config
from tcscale.data.loader import derive_seed, first_slot
from tcscale.logs import get_logger
from tcscale.memory import preflight
from tcscale.models.sd import load_components, save_pipeline_dir
from tcscale.objectives import OBJECTIVES, BuildContext, StepOutput
from tcscale.tracking import build_tracker
from tcscale.tracking.mlflow_tracker import mark_failed, resolve_tracking_uri, write_run_info
from tcscale.train.batch import BatchError, resolve_batch
from tcscale.train.checkpoint import Checkpointer, DataAnchor, plan_resume, universal_engine_config
from tcscale.train.distributed import (
    all_gather_objects,
    all_reduce_mean,
    all_reduce_min,
    any_rank,
    barrier,
    broadcast_object,
    checked_on_rank0,
    cuda_missing,
    init_distributed,
    print0,
    sum_counters,
)
from tcscale.train.engine import build_engine
from tcscale.train.errors import NonFiniteLossError, RunInputError
from tcscale.train.precision import compute_dtype
from tcscale.train.preemption import PreemptionFlag
from tcscale.train.run_lock import RunLock


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    run_id: str | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    preempted: bool = False
    terminated: bool = False  # stopped by SIGTERM without a checkpoint (checkpoint.on_sigterm=false)


_TAG_STEP_RNG = 201  # keeps the micro-step generators apart from the data streams' derived seeds


def step_generator(seed: int, slot: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, the global sample slot the micro-batch starts at;
    `tcscale.data.loader.first_slot`), so it does not depend on how the slots are split over ranks."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, _TAG_STEP_RNG, slot))
    return g


def check_finite(out: StepOutput, step: int, micro_step: int, device: torch.device) -> None:
    """Before backward: all ranks agree whether every term and the weighted total are finite; raise naming the step
    and the bad terms (or, when every term is finite, the total: a loss weight overflows). Nothing is updated."""
    names = list(out.terms)
    values = [out.terms[n].detach() for n in names] + [out.loss.detach()]
    finite = all_reduce_min(torch.tensor([float(torch.isfinite(v).all()) for v in values], device=device))
    flags = finite.tolist()
    bad = [n for n, ok in zip(names, flags) if ok < 1]
    if bad:
        local = {n: float(out.terms[n].detach()) for n in bad}
        err = NonFiniteLossError(
            f"non-finite loss at step {step} (micro-step {micro_step}): term(s) {bad} are NaN/inf "
            f"(this rank's values: {local}); stopping before any parameter update or checkpoint"
        )
    elif flags[-1] < 1:
        terms = {n: round(float(out.terms[n].detach()), 6) for n in names}
        err = NonFiniteLossError(
            f"non-finite loss at step {step} (micro-step {micro_step}): the weighted total is "
            f"{float(out.loss.detach())} although every term is finite ({terms}): a loss weight overflows the "
            "total; stopping before any parameter update or checkpoint"
        )
    else:
        return
    err.agreed = True
    raise err


def check_output_dir(out_dir: Path) -> None:
    """The run directory and its checkpoints/ can be created and written (rank 0, before any model loads)."""
    for folder in (out_dir, out_dir / "checkpoints"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise RunInputError(
                f"output_dir: cannot write in {folder} ({exc.strerror or exc}); choose a writable output_dir"
            ) from None


class Trainer:
    """One run on this process's rank (collective: every rank builds one and calls `fit`)."""

    def __init__(self, cfg: TrainConfig, preempt: PreemptionFlag | None = None):
        get_logger()  # the launcher's --log-level, or info; libraries at error (tcscale.logs)
        self.cfg = cfg
        missing = cuda_missing(cfg.device)
        if missing:  # before any process group: every rank of a job on like nodes reaches the same verdict
            err = RunInputError(missing)
            err.agreed = True
            raise err
        self.env = init_distributed(cfg.device)
        self.out_dir = Path(cfg.output_dir)
        self.lock: RunLock | None = None  # rank 0: this run's hold on output_dir (tcscale.train.run_lock)
        self.tracker = None
        try:
            try:  # the recipe's global batch on this world size; every rank computes the same verdict
                self.batch = resolve_batch(
                    cfg.deepspeed, cfg.batch.global_size, cfg.batch.lr_scaling, self.env.world_size
                )  # fmt: skip
            except BatchError as exc:
                exc.agreed = True
                raise
            print0(self.batch.describe())
            self.preflight()
            self._build(preempt)
        except BaseException as exc:
            if self.lock is not None and cfg.resume and cfg.tracking.enabled and self.tracker is None:
                mark_failed(self.out_dir, f"{type(exc).__name__}: {exc}")  # the run this resume was to continue
            self.release()
            raise

    def _build(self, preempt: PreemptionFlag | None) -> None:
        cfg, env = self.cfg, self.env
        # planned once, on rank 0 (seconds of meta-device work); a config that cannot fit stops every rank
        self.memory_check = checked_on_rank0(lambda: preflight.preflight_memory(cfg, env.world_size, env.device))
        print0(preflight.describe(self.memory_check))
        torch.manual_seed(cfg.seed)
        self.ds = ds = self.batch.deepspeed_section(cfg.deepspeed)  # the engine's: derived accumulation, scaled lr
        self.dtype = compute_dtype(ds)
        self.micro_bs = self.batch.micro_batch
        self.accum = self.batch.accumulation

        # models and objective
        self.comps = comps = load_components(cfg.model, cfg.data.resolution)
        if cfg.model.pretrained is None and env.is_rank0:
            save_pipeline_dir(comps, self.out_dir / "base_model")  # the tiny base, so export has a full pipeline
        self.latent_key = None
        if cfg.data.latents == "cached":  # the loader reads cached latents: identify the VAE, then drop its weights
            from tcscale.data.latent_cache import cache_key, check_shards

            self.latent_key = cache_key(cfg.data, comps.vae)
            checked_on_rank0(lambda: check_shards(cfg.data, self.latent_key))
            comps.vae.to("meta")  # config only (scaling factor, downsampling): no VAE weights on any device
        else:
            comps.vae.requires_grad_(False).to(env.device, torch.float32).eval()
        for tower in comps.text_towers:
            tower.requires_grad_(False).to(env.device, self.dtype).eval()
        spec = OBJECTIVES[cfg.objective.name]
        ctx = BuildContext(cfg, comps, self.dtype, env.device, self.micro_bs, env.rank, env.world_size)
        self.objective = spec.build(getattr(cfg.objective, spec.name), ctx)
        if cfg.model.lora is not None:  # adapters replace the objective's trainable set (tcscale.models.lora)
            from tcscale.models.lora import apply_lora

            apply_lora(self.objective, cfg)
        module = self.objective.module
        if cfg.model.gradient_checkpointing:
            module.enable_gradient_checkpointing()  # diffusers default: torch checkpoint with use_reentrant=False
        module.train()
        # which checkpoint, decided before the engine: one saved on another number of ranks loads through
        # DeepSpeed's universal layout, an engine option
        ckpt_dir = self.out_dir / "checkpoints"
        self.resume_plan = checked_on_rank0(lambda: plan_resume(cfg.resume, ckpt_dir, env.world_size))
        if self.resume_plan is not None and self.resume_plan.note:
            print0(self.resume_plan.note)  # a fall-back to an older checkpoint, or nothing to resume from
        elastic = self.resume_plan is not None and self.resume_plan.elastic
        self.engine = build_engine(
            module, self.objective.trainable_parameters(), universal_engine_config(ds) if elastic else ds
        )
        self.ema = None
        if cfg.ema.enabled:  # fp32, each rank its share of the master weights (tcscale.train.ema)
            from tcscale.train.ema import ShardedEMA

            self.ema = ShardedEMA(self.engine, cfg.ema.decay, warmup=cfg.ema.warmup)

        # checkpoints, tracking, data
        extras = {"ema": self.ema} if self.ema is not None else {}
        self.checkpointer = Checkpointer(
            self.out_dir / "checkpoints", self.engine, env, keep_last=cfg.checkpoint.keep_last, extras=extras,
            allow_unsafe_load=cfg.checkpoint.allow_unsafe_load,
        )  # fmt: skip
        stale = self.checkpointer.remove_stale_temp()
        if stale:
            print0(f"removed {', '.join(stale)}: incomplete checkpoint(s) of an interrupted save")
        resumed = self.checkpointer.resume(self.resume_plan)
        client = resumed.client_state if resumed is not None else {}
        if self.ema is not None:
            print0(
                f"ema: fp32 average of the trained weights, decay {cfg.ema.decay}"
                f"{' with warm-up' if cfg.ema.warmup else ''}, {self.ema.numel() * 4 / 2**20:.1f} MiB on this rank"
                + (f", {self.ema.updates} updates resumed" if resumed is not None else "")
            )
        self.step = int(client.get("step", 0))
        self.start_step = self.step
        self.micro_step = self.step * self.accum
        self.anchor = DataAnchor.resumed(client, self.micro_step) if resumed is not None else DataAnchor()
        if resumed is not None:
            print0(f"resumed from {resumed.path} at step {self.step}")
            if elastic:
                print0(
                    f"elastic resume: saved on {resumed.plan.saved_world_size} ranks, loaded on {env.world_size} "
                    f"through DeepSpeed's universal checkpoint ({resumed.seconds:.1f} s with the conversion)"
                )
            if self.objective.reads_data and int(client.get("world_size") or env.world_size) != env.world_size:
                self._describe_resize(client)

        def created(run_id: str) -> None:  # for evaluations nested under this run (tcscale.eval); may come late
            write_run_info(self.out_dir, run_id, resolve_tracking_uri(cfg), cfg.tracking.experiment)

        self.tracker = build_tracker(cfg, env.is_rank0, env.world_size, client.get("mlflow_run_id"), created)
        try:  # from here on, a failure marks the MLflow run FAILED with its reason
            self.run_id = broadcast_object(self.tracker.run_id if env.is_rank0 else None)
            preflight.log_plan(self.tracker, self.memory_check)  # MLflow param memory/predicted_peak_gib
            if env.is_rank0 and getattr(self.tracker, "logged_until", 0) > self.step:
                print0(f"steps {self.step + 1}..{self.tracker.logged_until} were logged before the interruption; "
                       "their replay is not logged again")  # fmt: skip
            plan = self.objective.plan
            print0(
                f"run {cfg.run_name}: world {env.world_size}, objective {cfg.objective.name}, "
                f"{len(plan.layers) if plan else 0} grounded layers, mlflow run {self.run_id}"
            )
            self.loader = self._build_loader(client.get("data")) if self.objective.reads_data else None
            self.batches = self._batches()
        except BaseException as exc:
            self.tracker.end("FAILED", reason=f"{type(exc).__name__}: {exc}")
            raise
        self.owns_preempt = preempt is None  # installed here (in-process use): its handlers are restored after fit
        self.preempt = preempt if preempt is not None else PreemptionFlag().install()

    # -- building --------------------------------------------------------------------------------
    def preflight(self) -> None:
        """What can be checked before minutes of model loading, the same verdict on every rank: the output
        directory is writable (then the merged config is written into it) and the data shards exist."""
        cfg = self.cfg

        def rank0_checks() -> str | None:
            check_output_dir(self.out_dir)
            lock = RunLock(self.out_dir)  # one run per output_dir: a second one stops here, before writing anything
            note = lock.acquire()
            self.lock = lock
            save_config(cfg, self.out_dir / "config.yaml")
            return note

        note = checked_on_rank0(rank0_checks)
        if note:
            print0(note)
        spec = OBJECTIVES[cfg.objective.name]
        if spec.build.reads_data and cfg.data.source == "webdataset":
            from tcscale.data import resolve_shards

            checked_on_rank0(lambda: resolve_shards(cfg.data))
        barrier()

    def _build_loader(self, data_state):
        env = self.env
        # the objective's loader: grounded images over its plan by default, e.g. object crops for the text stage
        loader = self.objective.build_loader(
            self.cfg.data,
            self.comps.tokenizer,
            rank=env.rank,
            world_size=env.world_size,
            micro_batch_size=self.micro_bs,
            seed=self.cfg.seed,
            start_step=self.micro_step,
            anchor=self.anchor.position,
        )
        if self.latent_key is not None:
            loader.expect_latent_cache(self.latent_key)
        # one loader state per rank (the client state holds the list), continued at this run's micro-step (its count
        # changes with gradient_accumulation_steps); on another world size, rank 0 carries the summed counters on
        if isinstance(data_state, list) and len(data_state) == env.world_size:
            loader.load_state_dict({**data_state[env.rank], "step": self.micro_step})
        elif isinstance(data_state, list) and data_state:
            counters: dict[str, float] = {}
            for part in data_state:
                for key, value in (part.get("counters") or {}).items():
                    counters[key] = counters.get(key, 0) + value
            own = {**data_state[0], "world_size": env.world_size, "rank": env.rank, "step": self.micro_step}
            loader.load_state_dict({**own, "counters": counters if env.is_rank0 else {}})
        return loader

    def _describe_resize(self, client: dict[str, Any]) -> None:
        """After resuming on another world size: say which samples the new world sees, and what keeps the global
        batch (rank 0 prints)."""
        env, anchor, b = self.env, self.anchor, self.micro_bs
        saved_world = int(client.get("world_size") or 1)
        if self.cfg.data.source == "synthetic":
            what = (f"the synthetic slot sequence continues at slot {anchor.slot}: micro-step m of rank r reads slots "
                    f"{anchor.slot} + ((m - {anchor.step}) * {env.world_size} + r) * {b} + [0, {b})")  # fmt: skip
        else:
            what = f"each rank draws a fresh shard stream seeded by (seed, rank, worker, micro-step {self.micro_step})"
            if not self.cfg.data.resampled:
                what += "; a new pass over the shards starts, split over the new ranks x workers"
        print0(f"data: world size {saved_world} -> {env.world_size}: {what}")
        ds = (client.get("config") or {}).get("deepspeed") or {}
        saved_b, saved_accum = ds.get("train_micro_batch_size_per_gpu", b), ds.get("gradient_accumulation_steps", 1)
        before = (client.get("batch") or {}).get("global") or saved_world * int(saved_b) * int(saved_accum)
        now = env.world_size * b * self.accum
        if before != now:
            keep = before / (env.world_size * b)
            hint = f"; deepspeed.gradient_accumulation_steps={int(keep)} keeps it" if keep == int(keep) else ""
            if self.cfg.batch.global_size is not None:  # adapted by batch.lr_scaling (the start-up line says how)
                hint = f" (batch.lr_scaling={self.cfg.batch.lr_scaling})"
            print0(f"data: the global batch changes from {before} to {now} samples per optimizer step{hint}")

    def _batches(self) -> Iterator[dict[str, Any]]:
        if self.loader is not None:
            return iter(self.loader)
        return (self.objective.batch(n) for n in itertools.count(self.micro_step))

    def release(self) -> None:
        """Give the output directory's lock back (rank 0; idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def client_state(self) -> dict[str, Any]:
        """What a checkpoint carries besides the engine's states (collective: gathers the loader states)."""
        return {
            "step": self.step,
            "micro_step": self.micro_step,
            # rank 0's tracker: a run created late (tracking server down at start) is continued by a resume too
            "mlflow_run_id": self.tracker.run_id if self.env.is_rank0 and self.tracker.run_id else self.run_id,
            "config": config_to_dict(self.cfg),
            "data": all_gather_objects(self.loader.state_dict()) if self.loader is not None else None,
            "world_size": self.env.world_size,
            "batch": {"micro_batch": self.micro_bs, "accumulation": self.accum, "global": self.batch.global_batch},
            "data_anchor": self.anchor.state(self.env.world_size, self.micro_bs),
        }

    # -- one optimizer step ----------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """`gradient_accumulation_steps` micro-steps and the optimizer step; the step's metrics (rank-averaged)."""
        env, engine = self.env, self.engine
        t0 = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        for _ in range(self.accum):
            slot = first_slot(self.micro_step, env.rank, env.world_size, self.micro_bs, self.anchor.position)
            gen = step_generator(self.cfg.seed, slot, env.device)
            out = self.objective(engine, next(self.batches), gen)
            check_finite(out, self.step + 1, self.micro_step, env.device)
            engine.backward(out.loss)
            engine.step()
            self.micro_step += 1
            for k, v in out.terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / self.accum
        self.step += 1
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        if not math.isfinite(grad_norm):  # the global norm: the same value on every rank
            terms = {n: round(float(out.terms[n].detach()), 6) for n in out.terms}
            err = NonFiniteLossError(
                f"non-finite gradient norm at step {self.step} although every loss term is finite (last micro-step: "
                f"{terms}); stopping before any checkpoint is written (this step's update is discarded with the "
                "process; resume from the last checkpoint with a lower learning rate or stronger clipping)"
            )
            err.agreed = True
            raise err
        if self.ema is not None:
            self.ema.step()
        names = sorted(sums)
        means = all_reduce_mean(torch.stack([sums[n] for n in names]).to(env.device)).tolist()
        elapsed = time.perf_counter() - t0
        metrics = {f"loss/{n}": v for n, v in zip(names, means)}
        metrics["lr"] = float(engine.get_lr()[0])
        metrics["grad_norm"] = grad_norm
        metrics["samples_per_s"] = self.micro_bs * self.accum * env.world_size / max(elapsed, 1e-9)
        if self.loader is not None:  # summed over ranks: samples seen, skipped by reason, dropped phrases
            metrics.update({f"data/{k}": float(v) for k, v in sum_counters(self.loader.counters()).items()})
        return metrics

    # -- the loop --------------------------------------------------------------------------------
    def _due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0

    def save(self) -> None:
        path = self.checkpointer.save(self.step, self.client_state())
        print0(f"checkpoint saved: {path}")

    def validate(self) -> None:
        use_ema = self.ema is not None and self.cfg.ema.validate
        with self.ema.swapped_in() if use_ema else contextlib.nullcontext():  # collective
            metrics = self.objective.validate(self.engine.module)  # every rank calls it; rank 0 logs
            if metrics is not None:  # the objective's own validation
                self.tracker.log_metrics(metrics, self.step)
                print0(f"validation step {self.step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                return
            from tcscale.train.validation import run_validation

            run_validation(
                self.engine.module, self.comps, self.cfg, self.objective.plan, self.tracker, self.step, self.env
            )

    def fit(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(self.step, self.out_dir, self.run_id)
        status, reason = "FAILED", None
        try:
            while self.step < cfg.max_steps:
                metrics = result.last_metrics = self.train_step()
                if self._due(cfg.tracking.log_every):
                    self.tracker.log_metrics(metrics, self.step)
                if self._due(cfg.log_to_stdout_every):
                    print0(f"step {self.step}/{cfg.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                if self._due(cfg.validation.every_steps):
                    self.validate()
                preempted = any_rank(self.preempt.requested, self.env.device)
                if preempted and not cfg.checkpoint.on_sigterm and any_rank(self.preempt.sigterm, self.env.device):
                    reason = f"SIGTERM at step {self.step}: stopped without a checkpoint (checkpoint.on_sigterm=false)"
                    print0(f"{reason}; resume=latest continues from the last checkpoint")
                    result.terminated = True
                    break
                if preempted or self._due(cfg.checkpoint.every_steps):
                    self.save()
                if preempted:
                    if self.env.is_rank0:
                        (self.out_dir / "PREEMPTED").write_text(f"step {self.step}\n")
                    why = self.preempt.reason or "another rank's signal"
                    reason = f"preempted ({why}) at step {self.step}: checkpoint written, requeue with resume=latest"
                    print0(f"preemption signal ({why}): checkpoint at step {self.step} written, exiting for requeue")
                    result.preempted = True
                    break
            else:
                saved = self._due(cfg.checkpoint.every_steps)
                if cfg.checkpoint.save_final and self.step > self.start_step and not saved:
                    self.save()
                if self.env.is_rank0:  # a requeued run that reached max_steps is no longer preempted
                    (self.out_dir / "PREEMPTED").unlink(missing_ok=True)
            status = "KILLED" if result.preempted or result.terminated else "FINISHED"
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            try:
                self.tracker.end(status, reason)
                if self.loader is not None:
                    self.loader.close()
            finally:
                self.release()
                if self.owns_preempt:
                    self.preempt.stop_watching()
        result.step = self.step
        return result


def train(cfg: TrainConfig, preempt: PreemptionFlag | None = None) -> TrainResult:
    """Train per cfg on this process's rank (collective: every rank calls it). preempt: a SIGUSR1 flag."""
    return Trainer(cfg, preempt).fit()
