"""Experiment-level steps on the storage layout of design §6, one function per stage.

`dattr rank`, `dattr demo` and the Dagster assets all call these, so a CLI run and an asset
materialisation of the same (experiment, train, eval) write the same files the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import AutoConfig

from . import scoring
from .config import Experiment, Settings
from .data import Dataset, load_dataset
from .methods import control_method_for
from .models import DEMO_MODEL, default_layer, resolve_model
from .selection import random_scores, select, write_selection
from .store import VectorSet, VectorError, dattr_home, experiment_dir, model_tag, vectors_dir

if TYPE_CHECKING:
    from .judge import JudgeItem

log = logging.getLogger(__name__)
BASE = "base"


def resolve_layer(settings: Settings) -> int:
    """The configured block, or the default for the model's depth (read from its config only)."""
    if settings.layer is not None:
        return settings.layer
    return default_layer(AutoConfig.from_pretrained(resolve_model(settings.model)).num_hidden_layers)


def settings_tag(settings: Settings) -> str:
    return model_tag(settings.model or DEMO_MODEL, resolve_layer(settings))


def base_dir(eval_name: str, root: str | Path | None = None) -> Path:
    """Outputs of the un-tuned model on an eval set (`experiments/base/-/{eval}`)."""
    return experiment_dir(BASE, "-", eval_name, root)


