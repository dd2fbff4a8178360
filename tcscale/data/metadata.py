"""The official TokenCompose training list (metadata.jsonl): one reader for every tool that reads it.

Each line: {"file_name": "000000000142.jpg", "text": caption, "attn_list": [[phrase, mask path or null], ...]}
(../shared/data/tokencompose_coco/metadata.jsonl, docs/DESIGN.md §5).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MetadataRow:
    file_name: str  # image file, relative to the image folder
    text: str  # the caption
    attn_list: tuple[tuple[str, str | None], ...]  # (phrase, mask path or None), in file order
    line: int  # 1-based line number in the file (for messages and provenance)


def read_tokencompose_metadata(path: str | Path) -> Iterator[MetadataRow]:
    """The rows of a metadata.jsonl, skipping blank lines; a malformed line raises ValueError naming file:line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                attn = tuple((str(p), None if m is None else str(m)) for p, m in row["attn_list"])
                yield MetadataRow(str(row["file_name"]), str(row["text"]), attn, lineno)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a TokenCompose metadata line: {exc}") from exc
