"""Write the synthetic shapes world (tcscale.data.synthetic) as grounded WebDataset shards.

    python -m dataprep.synthetic_shards --out data/synth --num 256 --resolution 128
    python -m dataprep.synthetic_shards --out data/synth --num 64 --height 96 --width 160   # non-square

The CPU demo data: exact masks, the same shard format the Grounded-SAM pipeline writes, so the
loader and trainer run end to end without any model. Rerunning completes missing shards only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dataprep.record import GroundedRecord
from dataprep.writer import write_shards
from tcscale.data.synthetic import SyntheticWorld


def synthetic_records(world: SyntheticWorld, indices: Sequence[int], size: tuple[int, int]) -> list[GroundedRecord]:
    out = []
    for i in indices:
        s = world.render(int(i), size)
        out.append(
            GroundedRecord(
                key=s.key,
                image=s.image,
                caption=s.caption,
                phrases=s.phrases,
                masks=list(s.masks),
                source={"dataset": "synthetic_shapes", "world_seed": world.seed, "index": int(i)},
                provenance={"detector": None, "segmenter": "exact (rendered)", "phrase": world.phrase},
            )
        )
    return out


def write_synthetic_shards(
    out: str,
    num: int,
    height: int,
    width: int,
    *,
    seed: int = 1234,
    max_objects: int = 3,
    min_objects: int = 1,
    phrase: str = "colour_shape",
    samples_per_shard: int = 1000,
    prefix: str = "synthetic",
    progress: bool = True,
    mask_format: str = "packbits",
) -> dict:
    world = SyntheticWorld(num, max_objects, seed, phrase, min_objects=min_objects)
    return write_shards(
        list(range(num)),
        lambda idx: synthetic_records(world, idx, (height, width)),
        out,
        prefix=prefix,
        samples_per_shard=samples_per_shard,
        progress=progress,
        mask_format=mask_format,
        run_info={
            "source": "synthetic",
            "seed": seed,
            "num": num,
            "height": height,
            "width": width,
            "min_objects": min_objects,
            "max_objects": max_objects,
        },
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num", type=int, default=256, help="samples in the world (default 256)")
    ap.add_argument("--resolution", type=int, default=128, help="square image side in pixels (default 128)")
    ap.add_argument("--height", type=int, default=None, help="image height (overrides --resolution)")
    ap.add_argument("--width", type=int, default=None, help="image width (overrides --resolution)")
    ap.add_argument("--seed", type=int, default=1234, help="world seed (default 1234)")
    ap.add_argument("--max-objects", type=int, default=3, help="objects per image, 1..6 (default 3)")
    ap.add_argument("--min-objects", type=int, default=1, help="fewest objects per image, 1..max (default 1)")
    ap.add_argument("--phrase", choices=["colour_shape", "shape"], default="colour_shape")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--prefix", default="synthetic")
    ap.add_argument("--mask-format", choices=["packbits", "uint8"], default="packbits")
    args = ap.parse_args(argv)
    summary = write_synthetic_shards(
        args.out,
        args.num,
        args.height or args.resolution,
        args.width or args.resolution,
        seed=args.seed,
        max_objects=args.max_objects,
        min_objects=args.min_objects,
        phrase=args.phrase,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
        mask_format=args.mask_format,
    )
    print(f"{summary['samples']} samples in {args.out}/{summary['shards']} (data.shards)")


if __name__ == "__main__":
    main()
