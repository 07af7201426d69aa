"""Turn a `generations.parquet` (id, sample, prompt_messages, reply) plus its eval dataset into
judge items; the eval rows supply `meta` (references, ground truth)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..data import ROLES, Dataset, DatasetError, Message
from .records import JudgeItem

COLUMNS = ("id", "sample", "prompt_messages", "reply")


def _prompt(path: Path, row: int, value: Any) -> list[Message]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DatasetError(path, "must be a JSON list of {role, content} messages", row,
                               "prompt_messages") from None
    if not isinstance(value, list) or not value:
        raise DatasetError(path, "must be a non-empty list of {role, content} messages", row, "prompt_messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str) \
                or m["role"] not in ROLES:
            raise DatasetError(path, f"message {j} needs a known string 'role' and a string 'content'", row,
                               "prompt_messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_generation_items(path: str | Path, dataset: Dataset) -> list[JudgeItem]:
    """One item per generations row; every id must be a row of `dataset`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(path, f"not a readable parquet file ({e})") from None
    for col in COLUMNS:
        if col not in table.column_names:
            raise DatasetError(path, "missing required column", field=col)
    if table.num_rows == 0:
        raise DatasetError(path, "generations file has no rows")
    meta = {e.id: e.meta for e in dataset.examples}
    items = []
    for i, r in enumerate(table.select(list(COLUMNS)).to_pylist()):
        ex_id = None if r["id"] is None else str(r["id"])
        if ex_id not in meta:
            raise DatasetError(path, f"id {ex_id!r} is not in eval dataset {dataset.path}", i, "id")
        if isinstance(r["sample"], bool) or not isinstance(r["sample"], int):
            raise DatasetError(path, f"must be an integer, got {r['sample']!r}", i, "sample")
        if not isinstance(r["reply"], str):
            raise DatasetError(path, f"must be a string, got {type(r['reply']).__name__}", i, "reply")
        items.append(JudgeItem(ex_id, _prompt(path, i, r["prompt_messages"]), r["reply"], r["sample"], meta[ex_id]))
    seen: set[tuple[str, int]] = set()
    for i, it in enumerate(items):
        if (it.id, it.sample) in seen:
            raise DatasetError(path, f"duplicate (id, sample) ({it.id!r}, {it.sample})", i, "sample")
        seen.add((it.id, it.sample))
    return items