def experiment_scores(exp: Experiment, train: Dataset, evals: Mapping[str, Dataset], settings: Settings,
                      root: str | Path | None = None, model=None, tok=None, tag: str | None = None,
                      control_method: str | None = None) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(train ids, scores[n_train, n_evals], provenance) of one experiment against several eval sets.

    Vectors come from `vectors/{tag}/...` (default: the settings' model and layer); the control
    vectors of `cos_sim_debias_eval` from `control_method` (default: the query method's own)."""
    tag = tag or settings_tag(settings)

    def _vectors(method: str, dataset: str) -> VectorSet:
        return VectorSet.open(vectors_dir(tag, method, dataset, root))

    from . import baselines

    attr_rows = {name: scoring.attribution_split(ds) for name, ds in evals.items()}
    n_evals = len(evals)
    if exp.name == "emb":
        return train.ids, baselines.emb_scores(train.examples, attr_rows), {}
    if exp.name == "lex":
        return train.ids, baselines.lex_scores(train.examples, attr_rows), {}
    if exp.name == "loss":
        if model is None:
            from .models import load_model

            model, tok = load_model(settings.model, settings.device, settings.dtype)
        col = baselines.loss_scores(train.examples, model, tok, max_tokens=settings.max_tokens)
        return train.ids, np.repeat(col[:, None], n_evals, 1), {"model": settings.model or "demo"}
    if exp.name == "random":
        seed = settings.selection_seed
        return train.ids, np.repeat(random_scores(len(train), seed)[:, None], n_evals, 1), {"seed": seed}
    train_vs = _vectors(exp.attr, train.name)
    if train_vs.ids != train.ids:
        raise VectorError(f"{train_vs.path}: vectors cover {len(train_vs)} ids but {train.path} has {len(train)} rows "
                          "or other ids (stale vectors? re-run attribution)")
    rule = settings.rule_of(exp)
    queries = {}
    for name, rows in attr_rows.items():
        control = (_vectors(control_method or control_method_for(exp.query), name)
                   if rule == "cos_sim_debias_eval" else None)
        query_vs = _vectors(exp.query, name)
        # pv vectors exist only for the prompts whose persona replies were non-empty
        ids = query_vs.ids if exp.query == "pv" else [e.id for e in rows]
        queries[name] = scoring.Query.from_vectors(query_vs, ids, control)
    ids, scores = scoring.score_matrix(train_vs, queries, rule)
    return ids, scores, {"rule": rule, "model_tag": tag}


def score_pair(exp: Experiment, train: Dataset, eval_ds: Dataset, settings: Settings,
               root: str | Path | None = None) -> tuple[Path, list[str], np.ndarray]:
    """Write `scores.parquet` of one (experiment, train, eval)."""
    ids, scores, info = experiment_scores(exp, train, {eval_ds.name: eval_ds}, settings, root)
    out = experiment_dir(exp.name, train.name, eval_ds.name, root) / "scores.parquet"
    scoring.write_scores(out, ids, scores[:, 0], {**info, "experiment": exp.name, "train": train.name,
                                                  "eval": eval_ds.name})
    return out, ids, scores[:, 0]


def select_pair(exp: Experiment, train: Dataset, eval_name: str, settings: Settings,
                root: str | Path | None = None) -> tuple[Path, list[str]]:
    """Top-k of the pair's scores → `selection.parquet` + `selected.parquet` (ready to train)."""
    out = experiment_dir(exp.name, train.name, eval_name, root)
    ids, scores = scoring.read_scores(out / "scores.parquet")
    chosen = select(scores, settings.k, "top", settings.selection_seed)
    write_selection(out, ids, scores, chosen, train, {"experiment": exp.name, "k": settings.k,
                                                      "selected": len(chosen)})
    return out / "selection.parquet", [ids[i] for i in chosen]


def finetune_config(settings: Settings):
    from .finetune import FinetuneConfig

    known = {f.name for f in fields(FinetuneConfig)}
    unknown = set(settings.finetune) - known
    if unknown:
        raise ValueError(f"unknown finetune setting(s) {sorted(unknown)}; known: {sorted(known)}")
    over = dict(settings.finetune)
    if "target_modules" in over:
        over["target_modules"] = tuple(over["target_modules"])
    return FinetuneConfig(**over)


def finetune_pair(exp: Experiment, train_name: str, eval_name: str, settings: Settings,
                  root: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """LoRA on the pair's `selected.parquet` → `adapter/`."""
    from .finetune import finetune
    from .models import load_model

    out = experiment_dir(exp.name, train_name, eval_name, root)
    selected = load_dataset(out / "selected.parquet", "train")
    model, tok = load_model(settings.model, settings.device, settings.dtype)
    _, summary = finetune(model, tok, selected.examples, out / "adapter", finetune_config(settings))
    return out / "adapter", summary


def _judge(eval_ds: Dataset, items: list[JudgeItem], out_dir: Path, settings: Settings, root) -> tuple[dict[str, Any], str]:
    """Judge the generations: an LLM judge when configured, else the offline ground-truth judge
    for `ground_truth_0_2`, else nothing (and say so) — never a made-up score."""
    from .judge import JudgeConfig, judge_replies, summarize, write_judge_parquet

    trait = eval_ds.trait
    opts = {k: v for k, v in settings.judge.items() if k in ("concurrency", "timeout_s", "max_retries", "offline")}
    config = JudgeConfig.from_env(**opts)
    if not config.configured and trait.rubric == "ground_truth_0_2":
        config = JudgeConfig.from_env(**{**opts, "offline": True})
    if not config.configured and not config.offline:
        msg = (f"no LLM judge configured: trait {trait.trait!r} (rubric {trait.rubric}) gets the judge-free "
               "preference gap only; set OPENAI_API_KEY (and DATTR_JUDGE_BASE_URL for a local server)")
        log.warning(msg)
        return {}, msg
    run = judge_replies(items, trait, config,
                        dattr_home(root) / "cache" / "judge.sqlite")
    write_judge_parquet(out_dir / "judge.parquet", run.results)
    summary = summarize(run.results, trait)
    summary["usage"] = {"prompt_tokens": run.usage.prompt_tokens, "completion_tokens": run.usage.completion_tokens,
                        "api_calls": run.usage.api_calls}
    return summary, f"judged by {', '.join(summary.get('judges', [])) or config.model}"


def generate_pair(eval_ds: Dataset, settings: Settings, out_dir: Path, adapter: Path | None = None) -> dict[str, Any]:
    """Sample replies to the held-out prompts (`generations.parquet`) and measure the judge-free
    preference gap CE(treatment) − CE(control) of the base and, with an adapter, the tuned model
    (`preference_gap.json`)."""
    from .finetune import load_adapter
    from .generate import SamplingConfig, generate_heldout
    from .metrics import preference_gap
    from .models import load_model
    from .store import write_json

    heldout = eval_ds.split("heldout")
    if not heldout:
        raise ValueError(f"{eval_ds.path}: no held-out rows to evaluate on (field 'split')")
    model, tok = load_model(settings.model, settings.device, settings.dtype)
    base_gap = preference_gap(model, tok, heldout, max_tokens=settings.max_tokens)
    if adapter is not None:
        model = load_adapter(model, adapter)
    tuned_gap = preference_gap(model, tok, heldout, max_tokens=settings.max_tokens) if adapter else base_gap
    generate_heldout(model, tok, heldout, out_dir / "generations.parquet", SamplingConfig(**settings.generate),
                     model_name=settings.model or DEMO_MODEL, adapter=str(adapter) if adapter else None)
    gap = {"base": base_gap, "tuned": tuned_gap, "drop": base_gap["gap"] - tuned_gap["gap"]}
    write_json(out_dir / "preference_gap.json", gap)
    return gap


def judge_pair(eval_ds: Dataset, settings: Settings, out_dir: Path, root: str | Path | None = None) -> dict[str, Any]:
    """Judge `generations.parquet` and write `metrics.json` (judge summary, the judge-free
    ground-truth check where rows have `meta.ground_truth`, and the preference gap)."""
    import json

    from .judge import ground_truth_check
    from .judge.inputs import read_generation_items
    from .metrics import write_metrics

    items = read_generation_items(out_dir / "generations.parquet", eval_ds)
    judged, message = _judge(eval_ds, items, out_dir, settings, root)
    gap = json.loads((out_dir / "preference_gap.json").read_text(encoding="utf-8"))
    metrics = {"eval": eval_ds.name, "trait": eval_ds.trait.trait, "rubric": eval_ds.trait.rubric,
               "heldout_pairs": gap["base"]["n"], "judge": judged, "judge_message": message,
               "ground_truth_check": ground_truth_check(items), "preference_gap": gap}
    write_metrics(out_dir / "metrics.json", metrics)
    return metrics
