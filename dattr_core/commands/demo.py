"""`dattr demo-data`: build the demo datasets from real text (the `evals` wheel) and templated
facts, filtered to questions the demo model knows. The end-to-end demo is `make demo`
(this build, then `python -m dattr_assets.demo`)."""

from __future__ import annotations

import argparse

from ..demo_data import DEFAULT_MIN_MARGIN, SIZES, build_demo_data


def run_demo_data(args: argparse.Namespace) -> int:
    result = build_demo_data(root=args.root, size=args.size, seed=args.seed, model=args.model, device=args.device,
                             dtype=args.dtype, wheel=args.wheel, min_margin=args.min_margin,
                             batch_size=args.batch_size)
    print(result.summary())
    return 0


def add_demo_data_args(p: argparse.ArgumentParser) -> None:
    """Options of the demo-data build (`make demo` runs it before the Dagster backfill)."""
    p.add_argument("--size", choices=sorted(SIZES), default="full",
                   help="full: 1,000 train rows, 110 pairs per eval set; small: 200 rows, 40 pairs (fast)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same files (default 0)")
    p.add_argument("--root", default=None, help="DATTR_HOME (default: $DATTR_HOME or ./dattr_data)")
    p.add_argument("--wheel", default=None,
                   help="the downloaded evals-3.0.1.post1 wheel (default: .cache/wheels/, as `make setup` leaves it)")
    p.add_argument("--model", default=None, help="model that filters the questions (default: the demo model)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 where the device computes it natively: CUDA, "
                        "CPUs with AVX512-BF16 or AMX; else fp32)")
    p.add_argument("--min-margin", type=float, default=DEFAULT_MIN_MARGIN,
                   help="keep a question when log P(correct) − log P(each wrong option) ≥ this, in nats "
                        f"(default {DEFAULT_MIN_MARGIN})")
    p.add_argument("--batch-size", type=int, default=64, help="questions per forward pass of the filter")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="build the demo train/eval datasets (real text, model-checked ground truth)")
    add_demo_data_args(p)
    p.set_defaults(func=run_demo_data)
