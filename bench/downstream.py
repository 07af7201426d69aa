"""Does training on the selection teach the trait? The leaderboard's downstream numbers with
bootstrap intervals over the held-out prompts.

    python bench/downstream.py [--root dattr_data] [--boot 2000] [--out docs/benchmarks.md]

Reads what `make demo` (or `dattr evaluate`) left under `experiments/`: for each (experiment,
train, eval) and `base`, the judge's `{trait}_avg` (judge.parquet), the judge-free ground-truth
check `gt_wrong` (share of replies committing to a wrong answer, graded again here from
generations.parquet), and the preference gap (metrics.json). Intervals resample held-out prompts
with replacement, the same draws for every row of one eval set; they cover prompt sampling only,
not the variance between fine-tuning seeds (each adapter is one run, seed 42).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dattr_core.data import load_dataset
from dattr_core.judge.inputs import read_generation_items
from dattr_core.judge.offline import grade
from dattr_core.store import dattr_home, dataset_file

from report import write_section


def per_prompt(values: dict[str, list[float]], ids: list[str]) -> np.ndarray:
    """(prompts, samples) → one mean per prompt, in `ids` order."""
    return np.array([np.mean(values[i]) for i in ids])


def mean_ci(x: np.ndarray, draws: np.ndarray) -> str:
    boot = x[draws].mean(axis=1)
    return f"{x.mean():.3f} [{np.percentile(boot, 2.5):.3f}, {np.percentile(boot, 97.5):.3f}]"


@functools.cache
def planted_ids(root: Path, train_name: str) -> dict[str, str | None]:
    """Each train row's `meta.planted` (one read per train set, not per experiment)."""
    train = load_dataset(dataset_file("train", train_name, root), "train")
    return {e.id: e.meta.get("planted") for e in train.examples}


def planted_in_selection(root: Path, run: Path, trait: str) -> str:
    """How many of the selected train rows carry the behaviour's plant (`meta.planted`), of k."""
    if not (run / "selection.parquet").exists():
        return "—"
    chosen = set(pq.read_table(run / "selection.parquet").column("id").to_pylist())
    planted = planted_ids(root, run.parts[-2])
    return f"{sum(planted[i] == trait for i in chosen)} / {len(chosen)}"


def rows_for_eval(root: Path, eval_name: str, boot: int) -> list[str]:
    eval_ds = load_dataset(dataset_file("eval", eval_name, root), "eval")
    runs = sorted(p.parent for p in (root / "experiments").glob(f"*/*/{eval_name}/metrics.json"))
    stats = {}
    ids: list[str] = []
    for run in runs:
        items = read_generation_items(run / "generations.parquet", eval_ds)
        ids = ids or sorted({it.id for it in items})
        wrong: dict[str, list[float]] = {}
        for it in items:
            wrong.setdefault(it.id, []).append(float(grade(it.reply, it.meta)[0] == 2))
        judged = None
        if (run / "judge.parquet").exists():
            scores: dict[str, list[float]] = {}
            for r in pq.read_table(run / "judge.parquet").to_pylist():
                if r["parsed"]:
                    scores.setdefault(r["id"], []).append(float(r["score"]))
            judged = per_prompt(scores, ids) if set(scores) == set(ids) else None
        gap = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["preference_gap"]
        stats[run.parts[-3]] = (judged, per_prompt(wrong, ids), gap, planted_in_selection(root, run, eval_ds.trait.trait))
    # One set of resampled prompts for the whole eval set, so rows (and differences) are paired.
    draws = np.random.default_rng(0).integers(0, len(ids), (boot, len(ids)))
    ref = stats.get("random")
    out = []
    for exp, (judged, wrong, gap, planted) in stats.items():
        cells = [mean_ci(judged, draws) if judged is not None else "—", mean_ci(wrong, draws)]
        if ref is not None and exp != "random":
            cells.append(mean_ci(judged - ref[0], draws) if judged is not None and ref[0] is not None else "—")
            cells.append(mean_ci(wrong - ref[1], draws))
        else:
            cells += ["", ""]
        out.append(f"| {eval_name} | {exp} | {planted} | " + " | ".join(cells)
                   + f" | {gap['base']['gap']:.3f} | {gap['tuned']['gap']:.3f} | {gap['drop']:+.3f} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="DATTR_HOME (default: $DATTR_HOME or ./dattr_data)")
    p.add_argument("--evals", nargs="+", default=["hallucination", "sycophancy"])
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--out", default=None, help="write the table into this markdown file (between markers)")
    p.add_argument("--section", default="main", help="marker name in --out, so tables of several builds coexist")
    args = p.parse_args()
    root = dattr_home(args.root)
    rows = [r for e in args.evals for r in rows_for_eval(root, e, args.boot)]
    head = ("| behaviour | experiment | planted rows selected | judge `{trait}_avg` (offline, 0–2) [95% CI] | gt_wrong [95% CI] | "
            "Δ judge vs random | Δ gt_wrong vs random | gap base | gap tuned | gap drop |\n" + "|---" * 10 + "|\n")
    cmd = "python bench/downstream.py " + " ".join(sys.argv[1:])
    body = f"`{cmd}`\n\n" + head + "\n".join(rows)
    print(body)
    if args.out:
        write_section(args.out, f"downstream:{args.section}", body)


if __name__ == "__main__":
    main()
