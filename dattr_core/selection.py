"""Selection (design §4): which train rows a fine-tune gets, from one score per row.

`top` (most suspicious first), `bottom` (least suspicious first) and `random` (a seeded uniform
sample, the control arm). Ties never depend on sort internals: equal scores keep dataset order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .data import Dataset, write_examples
from .scoring import rank_order, write_parquet

log = logging.getLogger(__name__)
STRATEGIES = ("top", "bottom", "random")
DEFAULT_K = 500


def random_scores(n: int, seed: int) -> np.ndarray:
    """Seeded uniform keys in [0, 1): the top k of them are a uniform sample of k rows."""
    return np.random.default_rng(seed).random(n)


def select(scores: np.ndarray, k: int = DEFAULT_K, strategy: str = "top", seed: int = 0) -> np.ndarray:
    """Row indices of the k selected rows, in selection order (rank 1 first).

    `top`: highest scores; `bottom`: lowest; `random`: a uniform sample drawn with `seed`
    (scores ignored). Ties keep dataset order. A k larger than the dataset is clamped to all
    rows with a warning (a small demo pool stays usable with the default k; the warning tells
    the user the top/bottom/random arms are then the same rows).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; expected one of {STRATEGIES}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    scores = np.asarray(scores, np.float64)
    n = scores.shape[0]
    if k > n:
        log.warning("k=%d is larger than the %d scored rows; selecting all of them", k, n)
        k = n
    if strategy == "random":
        return rank_order(random_scores(n, seed))[:k]
    if strategy == "bottom":
        return rank_order(-scores)[:k]
    return rank_order(scores)[:k]


def write_selection(
    out_dir: str | Path,
    ids: Sequence[str],
    scores: np.ndarray,
    chosen: np.ndarray,
    train: Dataset,
    info: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """`selection.parquet` (id, rank, score) and `selected.parquet`, a ready-to-train dataset.

    `selected.parquet` keeps the train dataset's row order, not rank order: a fine-tune that
    does not shuffle should not see the most suspicious rows first (at the highest learning rate).
    """
    out_dir = Path(out_dir)
    by_id = {e.id: (row, e) for row, e in enumerate(train.examples)}
    picked = [ids[i] for i in chosen]
    missing = [i for i in picked if i not in by_id]
    if missing:
        raise ValueError(f"{train.path}: scored id {missing[0]!r} is not in the train dataset (stale scores?)")
    table = pa.table({
        "id": pa.array(picked, pa.string()),
        "rank": np.arange(1, len(picked) + 1, dtype=np.int64),
        "score": np.asarray(scores, np.float64)[chosen],
    })
    selection = write_parquet(out_dir / "selection.parquet", table, info)
    rows = sorted(by_id[i] for i in picked)
    selected = write_examples(out_dir / "selected.parquet", [e for _, e in rows])
    return selection, selected
