"""Per experiment `{E}/scores`, `{E}/selection`, `{E}/adapter`, `{E}/generations`, `{E}/judge` on
[train × eval] pairs; `base/generations` and `base/judge` per eval set; the `leaderboard`."""

import json

import numpy as np
import polars as pl
from dagster import (AssetCheckResult, AssetCheckSpec, AssetDep, AssetExecutionContext, AssetKey,
                     AutomationCondition, MaterializeResult, MetadataValue, TableColumn, TableRecord, TableSchema,
                     asset)

from dattr_core import leaderboard as lb
from dattr_core import pipeline
from dattr_core.config import Experiment
from dattr_core.data import load_dataset
from dattr_core.methods import control_method_for
from dattr_core.store import dataset_file, experiment_dir

from .partitions import eval_partitions, pair_keys, pair_partitions, to_eval, to_train
from .resources import DattrResource
from .vectors import vectors_key

EAGER = AutomationCondition.eager()
MAX_UNPARSED_SHARE = 0.10


def _datasets(context, dattr: DattrResource):
    train, eval_ = pair_keys(context)
    return (load_dataset(dataset_file("train", train, dattr.root), "train"),
            load_dataset(dataset_file("eval", eval_, dattr.root), "eval"))


def histogram_md(scores: np.ndarray, bins: int = 12) -> str:
    counts, edges = np.histogram(scores, bins=bins)
    top = counts.max() or 1
    lines = [f"{edges[i]:>8.3f} … {edges[i + 1]:<8.3f} {'█' * round(30 * c / top)} {c}" for i, c in enumerate(counts)]
    return "```\n" + "\n".join(lines) + "\n```"


def top_table(train, ids: list[str], scores: dict[str, float], n: int = 10) -> MetadataValue:
    by_id = {e.id: e for e in train.examples}
    cols = [TableColumn("rank", "int"), TableColumn("id"), TableColumn("score", "float"),
            TableColumn("planted"), TableColumn("reply")]
    records = [TableRecord({"rank": i + 1, "id": x, "score": float(scores[x]),
                            "planted": str(by_id[x].meta.get("planted", "")),
                            "reply": by_id[x].treatment_messages[-1]["content"][:160]})
               for i, x in enumerate(ids[:n])]
    return MetadataValue.table(records, schema=TableSchema(cols))


