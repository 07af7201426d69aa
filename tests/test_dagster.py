"""The Dagster graph on a real (temporary) instance: one full pair end to end, lineage, the
dataset sensor, and the definitions themselves."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance, MultiPartitionKey, build_sensor_context

from dagster_fixtures import materialize_pair, write_project
from dattr_core.cli import main
from dattr_core.data import load_dataset
from dattr_core.scoring import Query, attribution_split, score_array
from dattr_core.store import VectorSet
from dattr_assets.definitions import build_definitions
from dattr_assets.defs.partitions import eval_partitions, train_partitions
from dattr_assets.defs.resources import DattrResource
from dattr_assets.defs.sensors import scan_datasets


@pytest.fixture
def project(tmp_path, model_dir, monkeypatch):
    cfg = write_project(tmp_path, model_dir, experiments=("rct-rc", "grad-grad-cos_sim_debias_train", "trak-trak",
                                                           "random"))
    monkeypatch.setenv("DATTR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATTR_CONFIG", str(cfg))
    for var in ("OPENAI_API_KEY", "DATTR_JUDGE_API_KEY", "DATTR_JUDGE_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path, cfg


def test_one_pair_end_to_end_in_process(project, capsys):
    root, cfg = project
    defs = build_definitions(str(cfg))
    resources = {"dattr": DattrResource(config_path=str(cfg), home=str(root / "home"))}
    with DagsterInstance.ephemeral() as instance:
        for result in materialize_pair(defs, instance, resources):
            for check in result.get_asset_check_evaluations():
                assert check.passed, check
        exp_dir = root / "home" / "experiments" / "rct-rc" / "tr_a" / "ev_a"
        for name in ("scores.parquet", "selection.parquet", "selected.parquet", "adapter/adapter_config.json",
                     "generations.parquet", "judge.parquet", "metrics.json"):
            assert (exp_dir / name).exists(), name
        metrics = json.loads((exp_dir / "metrics.json").read_text())
        assert metrics["judge"]["judges"] == ["offline-ground-truth"]
        assert metrics["judge"]["n_judged"] + metrics["judge"]["n_unparsed"] == 4  # 4 held-out prompts × 1 sample
        assert metrics["ground_truth_check"]["n"] == 4
        board = instance.get_latest_materialization_event(AssetKey("leaderboard")).asset_materialization.metadata
        assert board["rows"].value == 5  # the 4 experiments and base on the one pair
        scores = pl.read_parquet(root / "home" / "experiments" / "grad-grad-cos_sim_debias_train" / "tr_a" / "ev_a"
                                 / "scores.parquet")
        train_vs = VectorSet.open(next((root / "home").glob("vectors/*/grad/tr_a")))
        eval_vs = VectorSet.open(next((root / "home").glob("vectors/*/grad/ev_a")))
        eval_ids = [e.id for e in attribution_split(load_dataset(root / "home" / "datasets" / "eval" / "ev_a.parquet",
                                                                 "eval"))]
        want = score_array(train_vs.load(), {"q": Query.from_vectors(eval_vs, eval_ids)}, "cos_sim_debias_train")[:, 0]
        np.testing.assert_allclose(scores["score"].to_numpy(), want, rtol=1e-5, atol=1e-6)  # the suffix's rule
        sel = instance.get_latest_materialization_event(AssetKey(["rct-rc", "selection"]))
        assert sel.asset_materialization.metadata["selected"].value == 5
    assert main(["leaderboard", "--root", str(root / "home")]) == 0
    table = capsys.readouterr().out
    assert "| rct-rc | tr_a | ev_a |" in table and "gt_wrong by eval / experiment" in table


def test_scores_lineage_is_exactly_the_two_vector_partitions(project):
    _, cfg = project
    graph = build_definitions(str(cfg)).resolve_asset_graph()
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(train_partitions.name, ["tr_a"])
        instance.add_dynamic_partitions(eval_partitions.name, ["ev_a"])
        from dagster._core.definitions.partitions.context import partition_loading_context

        with partition_loading_context(dynamic_partitions_store=instance):
            parents = graph.get_parents_partitions(AssetKey(["rct-rc", "scores"]),
                                                   MultiPartitionKey({"train": "tr_a", "eval": "ev_a"}))
    got = {(p.asset_key.to_user_string(), p.partition_key) for p in parents.parent_partitions}
    assert got == {("vectors/rct/train", "tr_a"), ("vectors/rc/eval", "ev_a")}


def test_experiment_rule_suffix_sets_rule_and_eval_control_dependency(tmp_path, model_dir):
    cfg = write_project(tmp_path, model_dir, experiments=("rct-rc-cos_sim_debias_eval", "rct-rc"))
    defs = build_definitions(str(cfg))
    graph = defs.resolve_asset_graph()
    deps = {k.to_user_string() for k in graph.get(AssetKey(["rct-rc-cos_sim_debias_eval", "scores"])).parent_keys}
    assert deps == {"vectors/rct/train", "vectors/rc/eval", "vectors/rct_control/eval"}
    assert {k.to_user_string() for k in graph.get(AssetKey(["rct-rc", "scores"])).parent_keys} == \
        {"vectors/rct/train", "vectors/rc/eval"}
    assert graph.has(AssetKey(["vectors", "rct_control", "eval"]))
    # Each side computes what its experiments read: rct on train (no controls needed), rc on eval.
    assert {k.to_user_string() for k in graph.get_all_asset_keys() if k.path[0] == "vectors"} == \
        {"vectors/rct/train", "vectors/rc/eval", "vectors/rct_control/eval"}


def test_sensor_adds_partitions_for_good_files_and_reports_bad_ones(project):
    root, cfg = project
    home = root / "home"
    (home / "datasets" / "train" / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    (home / "datasets" / "train" / "bad name!.jsonl").write_text("{}\n")
    with DagsterInstance.ephemeral() as instance:
        ctx = build_sensor_context(instance=instance, resources={"dattr": DattrResource(home=str(home))})
        result = scan_datasets(ctx, DattrResource(home=str(home)))
        adds = {r.partitions_def_name: set(r.partition_keys) for r in result.dynamic_partitions_requests}
        assert adds == {"train_datasets": {"tr_a"}, "eval_datasets": {"ev_a"}}
        assert {r.partition_key for r in result.run_requests} == {"tr_a", "ev_a"}
        cursor = json.loads(result.cursor)
        assert "train/broken.parquet" in cursor and "train/bad name!.jsonl" in cursor
        # The next tick, with nothing changed, asks for nothing; a removed file is reported.
        (home / "datasets" / "train" / "broken.parquet").unlink()
        ctx2 = build_sensor_context(instance=instance, cursor=result.cursor,
                                    resources={"dattr": DattrResource(home=str(home))})
        again = scan_datasets(ctx2, DattrResource(home=str(home)))
        assert not again.run_requests and "broken.parquet was removed" in again.skip_reason.skip_message


@pytest.mark.slow
def test_vectors_asset_runs_torchrun_through_pipes_when_gpus_gt_1(project):
    """`gpus: 2` launches `torchrun --nproc_per_node=2` (gloo on CPU) through Dagster Pipes; rank 0
    reports the materialisations back, and the files equal a one-process run's."""
    import yaml
    from dagster import AssetSelection, materialize

    root, cfg = project
    settings = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**settings, "gpus": 2}))
    defs = build_definitions(str(cfg))
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(train_partitions.name, ["tr_a"])
        result = materialize(list(defs.assets), selection=AssetSelection.assets("train_dataset", ["vectors", "rct", "train"],
                                                                                  ["vectors", "grad", "train"]),
                             partition_key="tr_a", instance=instance,
                             resources={"dattr": DattrResource(config_path=str(cfg), home=str(root / "home"))})
        assert result.success
        event = instance.get_latest_materialization_event(AssetKey(["vectors", "rct", "train"]))
        assert event.asset_materialization.metadata["world_size"].value == 2
    from dattr_core.store import VectorSet

    vs = VectorSet.open(next((root / "home").glob("vectors/*/rct/tr_a")))
    assert vs.meta["world_size"] == 2 and len(vs) == 16


def test_dagster_definitions_validate_passes(tmp_path):
    """The CLI check users and CI run: the code location in workspace.yaml loads cleanly."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "dagster.yaml").write_text((repo / "dagster_home" / "dagster.yaml").read_text())
    r = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"], cwd=repo,
                       env={**os.environ, "DAGSTER_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "All code locations passed validation" in r.stdout + r.stderr, r.stderr[-3000:]
