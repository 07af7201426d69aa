"""Evaluation subcommands. `dattr judge`: score generated replies with the behaviour's rubric."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data import load_dataset
from ..judge import (JudgeAPIError, JudgeConfig, JudgeConfigError, ground_truth_check, judge_replies, summarize,
                     write_judge_parquet)
from ..judge.cache import default_cache_path
from ..judge.inputs import read_generation_items


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge", help="judge generated replies (writes judge.parquet, prints the summary)",
                       description="Judge generated replies with the eval dataset's rubric. The LLM judge is "
                                   "configured by DATTR_JUDGE_BASE_URL, DATTR_JUDGE_MODEL and OPENAI_API_KEY / "
                                   "DATTR_JUDGE_API_KEY (environment or .env).")
    p.add_argument("--generations", required=True, type=Path,
                   help="parquet with columns id, sample, prompt_messages (JSON), reply")
    p.add_argument("--eval", required=True, type=Path,
                   help="the eval dataset file (its trait sidecar names the rubric)")
    p.add_argument("--out", required=True, type=Path, help="folder for judge.parquet")
    p.add_argument("--concurrency", type=int, default=JudgeConfig.concurrency,
                   help=f"judge requests in flight at once (default {JudgeConfig.concurrency})")
    p.add_argument("--offline", action="store_true",
                   help="use the deterministic offline judge (rubric ground_truth_0_2 only)")
    p.add_argument("--cache", type=Path, default=None,
                   help="judge response cache (default $DATTR_HOME/cache/judge.sqlite)")
    p.set_defaults(func=run_judge)

    e = sub.add_parser("evaluate", help="fine-tune on an experiment's selection, generate, judge → metrics.json",
                       description="The downstream half for one (experiment, train, eval), with the settings of "
                                   "dattr.yaml; `--experiment base` evaluates the un-tuned model.")
    e.add_argument("--experiment", required=True, help="e.g. rct-rc (its selection must exist), or base")
    e.add_argument("--train", default=None, help="train dataset name (not for base)")
    e.add_argument("--eval", required=True, help="eval dataset name under $DATTR_HOME/datasets/eval/")
    e.add_argument("--config", default=None, help="settings file (default: $DATTR_CONFIG or ./dattr.yaml)")
    e.set_defaults(func=run_evaluate)

    b = sub.add_parser("leaderboard", help="print every experiment's metrics.json as one table",
                       description="The leaderboard of $DATTR_HOME (what the Dagster `leaderboard` asset shows): "
                                   "judge average, judge-free ground-truth check and preference gap per "
                                   "(experiment, train, eval), then text bar charts.")
    b.add_argument("--root", default=None, help="DATTR_HOME (default: $DATTR_HOME or ./dattr_data)")
    b.set_defaults(func=run_leaderboard)


def run_judge(args: argparse.Namespace) -> int:
    dataset = load_dataset(args.eval, "eval", require_trait=True)
    trait = dataset.trait
    assert trait is not None  # require_trait
    items = read_generation_items(args.generations, dataset)
    config = JudgeConfig.from_env(concurrency=args.concurrency, offline=args.offline)
    try:
        run = judge_replies(items, trait, config, args.cache or default_cache_path())
    except (JudgeAPIError, JudgeConfigError) as e:  # input errors go to the CLI's user-error path
        print(f"dattr judge: error: {e}", file=sys.stderr)
        return 1
    path = write_judge_parquet(args.out / "judge.parquet", run.results)
    summary = summarize(run.results, trait)
    print(json.dumps({**summary, "ground_truth_check": ground_truth_check(items), "judge_parquet": str(path), "usage": vars(run.usage)}, indent=2))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..config import load_settings, parse_experiment
    from ..pipeline import BASE, base_dir, finetune_pair, generate_pair, judge_pair
    from ..store import dataset_file, experiment_dir

    settings = load_settings(args.config)
    eval_ds = load_dataset(dataset_file("eval", args.eval), "eval")
    if args.experiment == BASE:
        out, adapter = base_dir(eval_ds.name), None
    else:
        if not args.train:
            raise ValueError("--train is needed for an experiment other than base")
        exp = parse_experiment(args.experiment)
        out = experiment_dir(exp.name, args.train, eval_ds.name)
        adapter, summary = finetune_pair(exp, args.train, eval_ds.name, settings)
        print(f"fine-tuned: {summary}")
    generate_pair(eval_ds, settings, out, adapter)
    metrics = judge_pair(eval_ds, settings, out)
    print(json.dumps(metrics, indent=2))
    return 0


def run_leaderboard(args: argparse.Namespace) -> int:
    from .. import leaderboard

    rows = leaderboard.collect(args.root)
    if not rows:
        print("no metrics.json under experiments/ yet: run `make demo` or `dattr evaluate`", file=sys.stderr)
        return 1
    print(leaderboard.report(rows))
    return 0
