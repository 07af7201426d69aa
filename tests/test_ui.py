"""Headless Chromium opens the Dagster UI of a materialised instance: the asset graph and the
leaderboard's metadata are on the page. `DATTR_UPDATE_DOCS=1` also saves the screenshots to docs/."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from dagster import DagsterInstance

from dagster_fixtures import materialize_pair, write_project
from dattr_assets.definitions import build_definitions
from dattr_assets.defs.resources import DattrResource
from dattr_assets.demo import dagster_dev, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


def chromium(url: str, profile: Path, *extra: str) -> str:
    """Load `url`, let the single-page app render for a while, return the DOM (or take a screenshot)."""
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                          "--window-size=1600,1000", *extra, url], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (make setup installs it as root)")
def test_ui_shows_asset_graph_and_leaderboard(tmp_path, model_dir, monkeypatch):
    cfg = write_project(tmp_path, model_dir)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    for var, value in (("DAGSTER_HOME", dagster_home), ("DATTR_HOME", tmp_path / "home"), ("DATTR_CONFIG", cfg)):
        monkeypatch.setenv(var, str(value))
    defs = build_definitions(str(cfg))
    with DagsterInstance.get() as instance:
        materialize_pair(defs, instance, {"dattr": DattrResource(config_path=str(cfg), home=str(tmp_path / "home"))})
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text("load_from:\n  - python_module: dattr_assets.definitions\n")
    port = free_port()
    with dagster_dev(port, tmp_path / "dev.log", workspace=str(workspace)):
        base = f"http://127.0.0.1:{port}"
        graph = chromium(f"{base}/asset-groups", tmp_path / "p1", "--dump-dom")
        lineage = chromium(f"{base}/assets/rct-rc/scores?view=lineage", tmp_path / "p5", "--dump-dom")
        board = chromium(f"{base}/assets/leaderboard", tmp_path / "p2", "--dump-dom")
        shots = {name: tmp_path / f"{name}.png" for name in ("ui-asset-graph", "ui-leaderboard")}
        chromium(f"{base}/asset-groups", tmp_path / "p3", f"--screenshot={shots['ui-asset-graph']}")
        chromium(f"{base}/assets/leaderboard", tmp_path / "p4", f"--screenshot={shots['ui-leaderboard']}")
    for group in ("Global asset lineage", "datasets", "vectors", "rct_rc", "random", "base", "leaderboard"):
        assert group in graph, f"asset graph misses {group}"
    for node in ("scores", "selection", "rct", "rc", "train", "eval"):
        assert node in lineage, f"lineage of rct-rc/scores misses {node}"
    for text in ("leaderboard", "rct-rc", "random", "gap_drop", "trait_avg"):
        assert text in board, f"leaderboard page misses {text}"
    for shot in shots.values():
        assert shot.stat().st_size > 10_000
        if os.environ.get("DATTR_UPDATE_DOCS"):
            shutil.copy(shot, DOCS / shot.name)
