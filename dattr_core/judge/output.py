"""`judge.parquet`: one row per (id, sample), written atomically."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..store import atomic_path
from .records import JudgeResult

SCHEMA = pa.schema([
    ("id", pa.string()), ("sample", pa.int32()), ("score", pa.int8()), ("parsed", pa.bool_()),
    ("rationale", pa.string()), ("error", pa.string()), ("judge", pa.string()), ("cached", pa.bool_()),
    ("raw", pa.string()),
])


def write_judge_parquet(path: str | Path, results: list[JudgeResult]) -> Path:
    """Unparsed rows keep `score` null and say why in `error`; `raw` is the judge's own text."""
    table = pa.table({
        "id": [r.id for r in results], "sample": [r.sample for r in results],
        "score": [r.score for r in results], "parsed": [r.parsed for r in results],
        "rationale": [r.rationale for r in results], "error": [r.error for r in results],
        "judge": [r.judge for r in results], "cached": [r.cached for r in results],
        "raw": [r.raw for r in results],
    }, schema=SCHEMA)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