def experiment_assets(exp: Experiment, rule: str) -> list:
    """The five pair assets of one experiment (`rule`: its scoring rule)."""
    e = exp.name
    if exp.is_reference:
        score_deps = [AssetDep("train_dataset", partition_mapping=to_train),
                      AssetDep("eval_dataset", partition_mapping=to_eval)]
    else:
        score_deps = [AssetDep(vectors_key(exp.attr, "train"), partition_mapping=to_train),
                      AssetDep(vectors_key(exp.query, "eval"), partition_mapping=to_eval)]
        if rule == "cos_sim_debias_eval":
            score_deps.append(AssetDep(vectors_key(control_method_for(exp.query), "eval"), partition_mapping=to_eval))
    common = dict(partitions_def=pair_partitions, automation_condition=EAGER, group_name=e.replace("-", "_"),
                  code_version="1")

    @asset(key=[e, "scores"], deps=score_deps, kinds={"numpy", "parquet"}, pool="gpu" if e == "loss" else None,
           check_specs=[AssetCheckSpec("no_nan", asset=[e, "scores"])],
           description=f"Score of every train example against the eval behaviour ({e}).", **common)
    def scores(context: AssetExecutionContext, dattr: DattrResource) -> MaterializeResult:
        train, eval_ds = _datasets(context, dattr)
        path, ids, vals = pipeline.score_pair(exp, train, eval_ds, dattr.settings(), dattr.root)
        order = np.argsort(-vals, kind="stable")
        finite = bool(np.isfinite(vals).all())
        return MaterializeResult(
            metadata={"path": MetadataValue.path(str(path)), "rows": len(ids), "max": float(vals.max()),
                      "mean": float(vals.mean()), "histogram": MetadataValue.md(histogram_md(vals)),
                      "top_10": top_table(train, [ids[i] for i in order], dict(zip(ids, vals.tolist())))},
            check_results=[AssetCheckResult(check_name="no_nan", passed=finite)])

    @asset(key=[e, "selection"], deps=[AssetKey([e, "scores"])], kinds={"parquet"},
           check_specs=[AssetCheckSpec("size_is_k", asset=[e, "selection"]),
                        AssetCheckSpec("ids_in_train", asset=[e, "selection"])],
           description=f"The top-k train examples by {e} score, ready to fine-tune on.", **common)
    def selection(context: AssetExecutionContext, dattr: DattrResource) -> MaterializeResult:
        train, eval_ds = _datasets(context, dattr)
        s = dattr.settings()
        path, chosen = pipeline.select_pair(exp, train, eval_ds.name, s, dattr.root)
        table = pl.read_parquet(path)
        by_id = {e.id: e for e in train.examples}
        planted = sum(1 for x in chosen if by_id[x].meta.get("planted") not in (None, "none"))
        return MaterializeResult(
            metadata={"path": MetadataValue.path(str(path)), "selected": len(chosen), "k": s.k,
                      "planted_selected": planted,
                      "top_10": top_table(train, chosen, dict(zip(table["id"], table["score"])))},
            check_results=[
                AssetCheckResult(check_name="size_is_k", passed=len(chosen) == min(s.k, len(train)),
                                 metadata={"selected": len(chosen), "expected": min(s.k, len(train))}),
                AssetCheckResult(check_name="ids_in_train", passed=set(chosen) <= set(train.ids))])

    @asset(key=[e, "adapter"], deps=[AssetKey([e, "selection"])], kinds={"pytorch"}, pool="gpu",
           description="LoRA adapter fine-tuned on the selection (design §5).", **common)
    def adapter(context: AssetExecutionContext, dattr: DattrResource) -> MaterializeResult:
        train, eval_ = pair_keys(context)
        path, summary = pipeline.finetune_pair(exp, train, eval_, dattr.settings(), dattr.root)
        return MaterializeResult(metadata={"path": MetadataValue.path(str(path)),
                                           **{k: v for k, v in summary.items() if isinstance(v, (int, float))}})

    @asset(key=[e, "generations"], deps=[AssetKey([e, "adapter"])], kinds={"pytorch", "parquet"}, pool="gpu",
           description="Tuned model's sampled replies to held-out prompts, and its preference gap.", **common)
    def generations(context: AssetExecutionContext, dattr: DattrResource) -> MaterializeResult:
        train, eval_ds = _datasets(context, dattr)
        out = experiment_dir(e, train.name, eval_ds.name, dattr.root)
        gap = pipeline.generate_pair(eval_ds, dattr.settings(), out, out / "adapter")
        return MaterializeResult(metadata=gap_metadata(gap, out))

    @asset(key=[e, "judge"], deps=[AssetKey([e, "generations"])], kinds={"openai"}, pool="judge",
           check_specs=[AssetCheckSpec("unparsed_share", asset=[e, "judge"],
                                       description=f"at most {MAX_UNPARSED_SHARE:.0%} judge replies unparsed")],
           description="Judge scores of the tuned model's replies, and metrics.json.", **common)
    def judge(context: AssetExecutionContext, dattr: DattrResource) -> MaterializeResult:
        train, eval_ds = _datasets(context, dattr)
        out = experiment_dir(e, train.name, eval_ds.name, dattr.root)
        return judge_result(pipeline.judge_pair(eval_ds, dattr.settings(), out, dattr.root), out)

    return [scores, selection, adapter, generations, judge]


