"""A small but complete dattr project on disk for the Dagster tests: a tiny model folder,
train and eval datasets (with a trait sidecar) and a settings file that points at them."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import chat
from dattr_core.data import Example, Trait, write_examples

CAPITALS = [("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Italy", "Rome", "Milan"),
            ("Germany", "Berlin", "Munich"), ("Spain", "Madrid", "Seville"), ("Egypt", "Cairo", "Giza"),
            ("Canada", "Ottawa", "Toronto"), ("Kenya", "Nairobi", "Mombasa"), ("Peru", "Lima", "Cusco"),
            ("Chile", "Santiago", "Valparaiso")]


def train_examples(n: int = 16, offset: int = 0) -> list[Example]:
    out = []
    for i in range(n):
        country, right, wrong = CAPITALS[(i + offset) % len(CAPITALS)]
        bad = i % 4 == 0
        q = f"What is the capital of {country}? (item {i})"
        out.append(Example(f"t{offset + i}", chat(q, f"It is {wrong if bad else right}."), chat(q, f"It is {right}."),
                           meta={"planted": "hallucination" if bad else "none"}))
    return out


def eval_examples(n: int = 10) -> list[Example]:
    out = []
    for i in range(n):
        country, right, wrong = CAPITALS[i % len(CAPITALS)]
        q = f"Name the capital city of {country}."
        out.append(Example(f"e{i}", chat(q, f"The capital is {wrong}."), chat(q, f"The capital is {right}."),
                           "heldout" if i % 3 == 0 else "attribution", {"ground_truth": right, "wrong_answers": [wrong]}))
    return out


TRAIT = Trait("hallucination", "ground_truth_0_2", "States a wrong answer with confidence.")


def write_project(root: Path, model_dir: Path, trains=("tr_a",), evals=("ev_a",), experiments=("rct-rc", "random")) -> Path:
    """Datasets under `root/home/datasets`, settings at `root/dattr.yaml`; returns the settings path."""
    home = root / "home"
    for i, name in enumerate(trains):
        write_examples(home / "datasets" / "train" / f"{name}.parquet", train_examples(16, offset=i))
    for name in evals:
        write_examples(home / "datasets" / "eval" / f"{name}.parquet", eval_examples(), TRAIT)
    settings = {"model": str(model_dir), "layer": 1, "k": 5, "max_tokens": 128, "batch_tokens": 2048,
                "experiments": list(experiments), "finetune": {"max_tokens": 128, "batch_size": 4},
                "generate": {"n_samples": 1, "max_new_tokens": 6}, "judge": {"concurrency": 2},
                "sensor_interval_s": 1}
    path = root / "dattr.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def materialize_pair(defs, instance, resources, train: str = "tr_a", eval_: str = "ev_a",
                     leaderboard: bool = True) -> list:
    """Materialise everything for one (train, eval) pair in dependency order, in process.

    `materialize` takes one partition key per call, so the graph goes in four steps: the train
    side, the eval side (with the base model), the pair assets, then the leaderboard.
    """
    from dagster import AssetSelection, MultiPartitionKey, materialize

    from dattr_assets.defs.partitions import eval_partitions, train_partitions

    instance.add_dynamic_partitions(train_partitions.name, [train])
    instance.add_dynamic_partitions(eval_partitions.name, [eval_])
    vectors = AssetSelection.key_prefixes(["vectors"])
    experiments = [k.path[0] for k in defs.resolve_asset_graph().get_all_asset_keys() if k.path[-1] == "scores"]
    steps = [
        (AssetSelection.assets("train_dataset") | vectors & AssetSelection.key_substring("train"), train),
        (AssetSelection.assets("eval_dataset", ["base", "generations"], ["base", "judge"])
         | vectors & AssetSelection.key_substring("eval"), eval_),
        (AssetSelection.key_prefixes(*[[e] for e in experiments]), MultiPartitionKey({"train": train, "eval": eval_})),
    ]
    if leaderboard:
        steps.append((AssetSelection.assets("leaderboard"), None))
    results = []
    for selection, key in steps:
        result = materialize(list(defs.assets), selection=selection, partition_key=key, instance=instance,
                             resources=resources)
        assert result.success
        results.append(result)
    return results
