"""Storage layout (design §6), atomic writes, and sharded vector folders that resume.

A vectors folder is complete exactly when its `meta.json` exists: shards and the index are
renamed into place first, `meta.json` last. A reader that finds no `meta.json` sees no vectors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHARD_RE = re.compile(r"^shard-(\d{5})\.npy$")


def dattr_home(root: str | Path | None = None) -> Path:
    """The one storage root: argument, else `$DATTR_HOME`, else `./dattr_data`."""
    return Path(root or os.environ.get("DATTR_HOME") or "dattr_data").resolve()


def datasets_dir(kind: str, root: str | Path | None = None) -> Path:
    return dattr_home(root) / "datasets" / kind


def model_slug(model_name: str) -> str:
    """A folder-safe name for a model id or path."""
    base = Path(model_name.rstrip("/")).name or model_name
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", base).strip("._") or "model"


def model_tag(model_name: str, layer: int) -> str:
    """A folder-safe tag for (model, layer): vectors of different layers never mix."""
    return f"{model_slug(model_name)}.L{layer}"


def vectors_dir(tag: str, method: str, dataset: str, root: str | Path | None = None) -> Path:
    return dattr_home(root) / "vectors" / tag / method / dataset


def experiment_dir(experiment: str, train: str, eval_: str, root: str | Path | None = None) -> Path:
    return dattr_home(root) / "experiments" / experiment / train / eval_


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto `path`, on error remove it.

    Works for files and folders. A folder target that exists is replaced whole (old complete
    output or new complete output, never a mix).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if target.is_dir():
            if path.exists():
                trash = path.parent / f".{path.name}.{os.getpid()}.old"
                os.replace(path, trash)
                os.replace(target, path)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(target, path)
        elif target.exists():
            os.replace(target, path)
        else:
            raise FileNotFoundError(f"atomic write produced nothing at {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), encoding="utf-8")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class VectorError(ValueError):
    """A vectors folder is missing, incomplete, corrupt or does not match what it is used with."""


@dataclass
class VectorSet:
    """A complete vectors folder, read shard by shard with memory maps."""

    path: Path
    meta: dict[str, Any]
    ids: list[str]

    @classmethod
    def open(cls, path: str | Path) -> "VectorSet":
        import pyarrow.parquet as pq

        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.exists():
            raise VectorError(f"{path}: no complete vectors here (meta.json missing; run `dattr attribute` first)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        ids = pq.read_table(path / "index.parquet").column("id").to_pylist()
        if len(ids) != meta["count"]:
            raise VectorError(f"{path}: index has {len(ids)} ids but meta.json says {meta['count']}")
        return cls(path, meta, ids)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return len(self.ids)

    def shard_paths(self) -> list[Path]:
        return [self.path / f"shard-{i:05d}.npy" for i in range(self.meta["num_shards"])]

    def iter_shards(self, check_finite: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, float32 array) per shard; memory for one shard at a time."""
        start = 0
        for p in self.shard_paths():
            arr = np.load(p, mmap_mode="r")
            if arr.ndim != 2 or arr.shape[1] != self.dim:
                raise VectorError(f"{p}: shape {arr.shape}, expected (*, {self.dim})")
            block = np.asarray(arr, dtype=np.float32)
            if check_finite and not np.isfinite(block).all():
                bad = int(np.argwhere(~np.isfinite(block).all(axis=1))[0, 0])
                raise VectorError(f"{p}: non-finite value in row {start + bad} (id {self.ids[start + bad]!r})")
            yield start, block
            start += block.shape[0]
        if start != len(self.ids):
            raise VectorError(f"{self.path}: shards hold {start} rows, index has {len(self.ids)}")

    def load(self) -> np.ndarray:
        """All vectors in memory (for small sets and tests)."""
        parts = [b for _, b in self.iter_shards()]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


class VectorWriter:
    """Writes one vectors folder shard by shard; finished shards survive a crash and are reused.

    Shards are fixed row ranges of the dataset (`shard_size` rows each), so a resumed or
    multi-process run computes exactly the missing ranges, and no row is dropped or doubled.
    A `progress.json` fingerprint (dataset hash, model, layer, ...) guards against resuming
    shards that were made from other inputs.
    """

    def __init__(self, path: str | Path, n_rows: int, shard_size: int, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.n_rows, self.shard_size = n_rows, shard_size
        self.num_shards = max(1, -(-n_rows // shard_size))
        self.fingerprint = fingerprint
        self.path.mkdir(parents=True, exist_ok=True)
        prog = self.path / "progress.json"
        if prog.exists() and json.loads(prog.read_text()) != fingerprint:
            self.reset()

    def reset(self) -> None:
        """Forget every shard (inputs changed)."""
        for p in self.path.iterdir():
            if SHARD_RE.match(p.name) or p.name in ("meta.json", "index.parquet", "progress.json"):
                p.unlink()

    def ensure_progress(self) -> None:
        if not (self.path / "progress.json").exists():
            write_json(self.path / "progress.json", self.fingerprint)

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.n_rows, (shard + 1) * self.shard_size))

    def shard_path(self, shard: int) -> Path:
        return self.path / f"shard-{shard:05d}.npy"

    def is_done(self, shard: int) -> bool:
        return self.shard_path(shard).exists()

    def write_shard(self, shard: int, array: np.ndarray, dtype: str = "float32") -> None:
        expected = len(self.shard_rows(shard))
        if array.shape[0] != expected:
            raise VectorError(f"shard {shard}: {array.shape[0]} rows, expected {expected}")
        with atomic_path(self.shard_path(shard)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array.astype(dtype))

    def finalize(self, ids: list[str], meta: dict[str, Any]) -> VectorSet:
        """Write index and meta.json (last) once every shard is present."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        missing = [s for s in range(self.num_shards) if not self.is_done(s)]
        if missing:
            raise VectorError(f"{self.path}: cannot finalize, shards {missing} missing")
        with atomic_path(self.path / "index.parquet") as tmp:
            pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), tmp)
        dim = int(np.load(self.shard_path(0), mmap_mode="r").shape[1])
        write_json(self.path / "meta.json", {**meta, "count": len(ids), "dim": dim,
                                              "num_shards": self.num_shards, "shard_size": self.shard_size})
        return VectorSet.open(self.path)


def dataset_file(kind: str, name: str, root: str | Path | None = None) -> Path:
    """The file of dataset `name` under `datasets/{kind}/` (parquet preferred over JSONL)."""
    base = datasets_dir(kind, root)
    for suffix in (".parquet", ".jsonl"):
        if (base / f"{name}{suffix}").exists():
            return base / f"{name}{suffix}"
    raise FileNotFoundError(f"no {kind} dataset {name!r} in {base} (expected {name}.parquet or {name}.jsonl)")