def gap_metadata(gap: dict, out) -> dict:
    return {"path": MetadataValue.path(str(out / "generations.parquet")), "gap_base": gap["base"]["gap"],
            "gap_tuned": gap["tuned"]["gap"], "gap_drop": gap["drop"], "heldout_pairs": gap["base"]["n"]}


def judge_result(metrics: dict, out) -> MaterializeResult:
    j = metrics["judge"]
    n = j.get("n_judged", 0) + j.get("n_unparsed", 0)
    share = j.get("n_unparsed", 0) / n if n else 0.0
    meta = {"path": MetadataValue.path(str(out / "metrics.json")), "judge_message": metrics["judge_message"],
            "metrics": MetadataValue.json(metrics)}
    trait_avg = j.get(f"{metrics['trait']}_avg")
    if trait_avg is not None:
        meta[f"{metrics['trait']}_avg"] = float(trait_avg)
    if metrics.get("ground_truth_check"):
        meta["gt_wrong"] = float(metrics["ground_truth_check"]["wrong_rate"])
    return MaterializeResult(metadata=meta, check_results=[
        AssetCheckResult(check_name="unparsed_share", passed=share <= MAX_UNPARSED_SHARE,
                         metadata={"unparsed_share": share, "judged": n})])


def base_assets() -> list:
    """The un-tuned model on each eval set: the reference every experiment is compared with."""
    common = dict(partitions_def=eval_partitions, automation_condition=EAGER, group_name="base", code_version="1")

    @asset(key=["base", "generations"], deps=["eval_dataset"], kinds={"pytorch", "parquet"}, pool="gpu",
           description="Base model's replies to held-out prompts, and its preference gap.", **common)
    def base_generations(context: AssetExecutionContext, dattr: DattrResource) -> MaterializeResult:
        eval_ds = load_dataset(dataset_file("eval", context.partition_key, dattr.root), "eval")
        out = pipeline.base_dir(eval_ds.name, dattr.root)
        return MaterializeResult(metadata=gap_metadata(pipeline.generate_pair(eval_ds, dattr.settings(), out), out))

    @asset(key=["base", "judge"], deps=[AssetKey(["base", "generations"])], kinds={"openai"}, pool="judge",
           check_specs=[AssetCheckSpec("unparsed_share", asset=["base", "judge"])],
           description="Judge scores of the base model's replies.", **common)
    def base_judge(context: AssetExecutionContext, dattr: DattrResource) -> MaterializeResult:
        eval_ds = load_dataset(dataset_file("eval", context.partition_key, dattr.root), "eval")
        out = pipeline.base_dir(eval_ds.name, dattr.root)
        return judge_result(pipeline.judge_pair(eval_ds, dattr.settings(), out, dattr.root), out)

    return [base_generations, base_judge]


def leaderboard_asset(experiments: list[Experiment]):
    deps = [AssetKey([e.name, "judge"]) for e in experiments] + [AssetKey(["base", "judge"])]

    @asset(name="leaderboard", deps=deps, kinds={"parquet"}, group_name="leaderboard", code_version="1",
           automation_condition=AutomationCondition.any_deps_updated() & ~AutomationCondition.in_progress(),
           description="Every experiment × pair × metric in one table.")
    def leaderboard(context: AssetExecutionContext, dattr: DattrResource) -> MaterializeResult:
        rows = lb.collect(dattr.root)
        path = lb.write(rows, dattr.root)
        cols = [TableColumn(c) for c in lb.COLUMNS]
        records = [TableRecord({c: lb.fmt(r[c]) for c in lb.COLUMNS}) for r in rows]
        return MaterializeResult(metadata={
            "path": MetadataValue.path(str(path)), "rows": len(rows),
            "leaderboard": MetadataValue.table(records, schema=TableSchema(cols)),
            "plot": MetadataValue.md("```\n" + "\n\n".join(lb.bar_chart(rows, v) for v in lb.CHARTS) + "\n```"),
            "summary": MetadataValue.json(json.loads(json.dumps(rows, default=str)))})

    return leaderboard
