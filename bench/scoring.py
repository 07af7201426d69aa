"""Benchmark: streaming scores of random train vectors against 10 eval sets.

Shows time and that memory stays flat as the train set grows (50k vs 200k rows): each
measurement runs in a fresh process and reports
  - peak RSS Δ: the process's peak resident set (VmHWM, includes memory-mapped shard pages while
    they are mapped) minus its RSS just before scoring;
  - traced peak: tracemalloc's peak of Python/numpy heap allocations during scoring.
Timings are with the shards in the page cache (they were just written).

    .venv/bin/python bench/scoring.py [--rows 50000 200000] [--dims 576 4096] [--shard-size 10000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dattr_core.scoring import Query, score_matrix  # noqa: E402
from dattr_core.store import VectorSet, VectorWriter  # noqa: E402

N_EVALS, EVAL_ROWS = 10, 100
MiB = 2**20


def write_train(root: Path, dim: int, rows: int, shard_size: int) -> Path:
    """`rows` random vectors as float32 shards (streamed: one shard in memory while writing)."""
    path = root / f"train-{dim}-{rows}"
    w = VectorWriter(path, rows, shard_size, {"bench": dim})
    rng = np.random.default_rng(dim)
    for s in range(w.num_shards):
        w.write_shard(s, rng.standard_normal((len(w.shard_rows(s)), dim), np.float32))
    w.finalize([f"r{i}" for i in range(rows)], {"model": "bench", "layer": 0, "method": "rct"})
    return path


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(path: str, rule: str) -> dict:
    """One scoring call in this (fresh) process: seconds and memory."""
    train = VectorSet.open(path)
    rng = np.random.default_rng(1)
    queries = {f"eval{j}": Query(rng.standard_normal((EVAL_ROWS, train.dim), np.float32), {"model": "bench"})
               for j in range(N_EVALS)}
    rss0 = _vm("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    _, scores = score_matrix(train, queries, rule)
    seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert scores.shape == (len(train), N_EVALS) and np.isfinite(scores).all()
    return {"seconds": seconds, "rss_delta": _vm("VmHWM") - rss0, "traced": traced, "shards": train.meta["num_shards"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    p.add_argument("--dims", type=int, nargs="+", default=[576, 4096])
    p.add_argument("--rules", nargs="+", default=["cos_sim", "cos_sim_debias_train"])
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--measure", nargs=2, metavar=("PATH", "RULE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    print(f"{N_EVALS} eval sets x {EVAL_ROWS} vectors; shards of {args.shard_size} rows (float32); "
          "peak RSS delta = VmHWM - RSS before scoring; traced = tracemalloc peak")
    print(f"{'dim':>5} {'rows':>8} {'rule':<21} {'shards':>6} {'seconds':>8} {'rows/s':>10} "
          f"{'peak RSS Δ MiB':>14} {'traced MiB':>10} {'shard MiB':>9}")
    with tempfile.TemporaryDirectory(prefix="dattr-bench-") as tmp:
        for dim in args.dims:
            for rows in args.rows:
                path = write_train(Path(tmp), dim, rows, args.shard_size)
                for rule in args.rules:
                    out = subprocess.run([sys.executable, __file__, "--measure", str(path), rule],
                                         check=True, capture_output=True, text=True).stdout
                    r = json.loads(out.splitlines()[-1])
                    print(f"{dim:>5} {rows:>8} {rule:<21} {r['shards']:>6} {r['seconds']:>8.2f} "
                          f"{rows / r['seconds']:>10,.0f} {r['rss_delta'] / MiB:>14.0f} {r['traced'] / MiB:>10.0f} "
                          f"{args.shard_size * dim * 4 / MiB:>9.0f}", flush=True)
                for f in path.iterdir():  # free the disk before the next (bigger) set
                    f.unlink()


if __name__ == "__main__":
    main()
