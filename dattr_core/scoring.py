"""Queries and scoring rules (design §4): one direction per eval set, one score per train row.

Train vectors are streamed shard by shard, so memory holds one shard plus the (D × n_evals)
query matrix, never the train set. Several eval sets are scored in the same pass: each rule is a
fixed transform of a train row (raw, unit-norm, or de-biased then unit-norm) followed by a dot
product with one direction per eval set, so one matrix product per shard serves them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .data import Dataset, Example
from .store import VectorError, VectorSet, atomic_path

RULES = ("cos_sim", "proj", "dot", "cos_sim_debias_train", "cos_sim_debias_eval")
DEFAULT_RULE = "cos_sim"
# Provenance keys of meta.json that must agree between train and query vectors.
PROVENANCE_KEYS = ("model", "layer", "model_tag")
# Methods whose vectors live in weight space (projected gradients), not in the residual stream.
WEIGHT_SPACE_METHODS = ("trak",)


def normalize(x: np.ndarray) -> np.ndarray:
    """Unit-norm along the last axis; an all-zero vector stays zero (its cosine is 0, not NaN)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1)


def remove_component(x: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Remove from each row of `x` its component along the unit vector `direction`."""
    return x - (x @ direction)[..., None] * direction


def _space(meta: Mapping[str, Any]) -> str:
    return "weights" if meta.get("method") in WEIGHT_SPACE_METHODS else "activations"


def check_compatible(a: Mapping[str, Any], a_name: str, b: Mapping[str, Any], b_name: str) -> None:
    """Refuse to compare vectors of different models, layers or spaces (activation vs `trak`)."""
    for key in PROVENANCE_KEYS:
        if key in a and key in b and a[key] != b[key]:
            raise VectorError(f"{a_name} and {b_name} come from different {key}s: {a[key]!r} vs {b[key]!r}")
    if "method" in a and "method" in b and _space(a) != _space(b):
        raise VectorError(
            f"{a_name} (method {a['method']!r}) and {b_name} (method {b['method']!r}) live in different "
            "spaces: weight-space methods (trak) only compare with each other"
        )
    if "dim" in a and "dim" in b and int(a["dim"]) != int(b["dim"]):
        raise VectorError(f"{a_name} has dimension {a['dim']} but {b_name} has {b['dim']}")


def attribution_split(dataset: Dataset) -> list[Example]:
    """The eval rows a query may use (held-out rows are for judging only)."""
    rows = dataset.split("attribution")
    if not rows:
        raise ValueError(f"{dataset.path}: eval set {dataset.name!r} has no rows in split 'attribution'")
    return rows


def read_rows(vectors: VectorSet, ids: Sequence[str]) -> np.ndarray:
    """The vectors of `ids`, in that order, read shard by shard."""
    where = {i: r for r, i in enumerate(vectors.ids)}
    missing = [i for i in ids if i not in where]
    if missing:
        raise VectorError(f"{vectors.path}: no vectors for {len(missing)} id(s), e.g. {missing[0]!r} (stale vectors?)")
    rows = np.fromiter((where[i] for i in ids), dtype=np.int64, count=len(ids))
    out = np.empty((len(ids), vectors.dim), np.float32)
    for start, block in vectors.iter_shards():
        hit = (rows >= start) & (rows < start + block.shape[0])
        out[hit] = block[rows[hit] - start]
    return out


@dataclass(frozen=True)
class Query:
    """The eval vectors v_j of one behaviour (attribution rows only), and where they came from.

    `control` holds the control vectors of the same eval set (needed by `cos_sim_debias_eval`
    only): any number of rows in the same space, e.g. `residual` of the control replies.
    """

    vectors: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)
    control: np.ndarray | None = None
    name: str = "query"

    def __post_init__(self) -> None:
        for what, arr in (("vectors", self.vectors), ("control", self.control)):
            if arr is None:
                continue
            if arr.ndim != 2 or arr.shape[0] == 0:
                raise ValueError(f"{self.name}: {what} must be a non-empty (rows, dim) array, got shape {arr.shape}")
            if not np.isfinite(arr).all():
                raise VectorError(f"{self.name}: non-finite value in {what}")
        if self.control is not None and self.control.shape[1] != self.dim:
            raise VectorError(f"{self.name}: control vectors have dimension {self.control.shape[1]}, eval vectors {self.dim}")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def from_vectors(
        cls, vectors: VectorSet, ids: Sequence[str], control: VectorSet | np.ndarray | None = None
    ) -> "Query":
        """The query of the eval rows `ids` (pass the attribution split's ids).

        A control VectorSet is read at the same ids (matched pairs); an array is taken as is.
        """
        name = str(vectors.path)
        if not ids:
            raise ValueError(f"{name}: empty eval split (no ids to build the query from)")
        if isinstance(control, VectorSet):
            check_compatible(vectors.meta, name, control.meta, str(control.path))
            control = read_rows(control, ids)
        return cls(read_rows(vectors, ids), dict(vectors.meta), control, name)

    def direction(self, rule: str) -> np.ndarray:
        """The vector q with s_i = ⟨f(ϕ_i), q⟩, f = the rule's train-row transform (`_stream_scores`)."""
        v = self.vectors.astype(np.float64)
        if rule == "dot":
            return v.mean(0)  # mean_j ⟨ϕ, v_j⟩ = ⟨ϕ, mean_j v_j⟩
        if rule == "cos_sim_debias_eval":
            if self.control is None:
                raise ValueError(f"{self.name}: rule cos_sim_debias_eval needs the eval set's control vectors")
            v = remove_component(v, normalize(self.control.astype(np.float64).mean(0)))
        mean_unit = normalize(v).mean(0)  # mean_j ⟨ϕ, v_j/|v_j|⟩ = ⟨ϕ, mean_j v_j/|v_j|⟩
        return mean_unit if rule == "proj" else normalize(mean_unit)


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown scoring rule {rule!r}; expected one of {RULES}")


def _stream_scores(
    blocks: Callable[[], Iterable[tuple[int, np.ndarray]]], n: int, dim: int, queries: Mapping[str, Query], rule: str
) -> np.ndarray:
    """Score streamed (first_row, block) pairs; `blocks` is called twice for the train-mean rule."""
    _check_rule(rule)
    if not queries:
        raise ValueError("no queries to score against")
    for name, q in queries.items():
        if q.dim != dim:
            raise VectorError(f"query {name!r} has dimension {q.dim} but the train vectors have {dim}")
    Q = np.stack([q.direction(rule) for q in queries.values()], axis=1).astype(np.float32)
    mean_dir = None
    if rule == "cos_sim_debias_train":
        total = np.zeros(dim, np.float64)
        for _, b in blocks():
            total += b.sum(0, dtype=np.float64)
        mean_dir = normalize(total / max(n, 1)).astype(np.float32)
    out = np.empty((n, Q.shape[1]), np.float64)
    for start, b in blocks():
        if mean_dir is not None:
            b = remove_component(b, mean_dir)
        if rule.startswith("cos_sim"):
            b = normalize(b)
        out[start : start + b.shape[0]] = b @ Q
    return out


def score_matrix(train: VectorSet, queries: Mapping[str, Query], rule: str = DEFAULT_RULE) -> tuple[list[str], np.ndarray]:
    """Scores of every train row against every query: (train ids, array[n_train, n_queries]).

    Columns follow the order of `queries`. Streams the train shards (twice for
    `cos_sim_debias_train`, whose mean train vector needs a pass of its own).
    """
    for name, q in queries.items():
        check_compatible(train.meta, f"train vectors {train.path}", q.meta, f"query {name!r} ({q.name})")
    return train.ids, _stream_scores(train.iter_shards, len(train), train.dim, queries, rule)


def score_array(train: np.ndarray, queries: Mapping[str, Query], rule: str = DEFAULT_RULE) -> np.ndarray:
    """`score_matrix` for train vectors already in memory (text-embedding baselines, tests)."""
    if train.ndim != 2:
        raise ValueError(f"train vectors must be a (rows, dim) array, got shape {train.shape}")
    return _stream_scores(lambda: [(0, train.astype(np.float32))], train.shape[0], train.shape[1], queries, rule)


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Row indices from highest to lowest score; ties keep dataset order (deterministic)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def write_scores(path: str | Path, ids: Sequence[str], scores: np.ndarray, info: Mapping[str, Any] | None = None) -> Path:
    """`scores.parquet`: id, score, rank (1 = most suspicious), in train order; `info` → metadata."""
    scores = np.asarray(scores, np.float64)
    if scores.shape != (len(ids),):
        raise ValueError(f"{len(ids)} ids but scores of shape {scores.shape}")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"{path}: score of id {ids[bad[0]]!r} is not finite ({scores[bad[0]]})")
    rank = np.empty(len(ids), np.int64)
    rank[rank_order(scores)] = np.arange(1, len(ids) + 1)
    table = pa.table({"id": pa.array(list(ids), pa.string()), "score": scores, "rank": rank})
    return write_parquet(path, table, info)


def write_parquet(path: str | Path, table: pa.Table, info: Mapping[str, Any] | None = None) -> Path:
    """Write atomically; `info` (experiment, rule, k, ...) goes to the `dattr` metadata key."""
    if info:
        table = table.replace_schema_metadata({"dattr": json.dumps(dict(info), sort_keys=True, default=str)})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_scores(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(ids, scores) from a `scores.parquet`, in its row (train) order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no scores file (run `dattr score` or `dattr rank` first)")
    table = pq.read_table(path)
    for col in ("id", "score"):
        if col not in table.column_names:
            raise ValueError(f"{path}: missing column {col!r}")
    return table.column("id").to_pylist(), table.column("score").to_numpy().astype(np.float64)
