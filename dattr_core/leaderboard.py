"""The leaderboard: every (experiment, train, eval) metrics.json in one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .store import atomic_path, dattr_home

# gt_wrong: share of replies committing to a wrong answer per `meta.ground_truth` (judge-free).
COLUMNS = ("experiment", "train", "eval", "trait", "trait_avg", "n_judged", "n_unparsed", "judge", "gt_wrong",
           "gap_base", "gap_tuned", "gap_drop")


def collect(root: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per complete metrics.json under `experiments/`, sorted for stable output."""
    rows = []
    for path in sorted((dattr_home(root) / "experiments").glob("*/*/*/metrics.json")):
        exp, train, eval_ = path.parts[-4:-1]
        m = json.loads(path.read_text(encoding="utf-8"))
        judge = m.get("judge") or {}
        gap = m["preference_gap"]
        check = m.get("ground_truth_check") or {}
        rows.append({
            "experiment": exp, "train": train, "eval": eval_, "trait": m["trait"],
            "trait_avg": judge.get(f"{m['trait']}_avg"), "n_judged": judge.get("n_judged", 0),
            "n_unparsed": judge.get("n_unparsed", 0), "judge": ",".join(judge.get("judges", [])) or "none",
            "gt_wrong": check.get("wrong_rate"),
            "gap_base": gap["base"]["gap"], "gap_tuned": gap["tuned"]["gap"], "gap_drop": gap["drop"],
        })
    return rows


def fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def bar_chart(rows: list[dict[str, Any]], value: str = "trait_avg", width: int = 30) -> str:
    """A text bar chart of one metric per (eval, experiment): readable in a terminal and the UI."""
    vals = [r[value] for r in rows if isinstance(r[value], (int, float))]
    if not vals:
        return f"(no {value} values yet)"
    top = max(abs(v) for v in vals) or 1.0
    lines = [f"{value} by eval / experiment"]
    for r in sorted(rows, key=lambda r: (r["eval"], r["experiment"])):
        v = r[value]
        bar = "█" * round(width * abs(v) / top) if isinstance(v, (int, float)) else ""
        lines.append(f"{r['eval'][:14]:>14} {r['experiment'][:12]:<12} {fmt(v):>7} {bar}")
    return "\n".join(lines)


CHARTS = ("trait_avg", "gt_wrong", "gap_drop")


def report(rows: list[dict[str, Any]]) -> str:
    """The table and one bar chart per headline metric: what the CLI, the demo and the asset show."""
    return to_markdown(rows) + "\n```\n" + "\n\n".join(bar_chart(rows, v) for v in CHARTS) + "\n```\n"


def write(rows: list[dict[str, Any]], root: str | Path | None = None) -> Path:
    out = dattr_home(root) / "leaderboard.parquet"
    table = pa.table({c: [r[c] for r in rows] for c in COLUMNS}) if rows else pa.table({c: [] for c in COLUMNS})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(report(rows), encoding="utf-8")
    return out
