"""On-disk cache of judge responses, so a crashed or killed run resumes without paying twice.

SQLite in WAL mode, one committed row per response: a row is on disk once `put` returns, and a
SIGKILL loses at most the responses still in flight. The raw response text is stored, not the
score, so a fix to parsing applies to cached responses too. Rows hold the judge model, rubric,
text and token counts only; the API key, base URL and request headers are never written.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..data import Message
from ..store import dattr_home

_SCHEMA = """CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, rubric TEXT NOT NULL, content TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, created REAL NOT NULL)"""


def default_cache_path(root: str | Path | None = None) -> Path:
    """One cache per storage root: keys are content hashes, so experiments share it safely."""
    return dattr_home(root) / "cache" / "judge.sqlite"


def cache_key(model: str, rubric: str, messages: list[Message], reply: str) -> str:
    """sha256 of (judge model, rubric, the full judge prompt, the reply)."""
    blob = json.dumps([model, rubric, messages, reply], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedResponse:
    content: str
    prompt_tokens: int
    completion_tokens: int


class JudgeCache:
    """`with JudgeCache(path) as cache: cache.get(key) / cache.put(...)`; safe across processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise ValueError(f"{self.path}: not a usable judge cache ({e}); move it away to start a new one") from None

    def get(self, key: str) -> CachedResponse | None:
        row = self._db.execute(
            "SELECT content, prompt_tokens, completion_tokens FROM judgements WHERE key = ?", (key,)).fetchone()
        return CachedResponse(*row) if row else None

    def put(self, key: str, model: str, rubric: str, response: CachedResponse) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, model, rubric, response.content, response.prompt_tokens, response.completion_tokens, time.time()))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
