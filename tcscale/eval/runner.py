"""One evaluation run: generate -> detect -> score per suite, each stage resumable, then results.json.

Stages read the previous stage's files and skip what is on disk (STYLE "evaluation as stages that resume"):

    <output_dir>/<suite>/items.jsonl            every (prompt, round) with its seed (rank 0, before generating)
    <output_dir>/<suite>/images/<key>.png       generated, this rank's share: items[rank::world]
    <output_dir>/<suite>/generated-rank<R>.jsonl which rank made which image (appended as they are written)
    <output_dir>/<suite>/detections/<key>.json  the detector's output per image
    <output_dir>/results.json, table.md         rank 0, once every suite is scored (temp name, then rename)

Suites (`tcscale.eval.suites.SUITES`, run in that order): multigen (per prompt set; OWLv2), visor (OWL-ViT),
synthetic (the synthetic world's exact scorer), sepen, fid and fid_flickr30k (image-caption pairs, clean-fid),
grounding (held-out mIoU, no generation), daam_cocogen (Table 4: COCO-Gen's images inverted, one records file per
image), latency (rank 0). Each suite samples in its own precision (`<suite>.dtype`, null: `model.dtype`) and
records what it ran (suite, precision, sample count, sampler) under results.json "protocol", keyed by its metrics'
prefix (e.g. "multigen/coco"), which `tcscale.eval.compare` checks against the paper's. Collective parts
(waiting for every rank) go through the `barrier` the launcher passes in: this module knows nothing of process
groups, and ranks exchange results through files.

Phases (`Evaluation(..., phase=)`): "all" (one job: every rank generates and detects its share, rank 0 scores);
"share" (an array task acting as rank R of a world of N, needing no other task: it generates and detects
items[R::N] of every suite, writes its grounding records and stats, then `shards/rank<R>-of<N>.json`; no scoring);
"merge" (after every share finished: reads all N shares' files, scores, writes results.json; generates nothing).
"share" + "merge" give the same files and results as "all" on N ranks.

    <output_dir>/shards/rank<R>-of<N>.json      a finished share (phase "share"); the merge needs all N
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tcscale.eval.config import EvalConfig, FIDCommon
from tcscale.eval.generation import (
    EvalInputError,
    GenItem,
    detect_missing,
    generate_missing,
    image_seed,
    load_pipeline,
    native_resolution,
    precision_name,
    rank_items,
    read_detections,
    write_items,
    write_json_atomic,
)
from tcscale.eval.suites import SUITES

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
SHIPPED_SETS = {"coco": "coco_obj_comp_5_1k.json", "ade20k": "ade20k_obj_comp_5_1k.json"}


PHASES = ("all", "share", "merge")
SHARD_RE = re.compile(r"^rank(\d+)-of(\d+)\.json$")


def shard_marker(out: Path, rank: int, world_size: int) -> Path:
    return Path(out) / "shards" / f"rank{rank}-of{world_size}.json"


def finished_shards(out: Path) -> tuple[int, list[int]]:
    """(array size N, finished ranks) from `<out>/shards/`; EvalInputError when there is none, when markers of
    different array sizes are mixed, or when a rank of 0..N-1 has not finished (naming them)."""
    found: dict[int, set[int]] = {}
    folder = Path(out) / "shards"
    for path in sorted(folder.glob("rank*-of*.json")) if folder.is_dir() else []:
        m = SHARD_RE.match(path.name)
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not found:
        raise EvalInputError(f"{folder}: no finished share (run the array tasks first: launchers/eval.py --shard R/N)")
    if len(found) > 1:
        raise EvalInputError(f"{folder}: shares of different array sizes {sorted(found)}; keep one set of markers")
    ((world, ranks),) = found.items()
    missing = sorted(set(range(world)) - ranks)
    if missing:
        raise EvalInputError(
            f"{folder}: array task(s) {missing} of {world} have not finished; rerun them (finished images are skipped)"
        )
    return world, sorted(ranks)


def check_shard_world(out: Path, world_size: int) -> None:
    """A share must use the array size of the shares already finished in `out` (else items would be split twice)."""
    folder = Path(out) / "shards"
    sizes = (
        {int(m.group(2)) for p in folder.glob("rank*-of*.json") if (m := SHARD_RE.match(p.name))}
        if folder.is_dir()
        else set()
    )
    if sizes and sizes != {world_size}:
        raise EvalInputError(
            f"{out}: earlier array tasks split the items over {sorted(sizes)} task(s), this one over {world_size}; "
            f"retry with the same array size (eval.sbatch: TCSCALE_EVAL_SHARDS={min(sizes)}) or remove {folder}"
        )


@dataclass
class EvalContext:
    """Where this process stands: its rank, the world, its device, and how to wait for the others."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    barrier: Callable[[], None] = lambda: None
    progress: bool = True

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        from tcscale.logs import get_logger

        get_logger().info(message)

    def log0(self, message: str) -> None:
        if self.is_rank0:
            self.log(message)


