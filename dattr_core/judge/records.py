"""What goes into the judge and what comes out: items, per-item results, a run, and its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data import Message


class JudgeError(Exception):
    """The judge could not finish. Never carries the API key (messages are built, not forwarded)."""


class JudgeConfigError(JudgeError):
    """No usable judge: nothing configured, the API refused our credentials, or a rubric needs an LLM."""


class JudgeInputError(JudgeError, ValueError):
    """An item lacks what its rubric needs (e.g. `meta.ground_truth`); names the item and field."""


class JudgeAPIError(JudgeError):
    """Retries ran out. Everything judged before stays in the cache, so a re-run continues."""


@dataclass(frozen=True)
class JudgeItem:
    """One generated reply to judge: sample `sample` for eval example `id`."""

    id: str
    prompt_messages: list[Message]
    reply: str
    sample: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"item id={self.id!r} sample={self.sample}"


@dataclass(frozen=True)
class JudgeResult:
    """A score, or `score=None` with `error` saying why (never a silent 0)."""

    id: str
    sample: int
    score: int | None
    rationale: str
    judge: str
    cached: bool = False
    error: str | None = None
    raw: str = ""

    @property
    def parsed(self) -> bool:
        return self.score is not None


@dataclass
class Usage:
    """API traffic of one run; cached items cost nothing and are counted apart."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    api_calls: int = 0
    retries: int = 0
    cached: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class JudgeRun:
    """Results in the order of the items given, plus the usage."""

    results: list[JudgeResult]
    usage: Usage = field(default_factory=Usage)
