"""Benchmark: `trak` (projected per-example weight gradients) against the all-methods activation
pass (`dattr_core.attribute.attribute`, default methods) on the same model and the same rows.

Prints examples/s, sequences/s, tokens/s and bytes stored per example for
  - activation: one pass per batch gives residual/grad/rct/rct_response/rd/rc; it runs the
    treatment AND the control reply of every row (rd, rc are paired), backward to block L only;
  - trak: treatment reply only, one forward + a full backward (input gradients only) with the
    factored projection taken in hooks, batched like the activation pass;
  - trak, naive (optional): what the fast path avoids — batch size 1, full weight gradients by
    autograd, then the same projection applied to the materialised gradient matrices.
Both main passes use the same batch token budget and run once on a few rows first (warm-up).
One-off costs (projection factors + their digest) are timed separately.

    .venv/bin/python bench/trak_speed.py [--n 64] [--batch-tokens 4096] [--naive 4] [--model ID] [--data FILE]

Timings on a shared machine are noisy: compare the ratios of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dattr_core.attribute import AttributeConfig, attribute  # noqa: E402
from dattr_core.data import Example, load_dataset, write_examples  # noqa: E402
from dattr_core.models import encode_chat, load_model  # noqa: E402
from dattr_core.trak import KroneckerProjector, TrakConfig, attribute_trak, exact_weight_grads  # noqa: E402

WORDS = ("the a river mountain city blue green seven answer question because quickly people history water "
         "small large old new first last light dark north south early late always never often").split()


def synthetic(n: int, seed: int = 0) -> list[Example]:
    """Paired chats of mixed lengths (prompt 15–90 words, replies 10–80 words)."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    def chat(q: str, r: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": r}]

    out = []
    for i in range(n):
        q = text(15, 90)
        out.append(Example(f"b{i}", chat(q, text(10, 80)), chat(q, text(10, 80))))
    return out


def stored_bytes(vectors: dict) -> int:
    return sum(p.stat().st_size for vs in vectors.values() for p in vs.shard_paths())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="rows (default 64)")
    ap.add_argument("--model", default=None, help="default: the shipped SmolLM2-135M-Instruct")
    ap.add_argument("--data", default=None, help="a paired train dataset file (default: synthetic chats)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch, both passes")
    ap.add_argument("--naive", type=int, default=4, help="rows for the batch-size-1 reference (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="trak-bench-"))
    model, tok = load_model(args.model, args.device, args.dtype)
    if args.data:
        ds = load_dataset(args.data, "train")
        rows = ds.examples[: args.n]
        ds = load_dataset(write_examples(root / "datasets/train/bench.parquet", rows), "train")
    else:
        ds = load_dataset(write_examples(root / "datasets/train/bench.parquet", synthetic(args.n)), "train")
    warm = load_dataset(write_examples(root / "datasets/train/warm.parquet", synthetic(4, seed=1)), "train")

    t = time.perf_counter()
    proj = KroneckerProjector.for_model(model)
    desc = proj.describe()  # generates every factor and hashes them
    t_proj = time.perf_counter() - t

    common = dict(model=args.model, root=str(root), batch_tokens=args.batch_tokens, shard_size=max(args.n, 4),
                  device=args.device, dtype=args.dtype)
    attribute(warm, AttributeConfig(**common), model, tok, progress=False)
    attribute_trak(warm, TrakConfig(**common), model, tok, progress=False, projector=proj)

    act = attribute(ds, AttributeConfig(**common), model, tok, progress=False)
    trak = attribute_trak(ds, TrakConfig(**common), model, tok, progress=False, projector=proj)
    n = len(ds)
    rows = [("activation (6 methods)", act.seconds, n, 2 * n, act.tokens, stored_bytes(act.vectors) / n),
            ("trak", trak.seconds, n, n, trak.tokens, stored_bytes(trak.vectors) / n)]
    if args.naive:
        enc = [encode_chat(tok, ex.treatment_messages, 1024) for ex in ds.examples[: args.naive]]
        exact_weight_grads(model, enc[:1], tok.pad_token_id)  # warm-up
        t = time.perf_counter()
        for g in exact_weight_grads(model, enc, tok.pad_token_id):  # one model copy for all rows
            proj.project(g)
        rows.append((f"trak naive bs=1 (first {len(enc)})", time.perf_counter() - t, len(enc), len(enc),
                     sum(len(e.input_ids) for e in enc), float("nan")))

    print(f"\nmodel {act.vectors['rc'].meta['model']} ({act.vectors['rc'].meta['compute_dtype']} on "
          f"{act.vectors['rc'].meta['device']}, {torch.get_num_threads()} threads), {n} rows, "
          f"batch_tokens {args.batch_tokens}; projection {desc['modules']} modules / {desc['params']:,} weights → "
          f"{desc['dim']} ({desc['k_out']}×{desc['k_in']}), factors built+hashed once in {t_proj:.1f} s")
    print(f"{'pass':34s} {'seconds':>8s} {'ex/s':>7s} {'seq/s':>7s} {'tok/s':>7s} {'bytes/ex':>9s} "
          f"{'time/ex ÷ act':>14s}")
    base = act.seconds / n
    for name, sec, ex, seqs, toks, b in rows:
        print(f"{name:34s} {sec:8.1f} {ex / sec:7.3f} {seqs / sec:7.3f} {toks / sec:7.0f} "
              f"{'' if b != b else f'{b:9.0f}':>9s} {sec / ex / base:14.2f}")
    print("(per example; activation runs 2 sequences per row: treatment + control)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
