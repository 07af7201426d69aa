"""Turn a dataset into attribution vectors: every activation method from one pass per batch.

Work is cut into fixed row-range shards. Each shard is computed whole (treatment and control
sequences of its rows, length-bucketed into batches), then written atomically for every method.
A re-run skips finished shards; under `torchrun` rank r takes shards r, r+W, r+2W, ... and rank 0
writes the index and `meta.json` once all are present, so 1 or N processes give the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import methods as M
from .capture import capture
from .data import Dataset, DatasetError, load_dataset
from .models import (DEMO_MODEL, EncodingError, blocks, check_layer, collate, default_layer, encode_chat, load_model,
                     resolve_model)
from .store import VectorSet, VectorWriter, dattr_home, file_sha256, model_slug, model_tag, vectors_dir, write_json

log = logging.getLogger(__name__)


@dataclass
class AttributeConfig:
    """Everything that decides the vectors (and how fast they come)."""

    model: str | None = None  # HF id or folder; None = the shipped demo model
    layer: int | None = None  # None = round(19·N/32)
    methods: list[str] = field(default_factory=lambda: list(M.DEFAULT_METHODS))
    max_tokens: int = 1024
    batch_tokens: int = 8192  # padded tokens per batch (length bucketing keeps padding low)
    max_batch: int = 64
    shard_size: int = 256
    storage_dtype: str = "float32"  # or float16
    device: str | None = None
    dtype: str | None = None  # compute dtype; default bf16 on CUDA, fp32 on CPU
    root: str | None = None  # DATTR_HOME
    folders: dict[str, str] = field(default_factory=dict)  # method → vectors folder name (e.g. rd → pv)


@dataclass
class AttributeResult:
    vectors: dict[str, VectorSet]
    shards_computed: int
    shards_reused: int
    seconds: float
    examples: int
    tokens: int

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds else float("nan")


def model_revision(model: PreTrainedModel, path: str) -> str:
    """The hub commit if known, else a hash of the local config and weight files' names and sizes."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return "local-" + h.hexdigest()[:16]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def init_distributed() -> None:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def length_batches(lengths: list[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices grouped longest-first so each batch's padded size stays under the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) + 1 > max_batch or width * (len(cur) + 1) > batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def sequence_vectors(model: PreTrainedModel, layer: int, encoded: list, seq_methods: list[str], pad_id: int,
                     batch_tokens: int, max_batch: int) -> dict[str, np.ndarray]:
    """Per-sequence method vectors (fp32) for encoded chats, in input order."""
    backward = any(m in M.NEEDS_BACKWARD for m in seq_methods)
    dim = model.config.hidden_size
    out = {m: np.zeros((len(encoded), dim), np.float32) for m in seq_methods}
    for idx in length_batches([len(e.input_ids) for e in encoded], batch_tokens, max_batch):
        cap = capture(model, layer, collate([encoded[i] for i in idx], pad_id), backward=backward)
        for m in seq_methods:
            out[m][idx] = M.SEQUENCE_METHODS[m](cap).cpu().numpy()
    return out


def _encode(ds: Dataset, tok: PreTrainedTokenizerBase, row: int, fieldname: str, max_tokens: int):
    ex = ds.examples[row]
    msgs = ex.treatment_messages if fieldname == "treatment_messages" else ex.control_messages
    try:
        return encode_chat(tok, msgs, max_tokens)
    except EncodingError as e:
        raise DatasetError(ds.path, str(e), row, fieldname) from None


def ensure_controls(ds: Dataset, model_name: str | None, device: str | None = None, dtype: str | None = None,
                    root: str | None = None, model: PreTrainedModel | None = None,
                    tok: PreTrainedTokenizerBase | None = None, generation: dict[str, int] | None = None) -> Dataset:
    """The dataset with every missing control reply filled by the base model's greedy reply
    (design §2, the `controls` step), saved once per (model, dataset, `generation` settings:
    `max_new_tokens`, `batch_size`) and reused after. Pass a loaded `model`/`tok` to avoid
    loading the model a second time."""
    if all(e.control_messages is not None for e in ds.examples):
        return ds
    from .data import write_examples
    from .generate import fill_controls

    name = model_name or DEMO_MODEL
    out = dattr_home(root) / "controls" / model_slug(name) / f"{ds.name}.parquet"
    source = out.with_suffix(".json")  # written last: present means the filled file is complete
    record = {"source": str(ds.path), "source_sha256": file_sha256(ds.path), "model": name,
              "generation": dict(sorted((generation or {}).items()))}
    stored = json.loads(source.read_text()) if source.exists() else {}
    if all(stored.get(k) == v for k, v in record.items() if k != "source"):  # same input, model, settings
        return load_dataset(out, ds.kind)
    if model is None or tok is None:
        model, tok = load_model(resolve_model(model_name), device, dtype)
    filled = fill_controls(ds, model, tok, model_name=name, cache_dir=dattr_home(root) / "cache" / "controls",
                           **(generation or {}))
    write_examples(out, filled)
    write_json(source, record)
    return load_dataset(out, ds.kind)


ShardFn = Callable[[list[int]], tuple[dict[str, np.ndarray], int]]


