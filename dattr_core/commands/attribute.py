"""`dattr attribute`: dataset file → vectors. Also runs under `torchrun --nproc_per_node=N`."""

from __future__ import annotations

import argparse
import os

from ..attribute import AttributeConfig, AttributeResult, attribute, ensure_controls, init_distributed
from ..models import load_model
from ..trak import DEFAULT_DIM, TrakConfig, attribute_trak
from ..data import load_dataset
from ..generate import CONTROLS_BATCH_SIZE, CONTROLS_MAX_NEW_TOKENS
from ..methods import ACTIVATION_METHODS, DEFAULT_METHODS


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model options shared by every command that runs the model."""
    p.add_argument("--model", default=None, help="HF id or local folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")


def run(args: argparse.Namespace) -> int:
    init_distributed()
    ds = load_dataset(args.data, args.kind)
    model, tok = load_model(args.model, args.device, args.dtype)
    if args.controls:
        ds = ensure_controls(ds, args.model, root=args.root, model=model, tok=tok, generation=_generation(args))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    activation = [m for m in methods if m != "trak"]
    common = dict(model=args.model, layer=args.layer, max_tokens=args.max_tokens, batch_tokens=args.batch_tokens,
                  shard_size=args.shard_size, storage_dtype=args.storage_dtype, device=args.device, dtype=args.dtype,
                  root=args.root)
    results = []
    if activation or not methods:
        results.append(attribute(ds, AttributeConfig(methods=activation, **common), model, tok, not args.no_progress))
    if "trak" in methods:
        cfg = TrakConfig(proj_dim=args.proj_dim, seed=args.proj_seed, **common)
        results.append(attribute_trak(ds, cfg, model, tok, not args.no_progress))
    res = AttributeResult({m: v for r in results for m, v in r.vectors.items()},
                          *[sum(getattr(r, f) for r in results) for f in
                            ("shards_computed", "shards_reused", "seconds", "examples", "tokens")])
    any_set = next(iter(res.vectors.values()))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.pipes:
        report_to_dagster(res, args.kind)
    print(f"{ds.name}: {len(ds)} rows × {len(res.vectors)} methods ({', '.join(res.vectors)}) at layer "
          f"{any_set.meta['layer']} of {any_set.meta['model']}; {res.shards_computed} shards computed, "
          f"{res.shards_reused} reused; {res.examples_per_s:.1f} examples/s; → {any_set.path.parent.parent}")
    return 0


def report_to_dagster(res, kind: str) -> None:
    """Under Dagster Pipes (multi-GPU runs), rank 0 reports one materialization per method."""
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        for m, vs in res.vectors.items():
            t = vs.meta["timings"]
            pipes.report_asset_materialization(
                asset_key=f"vectors/{m}/{kind}",
                metadata={"path": str(vs.path), "rows": len(vs), "dim": vs.dim, "layer": vs.meta["layer"],
                          "model": vs.meta["model"], "world_size": vs.meta["world_size"],
                          "examples_per_s": t["examples_per_s"] or 0.0, "seconds": t["seconds"]})


def _generation(args: argparse.Namespace) -> dict[str, int]:
    return {k: v for k, v in (("max_new_tokens", args.controls_max_new_tokens),
                              ("batch_size", args.controls_batch_size)) if v is not None}


def _controls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controls-max-new-tokens", type=int, default=None,
                   help=f"longest greedy control reply in tokens (default {CONTROLS_MAX_NEW_TOKENS})")
    p.add_argument("--controls-batch-size", type=int, default=None, help=f"prompts per generate call (default {CONTROLS_BATCH_SIZE})")


def controls(args: argparse.Namespace) -> int:
    ds = ensure_controls(load_dataset(args.data, "train"), args.model, args.device, args.dtype, args.root,
                         generation=_generation(args))
    print(f"{ds.name}: {len(ds)} rows, all with control replies → {ds.path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attribute", help="compute attribution vectors for a dataset file")
    p.add_argument("--data", required=True, help="dataset file (.parquet or .jsonl)")
    p.add_argument("--kind", choices=("train", "eval"), default="train")
    add_model_args(p)
    p.add_argument("--layer", type=int, default=None, help="block index (default: round(19·N/32))")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(ACTIVATION_METHODS)}, trak")
    p.add_argument("--proj-dim", type=int, default=DEFAULT_DIM, help="trak: projected dimension")
    p.add_argument("--proj-seed", type=int, default=0, help="trak: projection seed")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch")
    p.add_argument("--shard-size", type=int, default=256, help="rows per shard (the unit of resume)")
    p.add_argument("--storage-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--root", default=None, help="DATTR_HOME (default: $DATTR_HOME or ./dattr_data)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--controls", action="store_true", help="fill missing control replies first (`dattr controls`)")
    _controls_args(p)
    p.add_argument("--pipes", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)

    c = sub.add_parser("controls", help="fill missing control replies of a train set with the model's greedy reply")
    c.add_argument("--data", required=True)
    add_model_args(c)
    c.add_argument("--root", default=None)
    _controls_args(c)
    c.set_defaults(func=controls)
