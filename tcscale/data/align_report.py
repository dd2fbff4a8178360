"""Report how many phrases of a grounded metadata file align to caption tokens.

    python -m tcscale.data.align_report ../shared/data/tokencompose_coco/metadata.jsonl
    python -m tcscale.data.align_report 'data/grounded-{000000..000003}.tar'     # shards' json

Reads TokenCompose's metadata.jsonl ({"file_name", "text", "attn_list": [[phrase, mask|null], ...]})
or the json of WebDataset shards, tokenizes each caption with the SD1.x CLIP tokenizer (or a
saved tokenizer folder, --tokenizer) exactly as the loader does, and prints the aligned fraction of
the phrases that have a mask, the drop reasons and examples. --json writes the report.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tcscale.data.align import PhraseAligner
from tcscale.data.metadata import read_tokencompose_metadata


def metadata_rows(path: str | Path) -> Iterator[tuple[str, str, list[tuple[str, object]]]]:
    """(sample id, caption, [(phrase, mask path or None)]) per line of a TokenCompose metadata.jsonl."""
    for row in read_tokencompose_metadata(path):
        yield row.file_name, row.text, list(row.attn_list)


def read_shard_json(pattern: str) -> Iterator[tuple[str, str, list[tuple[str, object]]]]:
    import webdataset as wds

    for url in wds.shardlists.expand_urls(pattern):
        for sample in wds.tariterators.tarfile_samples([{"url": url}]):
            meta = json.loads(sample["json"])
            yield sample["__key__"], meta["caption"], [(p["text"], p["mask"]) for p in meta["phrases"]]


def alignment_report(rows, tokenizer, max_examples: int = 20) -> dict:
    """Counts over all rows: phrases, phrases with masks, aligned, drop reasons, examples of failures."""
    aligner = PhraseAligner(tokenizer, max_length=77)
    counts: Counter = Counter()
    examples = []
    for sample_id, caption, phrases in rows:
        counts["samples"] += 1
        counts["phrases"] += len(phrases)
        grounded = [p for p, mask in phrases if mask is not None]
        counts["phrases_with_mask"] += len(grounded)
        al = aligner.align(caption, grounded)
        for phrase, reason in zip(grounded, al.reasons):
            if reason is None:
                counts["aligned"] += 1
            else:
                counts[f"dropped/{reason}"] += 1
                if len(examples) < max_examples:
                    examples.append({"id": sample_id, "caption": caption, "phrase": phrase, "reason": reason})
    n = counts["phrases_with_mask"]
    return {
        "samples": counts["samples"],
        "phrases": counts["phrases"],
        "phrases_with_mask": n,
        "aligned": counts["aligned"],
        "aligned_fraction": counts["aligned"] / n if n else 1.0,
        "dropped": {k.split("/", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("dropped/")},
        "examples": examples,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="metadata.jsonl (TokenCompose format) or a brace-named shard pattern (*.tar)")
    ap.add_argument("--tokenizer", default=None, help="saved tokenizer folder (default: SD1.x CLIP from open_clip)")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from tcscale.models.tokenizer import sd_clip_tokenizer

        tokenizer = sd_clip_tokenizer()
    rows = read_shard_json(args.source) if ".tar" in args.source else metadata_rows(args.source)
    report = alignment_report(rows, tokenizer)
    print(
        f"{report['aligned']} / {report['phrases_with_mask']} phrases with a mask aligned "
        f"({100 * report['aligned_fraction']:.2f} %) over {report['samples']} captions; dropped: {report['dropped']}"
    )
    for ex in report["examples"][:10]:
        print(f"  [{ex['reason']}] {ex['phrase']!r} in {ex['caption']!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
