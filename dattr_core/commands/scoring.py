"""`dattr score`, `dattr select`, `dattr rank`: queries, scores and selections (design §4)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Dataset, Example, load_dataset, validate_name
from ..scoring import DEFAULT_RULE, RULES, Query, attribution_split, read_scores, score_matrix, write_scores
from ..selection import DEFAULT_K, STRATEGIES, random_scores, select, write_selection
from ..store import VectorError, VectorSet, dattr_home, experiment_dir, vectors_dir
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
                   help=f"e.g. rct-rc rd-rd trak-trak, or baselines {' '.join(BASELINES)}; "
                        "a non-default rule is appended to the folder name (rct-rc.proj)")
    _rule_args(p)
    p.add_argument("--control-method", help="method of the eval sets' control-reply vectors (for cos_sim_debias_eval)")
    _select_args(p)
    p.add_argument("--model-tag", help="vectors/{model_tag}/... (default: the only one there)")
    p.add_argument("--model", default=None, help="base model for the loss baseline (default: the demo model)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of the loss and emb baselines")
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


def _vector_scores(
    exp: str, train: Dataset, evals: Mapping[str, list[Example]], args: argparse.Namespace
) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Scores of experiment `A-Q`: train vectors of method A against queries of method Q."""
    attr, query_method = exp.split("-")
    tag = _model_tag(args)
    train_vs = VectorSet.open(vectors_dir(tag, attr, train.name))
    if set(train_vs.ids) != set(train.ids):
        raise VectorError(f"{train_vs.path}: vectors cover {len(train_vs)} ids but {train.path} has {len(train)} "
                          "rows, or other ids (stale vectors? rerun `dattr attribute`)")
    if args.rule == "cos_sim_debias_eval" and not args.control_method:
        raise ValueError("rule cos_sim_debias_eval needs --control-method (vectors of the control replies)")
    queries = {}
    for name, rows in evals.items():
        ids = [e.id for e in rows]
        control = VectorSet.open(vectors_dir(tag, args.control_method, name)) if args.control_method else None
        queries[name] = Query.from_vectors(VectorSet.open(vectors_dir(tag, query_method, name)), ids, control)
    ids, scores = score_matrix(train_vs, queries, args.rule)
    return ids, scores, {"rule": args.rule, "model_tag": tag}


def _experiment_scores(
    exp: str, train: Dataset, evals: Mapping[str, list[Example]], args: argparse.Namespace
) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(train ids, scores[n_train, n_evals], provenance) of one experiment."""
    from .. import baselines

    n_evals = len(evals)
    if exp == "emb":
        return train.ids, baselines.emb_scores(train.examples, evals, args.batch_size), {}
    if exp == "lex":
        return train.ids, baselines.lex_scores(train.examples, evals), {}
    if exp == "loss":
        from ..models import load_model

        model, tok = load_model(args.model)
        col = baselines.loss_scores(train.examples, model, tok, args.batch_size)
        return train.ids, np.repeat(col[:, None], n_evals, 1), {"model": args.model or "demo"}
    if exp == "random":
        return train.ids, np.repeat(random_scores(len(train), args.seed)[:, None], n_evals, 1), {"seed": args.seed}
    if exp.count("-") == 1 and all(exp.split("-")):
        return _vector_scores(exp, train, evals, args)
    raise ValueError(f"unknown experiment {exp!r}: use {{attr}}-{{query}} (e.g. rct-rc) or one of {BASELINES}")


def cmd_rank(args: argparse.Namespace) -> int:
    train = load_dataset(dataset_path(args.train, "train"), "train")
    evals = {}
    for name in args.eval:
        ds = load_dataset(dataset_path(name, "eval"), "eval", require_trait=False)
        evals[ds.name] = attribution_split(ds)
    for exp in args.experiments:
        ids, scores, info = _experiment_scores(exp, train, evals, args)
        folder = exp if exp in BASELINES or args.rule == DEFAULT_RULE else f"{exp}.{args.rule}"
        for j, name in enumerate(evals):
            out = experiment_dir(validate_name(folder, "experiment"), train.name, name)
            meta = {**info, "experiment": exp, "train": train.name, "eval": name,
                    "k": args.k, "strategy": args.strategy, "seed": args.seed}
            write_scores(out / "scores.parquet", ids, scores[:, j], meta)
            chosen = select(scores[:, j], args.k, args.strategy, args.seed)
            write_selection(out, ids, scores[:, j], chosen, train, meta)
            print(f"{folder} {train.name}→{name}: {out} (selected {len(chosen)} of {len(ids)}, {args.strategy})")
    return 0
