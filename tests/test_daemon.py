"""A real asset backfill over 2 train × 2 eval datasets through `dagster dev` (webserver + daemon)
started on 127.0.0.1 and stopped by PID; the `gpu` pool never runs two model steps at once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance

from dagster_fixtures import write_project
from dattr_assets.demo import add_dataset_partitions, dagster_dev, free_port, launch_backfill, set_pool_limits, wait_backfill


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_backfill_2x2_through_the_daemon_respects_the_gpu_pool(tmp_path, model_dir, monkeypatch):
    cfg = write_project(tmp_path, model_dir, trains=("tr_a", "tr_b"), evals=("ev_a", "ev_b"), experiments=("rct-rc",))
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", dagster_home)  # the shipped instance settings
    for var, value in (("DAGSTER_HOME", dagster_home), ("DATTR_HOME", tmp_path / "home"), ("DATTR_CONFIG", cfg)):
        monkeypatch.setenv(var, str(value))
    for var in ("OPENAI_API_KEY", "DATTR_JUDGE_API_KEY", "DATTR_JUDGE_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text("load_from:\n  - python_module: dattr_assets.definitions\n")
    with DagsterInstance.get() as instance:
        set_pool_limits(instance, {"gpu": 1, "judge": 2})
        assert add_dataset_partitions(instance) == {"train": ["tr_a", "tr_b"], "eval": ["ev_a", "ev_b"]}
        with dagster_dev(free_port(), tmp_path / "dev.log", workspace=str(workspace)) as url:
            backfill_id = launch_backfill(url, "test")
            status = wait_backfill(instance, backfill_id, timeout_s=900, poll_s=2)
        assert status == "COMPLETED_SUCCESS", (tmp_path / "dev.log").read_text()[-5000:]
        for exp_dir in (tmp_path / "home" / "experiments" / "rct-rc").glob("*/*"):
            assert (exp_dir / "metrics.json").exists()
        assert len(list((tmp_path / "home" / "experiments" / "rct-rc").glob("*/*/metrics.json"))) == 4
        # Every step of a gpu-pool asset: [start, end] intervals never overlap.
        gpu_steps = ("activation_vectors", "adapter", "generations")
        spans = {}
        kinds = {DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}
        for run in instance.get_runs():
            for e in instance.all_logs(run.run_id, of_type=kinds):
                if any(s in (e.step_key or "") for s in gpu_steps):
                    spans.setdefault((e.run_id, e.step_key), {})[e.dagster_event.event_type] = e.timestamp
        intervals = sorted((v[DagsterEventType.STEP_START], v.get(DagsterEventType.STEP_SUCCESS)
                            or v[DagsterEventType.STEP_FAILURE]) for v in spans.values())
        assert len(intervals) >= 2 + 2 + 4 + 4 + 2  # vectors, adapters, generations (incl. base)
        for (s1, e1), (s2, _) in zip(intervals, intervals[1:]):
            assert s2 >= e1, "two gpu-pool steps ran at once"
        # Runs wait for the pool in the queue, not inside a started run (where Dagster busy-polls).
        blocked = [e for run in instance.get_runs() for e in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
                   if "blocked by limit for pool" in (e.user_message or "")]
        assert not blocked, blocked[0].user_message