def vector_writers(ds: Dataset, cfg: AttributeConfig, tag: str, methods: list[str],
                   fingerprint: dict[str, Any]) -> dict[str, VectorWriter]:
    """One writer per method folder (`cfg.folders` may rename a method's folder, e.g. rd → pv)."""
    return {m: VectorWriter(vectors_dir(tag, cfg.folders.get(m, m), ds.name, cfg.root), len(ds), cfg.shard_size,
                            {**fingerprint, "method": cfg.folders.get(m, m)})
            for m in methods}


def run_shards(ds: Dataset, cfg: AttributeConfig, writers: dict[str, VectorWriter], shard_fn: ShardFn,
               meta: dict[str, Any], progress: bool = True, desc: str = "") -> AttributeResult:
    """The shard loop shared by every vector method (activation, trak, pv).

    `shard_fn(rows)` → ({method: (len(rows), dim) array}, tokens processed). Rank r of W takes
    shards r, r+W, ...; finished shards are skipped; rank 0 writes index and `meta.json` once
    every shard is there (a finished run keeps its own timings).
    """
    rank, world = _dist()
    _barrier()
    if rank == 0:
        for w in writers.values():
            w.ensure_progress()
    first = next(iter(writers.values()))
    mine = [s for s in range(first.num_shards) if s % world == rank]
    todo = [s for s in mine if not all(w.is_done(s) for w in writers.values())]
    n_examples = n_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=sum(len(first.shard_rows(s)) for s in todo), unit="ex", disable=not progress or rank != 0,
               desc=desc)
    for s in todo:
        rows = list(first.shard_rows(s))
        arrays, tokens = shard_fn(rows)
        for m, w in writers.items():
            w.write_shard(s, arrays[m], cfg.storage_dtype)
        n_examples += len(rows)
        n_tokens += tokens
        bar.update(len(rows))
        bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    seconds = time.perf_counter() - t0
    _barrier()
    if rank == 0:
        timings = {"seconds": round(seconds, 3), "examples": n_examples, "tokens": n_tokens,
                   "examples_per_s": round(n_examples / seconds, 2) if seconds else None}
        for m, w in writers.items():
            if not (w.path / "meta.json").exists():
                w.finalize(ds.ids, {**w.fingerprint, **meta, "world_size": world, "timings": timings})
    _barrier()
    vectors = {cfg.folders.get(m, m): VectorSet.open(w.path) for m, w in writers.items()}
    return AttributeResult(vectors, len(todo), len(mine) - len(todo), seconds, n_examples, n_tokens)


def run_meta(ds: Dataset, cfg: AttributeConfig, model: PreTrainedModel, tag: str) -> dict[str, Any]:
    """What every vectors folder records besides its fingerprint."""
    return {"model_tag": tag, "dataset": ds.name, "dataset_path": str(ds.path),
            "compute_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(model.parameters()).device),
            "config": {k: v for k, v in asdict(cfg).items() if k != "root"}}


def attribute(ds: Dataset, cfg: AttributeConfig, model: PreTrainedModel | None = None,
              tok: PreTrainedTokenizerBase | None = None, progress: bool = True) -> AttributeResult:
    """Compute (or resume) the vectors of every requested activation method for one dataset."""
    methods = M.check_methods(cfg.methods)
    path = resolve_model(cfg.model)
    if model is None or tok is None:
        model, tok = load_model(path, cfg.device, cfg.dtype)
    layer = check_layer(model, default_layer(len(blocks(model))) if cfg.layer is None else cfg.layer)
    paired = M.needs_control(methods)
    if paired:
        for i, ex in enumerate(ds.examples):
            if ex.control_messages is None:
                raise DatasetError(ds.path, f"methods {paired} need a control reply; run `dattr controls` first",
                                   i, "control_messages")
    name = cfg.model or DEMO_MODEL
    tag = model_tag(name, layer)
    fingerprint = {"dataset_sha256": file_sha256(ds.path), "model": name, "model_revision": model_revision(model, path),
                   "layer": layer, "max_tokens": cfg.max_tokens, "shard_size": cfg.shard_size,
                   "storage_dtype": cfg.storage_dtype, "rows": len(ds)}
    writers = vector_writers(ds, cfg, tag, methods, fingerprint)
    seq_methods = M.sequence_methods_needed(methods)

    def shard_fn(rows: list[int]) -> tuple[dict[str, np.ndarray], int]:
        enc = [_encode(ds, tok, r, "treatment_messages", cfg.max_tokens) for r in rows]
        if paired:
            enc += [_encode(ds, tok, r, "control_messages", cfg.max_tokens) for r in rows]
        vecs = sequence_vectors(model, layer, enc, seq_methods, tok.pad_token_id, cfg.batch_tokens, cfg.max_batch)
        n = len(rows)
        out = {}
        for m in methods:
            if m in M.PAIRED_METHODS:
                out[m] = vecs[M.PAIRED_METHODS[m]][:n] - vecs[M.PAIRED_METHODS[m]][n:]
            elif m in M.CONTROL_METHODS:
                out[m] = vecs[M.CONTROL_METHODS[m]][n:]
            else:
                out[m] = vecs[m][:n]
        return out, sum(len(e.input_ids) for e in enc)

    return run_shards(ds, cfg, writers, shard_fn, run_meta(ds, cfg, model, tag), progress,
                      desc=f"attribute {ds.name} L{layer}")
