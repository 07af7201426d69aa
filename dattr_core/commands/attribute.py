"""`dattr attribute`: dataset file → vectors. Also runs under `torchrun --nproc_per_node=N`."""

from __future__ import annotations

import argparse
import os

from ..attribute import AttributeConfig, attribute, init_distributed
from ..data import load_dataset
from ..methods import ACTIVATION_METHODS


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model options shared by every command that runs the model."""
    p.add_argument("--model", default=None, help="HF id or local folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")


def run(args: argparse.Namespace) -> int:
    init_distributed()
    ds = load_dataset(args.data, args.kind)
    cfg = AttributeConfig(
        model=args.model, layer=args.layer, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        max_tokens=args.max_tokens, batch_tokens=args.batch_tokens, shard_size=args.shard_size,
        storage_dtype=args.storage_dtype, device=args.device, dtype=args.dtype, root=args.root,
    )
    res = attribute(ds, cfg, progress=not args.no_progress)
    any_set = next(iter(res.vectors.values()))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"{ds.name}: {len(ds)} rows × {len(res.vectors)} methods ({', '.join(res.vectors)}) at layer "
          f"{any_set.meta['layer']} of {any_set.meta['model']}; {res.shards_computed} shards computed, "
          f"{res.shards_reused} reused; {res.examples_per_s:.1f} examples/s; → {any_set.path.parent.parent}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attribute", help="compute attribution vectors for a dataset file")
    p.add_argument("--data", required=True, help="dataset file (.parquet or .jsonl)")
    p.add_argument("--kind", choices=("train", "eval"), default="train")
    add_model_args(p)
    p.add_argument("--layer", type=int, default=None, help="block index (default: round(19·N/32))")
    p.add_argument("--methods", default=",".join(ACTIVATION_METHODS), help="comma-separated")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch")
    p.add_argument("--shard-size", type=int, default=256, help="rows per shard (the unit of resume)")
    p.add_argument("--storage-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--root", default=None, help="DATTR_HOME (default: $DATTR_HOME or ./dattr_data)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