# -- the model ---------------------------------------------------------------------------------------
def model_path(cfg: EvalConfig, ctx: EvalContext, independent: bool = False) -> str:
    """The pipeline to load: `model.pretrained`, or the export of `model.run_dir`'s checkpoint (rank 0 exports it
    into <run_dir>/export/<tag> once; the other ranks wait). `independent` (array tasks, no barrier): whichever task
    comes first exports, under a file lock, and the others wait for the lock."""
    if cfg.model.pretrained is not None:
        return cfg.model.pretrained
    from tcscale.train.checkpoint import latest_tag

    run_dir = Path(cfg.model.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise EvalInputError(f"model.run_dir={run_dir}: not a tcscale run directory (no config.yaml)")
    tag = cfg.model.tag or latest_tag(run_dir / "checkpoints")
    if tag is None:
        raise EvalInputError(f"model.run_dir={run_dir}: no checkpoint to evaluate (checkpoints/latest missing)")
    out = run_dir / "export" / tag
    if (ctx.is_rank0 or independent) and not (out / "model_index.json").is_file():
        import fcntl

        from tcscale.train.export import export_pipeline

        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{tag}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (out / "model_index.json").is_file():
                ctx.log(f"exporting {run_dir} checkpoint {tag} to {out}")
                export_pipeline(run_dir, out, tag)
    ctx.barrier()
    return str(out)


# -- suites ------------------------------------------------------------------------------------------
def multigen_items(cfg: EvalConfig, set_name: str) -> tuple[str, list[GenItem]]:
    from tcscale.eval.multigen import load_multigen_prompts

    path = PROMPT_DIR / SHIPPED_SETS[set_name] if set_name in SHIPPED_SETS else Path(set_name)
    if not path.is_file():
        raise EvalInputError(f"multigen.sets: prompt file not found: {path} (or one of {sorted(SHIPPED_SETS)})")
    prompts = load_multigen_prompts(path)
    if cfg.multigen.limit is not None:
        prompts = prompts[: cfg.multigen.limit]
    name = set_name if set_name in SHIPPED_SETS else path.stem
    suite = f"multigen_{name}"
    items = [
        GenItem(
            f"{p['prompt_id']:05d}_{r:02d}" if isinstance(p["prompt_id"], int) else f"{p['prompt_id']}_{r:02d}",
            p["prompt"],
            image_seed(cfg.seed, suite, p["prompt_id"], r),
            {"prompt_id": p["prompt_id"], "round": r, "objects": list(p["objects"])},
        )
        for p in prompts
        for r in range(cfg.multigen.rounds)
    ]
    return name, items


def visor_items(cfg: EvalConfig) -> list[GenItem]:
    from tcscale.eval.visor import visor_prompts

    prompts = visor_prompts()
    if cfg.visor.limit is not None:
        prompts = prompts[: cfg.visor.limit]
    return [
        GenItem(
            f"{p['prompt_id']:05d}_{r:02d}",
            p["prompt"],
            image_seed(cfg.seed, "visor", p["prompt_id"], r),
            {"prompt_id": p["prompt_id"], "round": r, "objects": list(p["objects"]), "relation": p["relation"]},
        )
        for p in prompts
        for r in range(cfg.visor.rounds)
    ]


def synthetic_items(cfg: EvalConfig, k: int) -> list[GenItem]:
    from tcscale.data.synthetic import synthetic_eval_prompts

    prompts = synthetic_eval_prompts(k, cfg.synthetic.split, cfg.synthetic.num_prompts, seed=cfg.seed)
    suite = f"synthetic_k{k}"
    return [
        GenItem(
            f"{i:04d}_{r:02d}",
            p["prompt"],
            image_seed(cfg.seed, suite, i, r),
            {"prompt_id": i, "round": r, "objects": [f"{c} {s}" for c, s in p["objects"]]},
        )
        for i, p in enumerate(prompts)
        for r in range(cfg.synthetic.rounds)
    ]


def sepen_items(cfg: EvalConfig) -> list[GenItem]:
    """SepEn pair prompts ("a photo of a {a} and a {b}", the paper's wording with articles) with seeds 0..N-1."""
    from tcscale.objectives.sepen_prompts import (
        CONCEPTS_DIR,
        article,
        load_concept_file,
        pair_concepts,
        split_seen_unseen,
    )

    s = cfg.sepen
    if s.concepts == "pairs":
        pairs = pair_concepts()
    else:
        nouns = load_concept_file(CONCEPTS_DIR / "coco_large.txt" if s.concepts == "large" else s.concepts)
        if s.split != "all":
            nouns = list(getattr(split_seen_unseen(nouns), s.split))
        pairs = [(a, b) for i, a in enumerate(nouns) for b in nouns[i + 1 :]]
    if s.num_pairs is not None:
        pairs = pairs[: s.num_pairs]
    items = []
    for i, (a, b) in enumerate(pairs):
        prompt = f"a photo of {article(a)} {a} and {article(b)} {b}"
        for r in range(s.images_per_prompt):
            items.append(GenItem(f"{i:04d}_{r:03d}", prompt, r, {"prompt_id": i, "round": r, "objects": [a, b],
                                                                 "prompt": prompt}))  # fmt: skip
    return items


class Evaluation:
    """Runs the enabled suites of `cfg` on this rank; rank 0 returns the results."""

    def __init__(self, cfg: EvalConfig, ctx: EvalContext, *, fid_extractor: Callable | None = None, phase: str = "all"):
        """`fid_extractor`: a feature extractor instead of clean-fid's Inception (tests inject a local one).
        `phase`: "all", "share" or "merge" (module docstring); for "merge", ctx.world_size is the array size."""
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r} is not one of {PHASES}")
        self.cfg, self.ctx = cfg, ctx
        self.phase = phase
        self.generates = phase != "merge"  # this process makes (and detects) its share of the images
        self.scores = phase == "merge" or (phase == "all" and ctx.is_rank0)  # ... and this one scores them
        self._pipe = None
        self._pipe_dtype: str | None = None  # the precision the loaded pipeline runs in ("fp32" on a CPU)
        self.dtype = cfg.model.dtype  # the precision asked for by the suite now running
        self.model_name: str | None = None
        self.fid_extractor = fid_extractor
        self.out = Path(cfg.output_dir)
        self.metrics: dict[str, float] = {}
        self.details: dict[str, Any] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.protocol: dict[str, dict[str, Any]] = {}  # metric prefix -> what was run (results.json "protocol")
        self.artifacts: list[Path] = []

    @property
    def pipe(self):
        """The pipeline in the current suite's precision, loaded on first use (a merge of detection suites never
        needs it) and reloaded, not cast, when a suite asks for another precision (a cast fp32 -> fp16 -> fp32 would
        round the weights)."""
        want = precision_name(self.dtype, self.ctx.device)
        if self._pipe is None or self._pipe_dtype != want:
            self._pipe = None  # free the other precision's copy first
            self._pipe = load_pipeline(self.model_name, self.cfg.model, self.cfg.sampler, self.ctx.device,
                                       dtype=self.dtype)  # fmt: skip
            self._pipe_dtype = want
        return self._pipe

    def use_precision(self, section) -> str:
        """Make `section.dtype` (null: model.dtype) the current precision; returns what actually runs ("fp32" on
        a CPU whatever is asked)."""
        self.dtype = getattr(section, "dtype", None) or self.cfg.model.dtype
        return precision_name(self.dtype, self.ctx.device)

    def record_protocol(self, prefix: str, suite: str, samples: int, *, sampler: bool = True, **extra: Any) -> None:
        """What a suite ran, for results.json "protocol" (compare reads it against the paper's)."""
        entry: dict[str, Any] = {"suite": suite, "precision": precision_name(self.dtype, self.ctx.device)}
        if self.dtype != entry["precision"]:
            entry["requested_precision"] = self.dtype
        entry["samples"] = int(samples)
        if sampler:
            s = self.cfg.sampler
            size = s.resolution or (native_resolution(self._pipe) if self._pipe is not None else "native")
            entry["sampler"] = f"{s.scheduler}, {s.num_inference_steps} steps, CFG {s.guidance_scale:g}, {size} px"
        self.protocol[prefix] = {**entry, **extra}

    def _rank_files(self, root: Path, pattern: str) -> list[Path]:
        """`pattern.format(rank=r)` under root for every rank; a missing one is an error naming the rank."""
        paths = [root / pattern.format(rank=r) for r in range(self.ctx.world_size)]
        missing = [r for r, p in enumerate(paths) if not p.is_file()]
        if missing:
            raise EvalInputError(
                f"{root}: no {pattern.format(rank='<R>')} of rank(s) {missing}: did every rank finish?"
            )
        return paths

    # generation common to the detection suites
    def _generate(self, suite: str, items: list[GenItem]) -> Path:
        ctx = self.ctx
        root = self.out / suite
        if self.generates:
            if ctx.is_rank0:
                root.mkdir(parents=True, exist_ok=True)
                write_items(root / "items.jsonl", items)
            ctx.barrier()
            stats = generate_missing(
                self.pipe, rank_items(items, ctx.rank, ctx.world_size), root / "images", self.cfg.sampler,
                rank=ctx.rank, log=ctx.log, progress=ctx.progress,
            )  # fmt: skip
            write_json_atomic(root / f"stats-rank{ctx.rank}.json", asdict(stats))
        ctx.barrier()
        if self.scores:
            totals: dict[str, int] = {}
            for path in self._rank_files(root, "stats-rank{rank}.json"):
                for k, v in json.loads(path.read_text()).items():
                    totals[k] = totals.get(k, 0) + v
            self.counts[suite] = totals
            ctx.log0(f"{suite}: {totals['generated']} generated, {totals['existing']} found on disk, "
                     f"{totals['unreadable']} unreadable regenerated, {len(items)} in all")  # fmt: skip
        return root

    def _detect(self, suite: str, items: list[GenItem], detector) -> list[dict] | None:
        ctx = self.ctx
        root = self.out / suite
        if self.generates:
            n = detect_missing(
                detector, rank_items(items, ctx.rank, ctx.world_size), root / "images", root / "detections",
                batch_size=getattr(detector, "batch_size", 8),
            )  # fmt: skip
            ctx.log(f"rank {ctx.rank}: {suite}: detected {n} images")
        ctx.barrier()
        return read_detections(items, root / "detections") if self.scores else None

    def _sample_grid(self, suite: str, items: list[GenItem], n: int = 8) -> None:
        from PIL import Image

        picks = items[:n]
        images = [Image.open(self.out / suite / "images" / f"{it.key}.png").convert("RGB") for it in picks]
        if not images:
            return
        w, h = images[0].size
        grid = Image.new("RGB", (w * len(images), h))
        for i, im in enumerate(images):
            grid.paste(im.resize((w, h)), (i * w, 0))
        path = self.out / suite / "samples.png"
        grid.save(path)
        self.artifacts.append(path)

    def run_multigen(self) -> None:
        from tcscale.eval.detect import OpenVocabDetector
        from tcscale.eval.multigen import (
            category_success_rates,
            multigen_metrics,
            multigen_scores,
            plot_category_success,
        )

        mg = self.cfg.multigen
        self.use_precision(mg)
        detector = None
        for set_name in mg.sets:
            name, items = multigen_items(self.cfg, set_name)
            suite = f"multigen_{name}"
            self._generate(suite, items)
            if detector is None and self.generates:
                self.ctx.log0(f"loading detector {mg.detector}")
                detector = OpenVocabDetector.from_pretrained(
                    mg.detector, threshold=mg.threshold, batch_size=mg.detector_batch_size, device=str(self.ctx.device)
                )
            records = self._detect(suite, items, detector)
            if records is None:
                continue
            num_objects = max(len(it.meta["objects"]) for it in items)
            scores = multigen_scores(records, threshold=mg.threshold, num_objects=num_objects)
            self.metrics.update(multigen_metrics(scores, f"multigen/{name}"))
            prompts = len({it.meta["prompt_id"] for it in items})
            self.record_protocol(f"multigen/{name}", "multigen", len(records), prompts=prompts)
            rates = category_success_rates(records, threshold=mg.threshold)
            self.details[suite] = {"scores": scores, "category_success": rates, "images": len(records)}
            self.artifacts.append(plot_category_success(rates, self.out / suite / "category_success.png", title=suite))
            self._sample_grid(suite, items)

    def run_visor(self) -> None:
        from tcscale.eval.detect import OpenVocabDetector
        from tcscale.eval.visor import visor_metrics, visor_scores

        v = self.cfg.visor
        self.use_precision(v)
        items = visor_items(self.cfg)
        self._generate("visor", items)
        detector = None
        if self.generates:
            self.ctx.log0(f"loading detector {v.detector}")
            detector = OpenVocabDetector.from_pretrained(
                v.detector,
                threshold=v.threshold,
                batch_size=v.detector_batch_size,
                device=str(self.ctx.device),
                clip_boxes=v.clip_boxes,
            )
        records = self._detect("visor", items, detector)
        if records is not None:
            scores = visor_scores(records, threshold=v.threshold, num_images=v.rounds)
            self.metrics.update(visor_metrics(scores))
            self.record_protocol("visor", "visor", len(records), clip_boxes=v.clip_boxes)
            self.details["visor"] = scores
            self._sample_grid("visor", items)

    def run_synthetic(self) -> None:
        from PIL import Image

        from tcscale.eval.multigen import multigen_scores
        from tcscale.eval.synthetic_scorer import detect_shapes, pixel_noise

        def detector(images, categories):
            out = []
            for im in images:
                dets = detect_shapes(im)
                out.append({"labels": [d["label"] for d in dets], "scores": [float(d["score"]) for d in dets]})
            return out

        self.use_precision(self.cfg.synthetic)
        for k in self.cfg.synthetic.num_objects:
            suite = f"synthetic_k{k}"
            items = synthetic_items(self.cfg, k)
            self._generate(suite, items)
            records = self._detect(suite, items, detector)
            if records is None:
                continue
            scores = multigen_scores(records, threshold=0.5, num_objects=k)
            self.metrics[f"synthetic/k{k}/all_objects"] = scores[f"MG{k}"]["mean"] / 100.0
            self.metrics[f"synthetic/k{k}/all_objects_std"] = scores[f"MG{k}"]["std"] / 100.0
            for j in range(1, k + 1):
                self.metrics[f"synthetic/k{k}/MG{j}"] = scores[f"MG{j}"]["mean"]
            noise = [pixel_noise(Image.open(self.out / suite / "images" / f"{it.key}.png")) for it in items]
            self.metrics[f"synthetic/k{k}/pixel_noise"] = sum(noise) / len(noise)
            self.details[suite] = {"scores": scores, "images": len(records)}
            self.record_protocol(f"synthetic/k{k}", "synthetic", len(records))
            self._sample_grid(suite, items)

    def run_sepen(self) -> None:
        from dataclasses import replace

        from tcscale.eval.detect import OpenVocabDetector
        from tcscale.eval.sepen_protocol import (
            DETECTOR_NOTE,
            BlipCaptioner,
            ClipTextEmbedder,
            sepen_scores,
            success_threshold,
        )

        s, ctx = self.cfg.sepen, self.ctx
        self.use_precision(s)
        items = sepen_items(self.cfg)
        sampler = self.cfg.sampler
        self.cfg.sampler = replace(sampler, guidance_scale=s.guidance_scale)  # the protocol's CFG for this suite
        try:
            self._generate("sepen", items)
            self.record_protocol("sepen", "sepen", len(items), setting=s.setting)
        finally:
            self.cfg.sampler = sampler
        detector = None
        if self.generates:
            detector = OpenVocabDetector.from_pretrained(
                s.detector, threshold=0.0, batch_size=s.detector_batch_size, device=str(ctx.device)
            )
        records = self._detect("sepen", items, detector)
        if records is None:
            return
        captioner = embedder = None
        if s.captioner:
            from PIL import Image

            captioner = BlipCaptioner.from_pretrained(s.captioner, device=str(ctx.device))
            embedder = ClipTextEmbedder.from_pretrained(s.text_model, device=str(ctx.device))
            for rec in records:
                rec["image"] = Image.open(self.out / "sepen" / "images" / f"{rec['key']}.png").convert("RGB")
        scores = sepen_scores(records, setting=s.setting, captioner=captioner, embedder=embedder)
        for rec in records:
            rec.pop("image", None)
        self.metrics.update({f"sepen/{k}": float(v) for k, v in scores.items() if k != "images"})
        self.details["sepen"] = {"scores": scores, "threshold": success_threshold(s.setting), "note": DETECTOR_NOTE}
        self._sample_grid("sepen", items)

    def run_grounding(self) -> None:
        from tcscale.attention.plan import GroundingPlan, vae_scale_factor
        from tcscale.eval.grounding_maps import grounding_batches, grounding_records, summarize_grounding
        from tcscale.families import family_of_pipeline

        self.use_precision(None)  # model.dtype: one U-Net forward per sample and timestep
        g, ctx, pipe = self.cfg.grounding, self.ctx, self.pipe
        family = family_of_pipeline(pipe)
        resolution = g.resolution or self.cfg.sampler.resolution or native_resolution(pipe)
        denoiser = family.denoiser(pipe)
        plan = GroundingPlan.build(
            denoiser, blocks=list(g.blocks), resolutions=g.resolutions, image_resolution=resolution,
            scale_factor=vae_scale_factor(pipe.vae), layout=family.layout,
        )  # fmt: skip
        root = self.out / "grounding"
        if self.generates:
            ctx.log0(
                f"grounding: {g.num_samples} held-out samples ({g.source}), {len(plan.layers)} layers, t={g.timesteps}"
            )
            batches = grounding_batches(
                g.source, pipe.tokenizer, resolution=resolution, num_samples=g.num_samples, batch_size=g.batch_size,
                rank=ctx.rank, world_size=ctx.world_size, shards=g.shards, synthetic_split=g.synthetic_split,
                synthetic_seed=g.synthetic_seed, max_objects=g.synthetic_max_objects,
                min_objects=g.synthetic_min_objects,
            )  # fmt: skip
            records = grounding_records(
                denoiser, pipe.vae, pipe, pipe.scheduler, plan, batches, timesteps=list(g.timesteps),
                threshold=g.threshold, seed=self.cfg.seed, device=ctx.device, family=family.name,
            )  # fmt: skip
            root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(root / f"records-rank{ctx.rank}.json", records)
        ctx.barrier()
        if self.scores:
            merged = []
            for path in self._rank_files(root, "records-rank{rank}.json"):
                merged.extend(json.loads(path.read_text()))
            self.metrics.update(summarize_grounding(merged))
            self.record_protocol("grounding", "grounding", len(merged), sampler=False, timesteps=list(g.timesteps))
            self.details["grounding"] = {"layers": list(plan.layers), "records": len(merged)}

    def run_daam_cocogen(self) -> None:
        """Table 4: null-text inversion of each COCO-Gen image under the model, DAAM heat maps, mIoU (daam.py)."""
        from tcscale.attention.plan import GroundingPlan, vae_scale_factor
        from tcscale.eval.daam import cocogen_items, daam_image_records, summarize_daam, write_records
        from tcscale.families import family_of_pipeline

        d, ctx = self.cfg.daam_cocogen, self.ctx
        self.use_precision(None)  # model.dtype: the inversion optimises in it
        items = cocogen_items(d.data_dir, d.limit)
        root = self.out / "daam_cocogen" / "records"
        if self.generates:
            pipe = self.pipe
            resolution = d.resolution or native_resolution(pipe)
            plan = GroundingPlan.build(
                pipe.unet, blocks=["down", "up"], resolutions=None, image_resolution=resolution,
                scale_factor=vae_scale_factor(pipe.vae), layout=family_of_pipeline(pipe).layout,
            )  # fmt: skip
            root.mkdir(parents=True, exist_ok=True)
            mine = rank_items(items, ctx.rank, ctx.world_size)
            for n, item in enumerate(mine, start=1):
                path = root / f"{item['key']}.json"
                if not path.is_file():  # one file per image: a killed run resumes at the next image
                    write_records(path, daam_image_records(pipe, plan, item, d, resolution, ctx.device))
                ctx.log(f"rank {ctx.rank}: daam_cocogen: {n}/{len(mine)} images inverted and scored")
        ctx.barrier()
        if self.scores:
            records = []
            for item in items:
                path = root / f"{item['key']}.json"
                if not path.is_file():
                    raise EvalInputError(f"daam_cocogen: {path} missing: did every rank finish?")
                records += json.loads(path.read_text())
            self.metrics.update(summarize_daam(records))
            self.details["daam_cocogen"] = {"images": len(items), "words": len(records)}
            self.record_protocol(
                "daam_cocogen", "daam_cocogen", len(items), sampler=False, words=len(records),
                steps=d.num_inference_steps, guidance=d.guidance_scale, threshold=d.threshold,
            )  # fmt: skip

    def run_fid(self) -> None:
        """FID (C): pairs sampled from a COCO captions file (val2014 or val2017)."""
        f = self.cfg.fid
        self._run_fid("fid", f, lambda root: f.captions_json)

    def run_fid_flickr30k(self) -> None:
        """FID (F): pairs sampled from a Flickr30K Entities split, imported into a COCO-shaped captions file."""
        from tcscale.eval.flickr30k import write_flickr30k_captions

        f = self.cfg.fid_flickr30k

        def captions(root: Path) -> str:
            return str(write_flickr30k_captions(f.entities_dir, f.split, root / f"flickr30k_{f.split}_captions.json"))

        self._run_fid("fid_flickr30k", f, captions)

    def _run_fid(self, suite: str, f: FIDCommon, captions_json: Callable[[Path], str | None]) -> None:
        from tcscale.eval.fid import (
            InceptionFeatureExtractor,
            fid_score,
            load_caption_sample,
            open_images,
            reference_files,
            sample_coco_captions,
        )

        ctx = self.ctx
        self.use_precision(f)
        root = self.out / suite
        pair_file = root / "captions.json"
        # one job: rank 0 writes the pair list; array tasks each write it if absent (the same file: a seeded sample,
        # written atomically); the merge reads it
        if (ctx.is_rank0 and self.phase == "all") or self.phase == "share":
            root.mkdir(parents=True, exist_ok=True)
            if f.caption_list:
                reused = load_caption_sample(f.caption_list)
                write_json_atomic(pair_file, {"source": str(f.caption_list), "captions": reused})
            elif not pair_file.is_file():  # sampled once with the eval seed, then reused (and shareable)
                sample_coco_captions(captions_json(root), n=f.num_images, seed=self.cfg.seed, out_path=pair_file)
        ctx.barrier()
        pairs = load_caption_sample(pair_file)
        if not f.caption_list and len(pairs) != f.num_images:
            raise EvalInputError(
                f"{pair_file} holds {len(pairs)} pairs but {suite}.num_images={f.num_images}: remove it to sample again"
            )
        items = [
            GenItem(f"{i:05d}", p["caption"], image_seed(self.cfg.seed, suite, i, 0), dict(p))
            for i, p in enumerate(pairs)
        ]
        real_paths = [Path(f.images_dir) / name for name in reference_files(pairs, f.reference)]
        missing = [p for p in real_paths if not p.is_file()]
        if missing:  # checked before generating: a missing real image would otherwise surface after hours
            raise EvalInputError(f"{suite}.images_dir: {len(missing)} real images missing (first: {missing[0]})")
        self._generate(suite, items)
        if not self.scores:
            return
        extractor = self.fid_extractor or InceptionFeatureExtractor(weights_dir=f.weights_dir, device=str(ctx.device))
        ctx.log0(f"{suite}: Inception features of {len(items)} generated and {len(real_paths)} real images")
        cache = Path(f.stats_cache or self.out / "fid_stats") / (
            f"{f.name}_seed{self.cfg.seed}_n{len(items)}_{f.reference}.npz"
        )
        meta = {"name": f.name, "pairs": len(items), "real_images": len(real_paths), "reference": f.reference,
                "seed": self.cfg.seed, "extractor": type(extractor).__name__}  # fmt: skip
        self.metrics[f"fid/{f.name}"] = fid_score(
            open_images(root / "images" / f"{it.key}.png" for it in items),
            lambda: open_images(real_paths),
            extractor,
            real_cache=cache,
            meta=meta,
        )
        self.record_protocol(f"fid/{f.name}", suite, len(items), reference=f.reference, real_images=len(real_paths))

    def run_latency(self) -> None:
        if not self.scores:  # timed once, by the scoring process (rank 0 of one job, or the merge)
            return
        lat, sampler = self.cfg.latency, self.cfg.sampler
        self.use_precision(lat)

        def seconds_per_image(pipe) -> float:
            resolution = sampler.resolution or native_resolution(pipe)
            call = dict(height=resolution, width=resolution, num_inference_steps=sampler.num_inference_steps,
                        guidance_scale=sampler.guidance_scale)  # fmt: skip
            pipe("a photo of a cat and a dog", **call)  # warm-up
            sync = torch.cuda.synchronize if self.ctx.device.type == "cuda" else (lambda: None)
            times = []
            for i in range(lat.prompts):
                sync()
                t0 = time.perf_counter()
                pipe("a photo of a cat and a dog", generator=torch.Generator(self.ctx.device).manual_seed(i), **call)
                sync()
                times.append(time.perf_counter() - t0)
            return float(sorted(times)[len(times) // 2])

        self.metrics["latency/s_per_image"] = seconds_per_image(self.pipe)
        device = torch.cuda.get_device_name(self.ctx.device) if self.ctx.device.type == "cuda" else "cpu"
        self.record_protocol("latency", "latency", lat.prompts, device=device)
        if lat.base:
            from tcscale.eval.config import EvalModelConfig

            base = load_pipeline(lat.base, EvalModelConfig(pretrained=lat.base), sampler, self.ctx.device,
                                 dtype=self.dtype)  # fmt: skip
            self.metrics["latency/base_s_per_image"] = seconds_per_image(base)
            self.metrics["latency/ratio_vs_base"] = (
                self.metrics["latency/s_per_image"] / self.metrics["latency/base_s_per_image"]
            )

    # the whole run
    def run(self) -> dict | None:
        cfg, ctx = self.cfg, self.ctx
        if self.phase == "share":
            check_shard_world(self.out, ctx.world_size)
        path = model_path(cfg, ctx, independent=self.phase != "all")
        if self.phase == "all":
            ctx.log0(f"evaluating {path} on {ctx.world_size} rank(s), device {ctx.device}")
            self.model_name = path
            self.pipe  # loaded before any suite: a bad model fails fast  # noqa: B018
        elif self.phase == "share":
            ctx.log(f"evaluating {path}: share {ctx.rank} of {ctx.world_size}, device {ctx.device}")
        else:
            ctx.log(f"merging the {ctx.world_size} shares of {path} in {self.out}")
        self.model_name = path
        for suite in SUITES:
            if getattr(cfg, suite.name).enabled:
                getattr(self, f"run_{suite.name}")()
        ctx.barrier()
        if self.phase == "share":
            write_json_atomic_mkdir(
                shard_marker(self.out, ctx.rank, ctx.world_size),
                {"rank": ctx.rank, "world_size": ctx.world_size, "model": path,
                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            )  # fmt: skip
            return None
        if not self.scores:
            return None
        return self.write_results()

    def write_results(self) -> dict:
        from tcscale.config import flatten
        from tcscale.eval.compare import compare_table

        results = {
            "name": self.cfg.name,
            "model": self.model_name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": self.metrics,
            "protocol": self.protocol,
            "details": {**self.details, "counts": self.counts},
            "config": flatten(asdict(self.cfg)),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "results.json", results)
        table = compare_table([results])
        (self.out / "table.md.tmp").write_text(table + "\n")
        (self.out / "table.md.tmp").replace(self.out / "table.md")
        return results


def write_json_atomic_mkdir(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def run_share(cfg: EvalConfig, rank: int, world_size: int, device: torch.device, progress: bool = False) -> None:
    """One array task: generate and detect the share `rank` of `world_size` of every suite (no other task needed)."""
    Evaluation(cfg, EvalContext(rank, world_size, device, progress=progress), phase="share").run()


def run_merge(cfg: EvalConfig, device: torch.device) -> tuple[dict, Evaluation]:
    """After every share finished: score them all, write results.json; returns (results, the evaluation)."""
    world, _ = finished_shards(Path(cfg.output_dir))
    evaluation = Evaluation(cfg, EvalContext(0, world, device, progress=False), phase="merge")
    return evaluation.run(), evaluation
