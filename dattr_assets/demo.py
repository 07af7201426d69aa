"""The main job: materialise the whole graph for the datasets on disk through the real instance
in `DAGSTER_HOME`, as an asset backfill (so every run shows in the UI), then print the leaderboard.

    python -m dattr_assets.demo [--port 3070] [--timeout 7200]

It starts `dagster dev` (webserver + daemon) on 127.0.0.1, launches the backfill through the
webserver's GraphQL API, waits for it, and stops the server by its PID. The tests use the same
functions to drive a backfill through the real daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from dagster import DagsterInstance
from dagster._core.execution.backfill import BulkActionStatus

from dattr_core import leaderboard
from dattr_core.data import dataset_name
from dattr_core.store import datasets_dir

from .defs.partitions import eval_partitions, train_partitions

POOL_LIMITS = {"gpu": 1, "judge": 4}
LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
    ... on PartitionSetNotFoundError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey invalidOutputName }
    ... on InvalidSubsetError { message }
  }
}"""
ASSET_KEYS = "query { assetNodes { assetKey { path } isPartitioned } }"


def set_pool_limits(instance: DagsterInstance, limits: dict[str, int] = POOL_LIMITS) -> None:
    """`gpu`: one model step at a time per GPU; `judge`: a few judge steps at once."""
    for pool, limit in limits.items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)


def add_dataset_partitions(instance: DagsterInstance, root: str | Path | None = None) -> dict[str, list[str]]:
    """A partition per dataset file on disk (what the sensor does on its first tick)."""
    added = {}
    for kind, parts in (("train", train_partitions), ("eval", eval_partitions)):
        folder = datasets_dir(kind, root)
        names = sorted({dataset_name(p) for p in folder.glob("*") if p.suffix in (".parquet", ".jsonl")}) \
            if folder.is_dir() else []
        instance.add_dynamic_partitions(parts.name, names)
        added[kind] = names
    return added


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restore_signals() -> None:
    """Background processes here start with SIGINT/SIGTERM ignored: give the server the defaults."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.setpgrp()


@contextmanager
def dagster_dev(port: int, log_path: Path, workspace: str = "workspace.yaml", timeout_s: float = 180):
    """`dagster dev` on 127.0.0.1:port; yields the GraphQL URL; stops the process group by PID."""
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(port),
                             "-w", workspace], stdout=log, stderr=subprocess.STDOUT, preexec_fn=_restore_signals)
    url = f"http://127.0.0.1:{port}/graphql"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {proc.returncode}; see {log_path}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"dagster dev did not answer on port {port} in {timeout_s}s; see {log_path}")
                time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        body = json.loads(r.read())
    if body.get("errors"):
        raise RuntimeError(f"GraphQL error: {body['errors']}")
    return body["data"]


def launch_backfill(url: str, title: str = "dattr demo") -> str:
    """An asset backfill of every partitioned asset over all its partitions (leaderboard after)."""
    nodes = graphql(url, ASSET_KEYS)["assetNodes"]
    keys = [{"path": n["assetKey"]["path"]} for n in nodes if n["isPartitioned"]]
    res = graphql(url, LAUNCH_BACKFILL, {"params": {"assetSelection": keys, "allPartitions": True, "title": title}})
    out = res["launchPartitionBackfill"]
    if out["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"backfill not launched: {out}")
    return out["backfillId"]


def wait_backfill(instance: DagsterInstance, backfill_id: str, timeout_s: float, poll_s: float = 5) -> str:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        backfill = instance.get_backfill(backfill_id)
        runs = instance.get_run_records(filters=None, limit=1000)
        done = sum(1 for r in runs if r.dagster_run.tags.get("dagster/backfill") == backfill_id
                   and r.dagster_run.is_finished)
        state = (backfill.status.value, done)
        if state != last:
            print(f"backfill {backfill_id}: {backfill.status.value}, {done} runs finished", flush=True)
            last = state
        if backfill.status in (BulkActionStatus.COMPLETED_SUCCESS, BulkActionStatus.COMPLETED_FAILED,
                               BulkActionStatus.COMPLETED, BulkActionStatus.FAILED, BulkActionStatus.CANCELED):
            return backfill.status.value
        time.sleep(poll_s)
    raise TimeoutError(f"backfill {backfill_id} not finished after {timeout_s}s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0, help="webserver port (default: a free one)")
    p.add_argument("--timeout", type=float, default=4 * 3600)
    args = p.parse_args()
    instance = DagsterInstance.get()
    set_pool_limits(instance)
    added = add_dataset_partitions(instance)
    print(f"partitions: train {added['train']}, eval {added['eval']}")
    if not added["train"] or not added["eval"]:
        print("no datasets under datasets/{train,eval}: run `dattr demo-data` first", file=sys.stderr)
        return 2
    home = Path(os.environ["DAGSTER_HOME"])
    with dagster_dev(args.port or free_port(), home / "demo-dagster-dev.log") as url:
        backfill_id = launch_backfill(url)
        status = wait_backfill(instance, backfill_id, args.timeout)
        from dagster import AssetKey, materialize

        from .definitions import defs

        materialize(list(defs.assets), selection=[AssetKey("leaderboard")], instance=instance,
                    resources=defs.resources)
    rows = leaderboard.collect()
    print(f"\nbackfill {backfill_id}: {status}\n")
    print(leaderboard.report(rows))
    print("\nOpen the UI with `make ui` (dagster dev on http://127.0.0.1:3000): assets, lineage, runs, metadata.")
    return 0 if status in ("COMPLETED_SUCCESS", "COMPLETED") else 1


if __name__ == "__main__":
    sys.exit(main())
