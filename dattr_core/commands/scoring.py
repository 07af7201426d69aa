"""`dattr score`, `dattr select`, `dattr rank`: queries, scores and selections (design §4)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import load_dataset, validate_name
from ..scoring import DEFAULT_RULE, RULES, Query, attribution_split, read_scores, score_matrix, write_scores
from ..selection import DEFAULT_K, STRATEGIES, select, write_selection
from ..store import VectorSet, dattr_home, experiment_dir
from ..config import Settings, parse_experiment
from ..pipeline import experiment_scores
from .finetune import dataset_path

BASELINES = ("emb", "lex", "loss", "random")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score train vectors against one eval set's query → scores.parquet")
    p.add_argument("train_vectors", help="train vectors folder (method A)")
    p.add_argument("eval_vectors", help="eval vectors folder (method Q); all rows of the eval set")
    p.add_argument("--eval-dataset", required=True, help="the eval dataset file: its attribution split builds the query")
    _rule_args(p)
    p.add_argument("--control-vectors", help="vectors of the eval set's control replies (for cos_sim_debias_eval)")
    p.add_argument("--out", required=True, help="scores.parquet to write")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("select", help="pick k train rows from a scores.parquet → selection.parquet + selected.parquet")
    p.add_argument("scores", help="a scores.parquet")
    p.add_argument("--train-dataset", required=True, help="the train dataset file the scores belong to")
    _select_args(p)
    p.add_argument("--out", help="output folder (default: the scores file's folder)")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("rank", help="score + select for experiments {attr}-{query} and baselines, standard layout")
    p.add_argument("--train", required=True, help="train dataset: a name under $DATTR_HOME/datasets/train/ or a file")
    p.add_argument("--eval", required=True, nargs="+", help="eval dataset(s): names under datasets/eval/ or files")
    p.add_argument("--experiments", nargs="+", default=["rct-rc"],
                   help=f"e.g. rct-rc rd-rd trak-trak rct-rct-cos_sim_debias_train, or baselines "
                        f"{' '.join(BASELINES)}; a non-default --rule is appended to the name (rct-rc-proj)")
    _rule_args(p)
    p.add_argument("--control-method", help="method of the eval sets' control-reply vectors (for cos_sim_debias_eval)")
    _select_args(p)
    p.add_argument("--model-tag", help="vectors/{model_tag}/... (default: the only one there)")
    p.add_argument("--model", default=None, help="base model for the loss baseline (default: the demo model)")
    p.set_defaults(func=cmd_rank)


def _rule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", choices=RULES, default=DEFAULT_RULE, help="scoring rule (default %(default)s)")


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=DEFAULT_K, help="rows to select (default %(default)s)")
    p.add_argument("--strategy", choices=STRATEGIES, default="top", help="default %(default)s")
    p.add_argument("--seed", type=int, default=0, help="seed of the random strategy")


def cmd_score(args: argparse.Namespace) -> int:
    evalset = load_dataset(args.eval_dataset, "eval", require_trait=False)
    ids = [e.id for e in attribution_split(evalset)]
    control = VectorSet.open(args.control_vectors) if args.control_vectors else None
    query = Query.from_vectors(VectorSet.open(args.eval_vectors), ids, control)
    train_ids, scores = score_matrix(VectorSet.open(args.train_vectors), {evalset.name: query}, args.rule)
    out = write_scores(args.out, train_ids, scores[:, 0], {"rule": args.rule, "eval": evalset.name,
                       "train_vectors": args.train_vectors, "eval_vectors": args.eval_vectors})
    print(f"wrote {out} ({len(train_ids)} rows, rule {args.rule}, query from {len(ids)} attribution rows)")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    ids, scores = read_scores(args.scores)
    train = load_dataset(args.train_dataset, "train")
    chosen = select(scores, args.k, args.strategy, args.seed)
    out = Path(args.out) if args.out else Path(args.scores).parent
    info = {"scores": args.scores, "k": args.k, "strategy": args.strategy, "seed": args.seed}
    selection, selected = write_selection(out, ids, scores, chosen, train, info)
    print(f"wrote {selection} and {selected} ({len(chosen)} of {len(ids)} rows, {args.strategy})")
    return 0


def _model_tag(args: argparse.Namespace) -> str:
    if args.model_tag:
        return args.model_tag
    root = dattr_home() / "vectors"
    tags = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not tags:
        raise FileNotFoundError(f"{root}: no vectors yet (run `dattr attribute` first)")
    if len(tags) > 1:
        raise ValueError(f"{root}: several model tags ({', '.join(tags)}); pass --model-tag")
    return tags[0]


def cmd_rank(args: argparse.Namespace) -> int:
    train = load_dataset(dataset_path(args.train, "train"), "train")
    evals = {}
    for name in args.eval:
        ds = load_dataset(dataset_path(name, "eval"), "eval", require_trait=False)
        evals[ds.name] = ds
    settings = Settings(model=args.model, scoring_rule=args.rule, selection_seed=args.seed, k=args.k)
    vector_tag = None
    for exp in args.experiments:
        parsed = parse_experiment(exp)
        if not parsed.is_reference:
            vector_tag = vector_tag or _model_tag(args)
        ids, scores, info = experiment_scores(parsed, train, evals, settings, tag=vector_tag,
                                              control_method=args.control_method)
        folder = exp if parsed.is_reference or parsed.rule or args.rule == DEFAULT_RULE else f"{exp}-{args.rule}"
        for j, name in enumerate(evals):
            out = experiment_dir(validate_name(folder, "experiment"), train.name, name)
            meta = {**info, "experiment": exp, "train": train.name, "eval": name,
                    "k": args.k, "strategy": args.strategy, "seed": args.seed}
            write_scores(out / "scores.parquet", ids, scores[:, j], meta)
            chosen = select(scores[:, j], args.k, args.strategy, args.seed)
            write_selection(out, ids, scores[:, j], chosen, train, meta)
            print(f"{folder} {train.name}→{name}: {out} (selected {len(chosen)} of {len(ids)}, {args.strategy})")
    return 0
