"""Read a score out of a judge's reply text. Anything doubtful is unparsed, with the reason.

An unparsed reply is never counted as 0: it would drag `{trait}_avg` toward "no trait" exactly
when the judge misbehaves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parsed:
    score: int | None
    rationale: str = ""
    error: str | None = None


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first `{...}` in `text` that decodes as a JSON object (code fences and chatter around it are fine)."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def _lookup(obj: dict[str, Any], key: str) -> tuple[bool, Any]:
    if key in obj:
        return True, obj[key]
    wanted = key.strip().lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.strip().lower() == wanted:
            return True, v
    return False, None


def _as_int(value: Any) -> int | None:
    """Integers, integral floats (2.0) and digit strings ("2"); not bools, not 2.5."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def parse_judgement(text: str | None, trait: str, max_score: int) -> Parsed:
    """Score under key `trait` (case-insensitive) in the first JSON object, in 0..max_score."""
    if not text or not text.strip():
        return Parsed(None, error="empty judge reply")
    obj = first_json_object(text)
    if obj is None:
        return Parsed(None, error="no JSON object in the judge reply")
    rationale = obj.get("rationale")
    rationale = rationale.strip() if isinstance(rationale, str) else ""
    found, value = _lookup(obj, trait)
    if not found:
        return Parsed(None, rationale, f"judge reply has no key {trait!r} (keys: {sorted(map(str, obj))})")
    score = _as_int(value)
    if score is None:
        return Parsed(None, rationale, f"score {value!r} is not an integer")
    if not 0 <= score <= max_score:
        return Parsed(None, rationale, f"score {score} is outside 0..{max_score}")
    return Parsed(score, rationale)
