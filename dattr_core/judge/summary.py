"""Per-run judge metrics (design §5): `{trait}_avg`, the share of each score, judged vs unparsed.

Averages and shares are over parsed scores only; unparsed replies are counted, never scored.
"""

from __future__ import annotations

from typing import Any

from ..data import Trait
from .records import JudgeResult
from .rubrics import MAX_SCORE


def summarize(results: list[JudgeResult], trait: Trait) -> dict[str, Any]:
    scores = [r.score for r in results if r.score is not None]
    n = len(scores)
    summary: dict[str, Any] = {
        "trait": trait.trait,
        "rubric": trait.rubric,
        f"{trait.trait}_avg": sum(scores) / n if n else None,
    }
    for s in range(MAX_SCORE[trait.rubric] + 1):
        summary[f"share_{s}"] = scores.count(s) / n if n else None
    summary.update(n_judged=n, n_unparsed=len(results) - n, judges=sorted({r.judge for r in results}))
    return summary
