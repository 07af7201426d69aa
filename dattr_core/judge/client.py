"""The LLM judge over the official `openai` async client: configuration, one call with retries.

Our own retry loop (the client's is switched off) so every attempt is counted: exponential
backoff with jitter on 429, 5xx, timeouts and dropped connections; `Retry-After` is honoured up
to the backoff cap. Error texts are built from status codes and redacted, so the API key can
not leak through an exception, a log line or the cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from dotenv import dotenv_values

from ..data import Message
from .cache import CachedResponse
from .records import JudgeAPIError, JudgeConfigError, Usage

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4.1-mini"
RETRYABLE_STATUS = frozenset({408, 409, 429})
KEYLESS = "EMPTY"  # what local OpenAI-compatible servers (vLLM, llama.cpp) accept without auth


@dataclass(frozen=True)
class JudgeConfig:
    """Who judges and how hard we push them. `api_key` is kept out of repr and `describe()`."""

    model: str = DEFAULT_MODEL
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    offline: bool = False

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"judge concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("judge max_retries must be >= 0, timeout_s > 0 and backoff_s >= 0")

    @classmethod
    def from_env(cls, env_file: str | Path | None = ".env", **overrides: Any) -> JudgeConfig:
        """Read `DATTR_JUDGE_BASE_URL`, `DATTR_JUDGE_MODEL`, `DATTR_JUDGE_API_KEY` / `OPENAI_API_KEY`
        from the environment, then from `env_file` (relative to the working directory).
        The environment wins; `os.environ` itself is left untouched."""
        env: dict[str, str | None] = {}
        if env_file is not None and Path(env_file).is_file():
            env.update(dotenv_values(env_file))
        env.update(os.environ)
        values: dict[str, Any] = {
            "model": env.get("DATTR_JUDGE_MODEL") or DEFAULT_MODEL,
            "base_url": env.get("DATTR_JUDGE_BASE_URL") or None,
            "api_key": env.get("DATTR_JUDGE_API_KEY") or env.get("OPENAI_API_KEY") or None,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def configured(self) -> bool:
        """An API key (OpenAI) or a base URL (a local server) is set."""
        return bool(self.api_key or self.base_url)

    def describe(self) -> dict[str, Any]:
        """Settings safe to store as metadata (no key, and the base URL only as a host)."""
        host = None
        if self.base_url:
            host = self.base_url.split("://", 1)[-1].split("@")[-1].split("/")[0]
        return {"model": self.model, "base_host": host, "concurrency": self.concurrency,
                "timeout_s": self.timeout_s, "max_retries": self.max_retries, "offline": self.offline}


class RequestRejected(Exception):
    """The API refused this one request (e.g. 400): the item is reported unjudged, the run goes on."""


class ChatJudge:
    """Sends judge prompts; one instance per run, shared by all workers."""

    def __init__(self, config: JudgeConfig, usage: Usage):
        self.config, self.usage = config, usage
        self.stopping = False  # set when another request failed for good: finish, but retry no more
        self._client = openai.AsyncOpenAI(
            api_key=config.api_key or KEYLESS, base_url=config.base_url, max_retries=0, timeout=config.timeout_s)

    def redact(self, text: str) -> str:
        key = self.config.api_key
        return text.replace(key, "[redacted]") if key else text

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** attempt)
        delay = cap / 2 + random.uniform(0, cap / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.config.backoff_max_s))
        return delay

    def _refusal(self, e: openai.APIStatusError) -> Exception:
        code = e.status_code
        if code in (401, 403):
            return JudgeConfigError(
                f"judge API refused the credentials (HTTP {code}); check DATTR_JUDGE_API_KEY / OPENAI_API_KEY")
        if code == 404:
            return JudgeConfigError(
                f"judge API answered HTTP 404 for model {self.config.model!r}; check DATTR_JUDGE_MODEL "
                "and DATTR_JUDGE_BASE_URL")
        body = e.body.get("message") if isinstance(e.body, dict) else None
        return RequestRejected(self.redact(f"judge API rejected the request: HTTP {code}" +
                                           (f" ({str(body)[:200]})" if body else "")))

    async def complete(self, messages: list[Message]) -> CachedResponse:
        """One judge response; raises JudgeAPIError when the retries are spent."""
        attempts = self.config.max_retries + 1
        attempt = 0
        while True:
            self.usage.api_calls += 1
            retry_after = None
            try:
                r = await self._client.chat.completions.create(
                    model=self.config.model, messages=messages, temperature=0, seed=0)  # type: ignore[arg-type]
            except openai.APIStatusError as e:
                if e.status_code not in RETRYABLE_STATUS and e.status_code < 500:
                    raise self._refusal(e) from None
                reason = f"HTTP {e.status_code}"
                try:
                    retry_after = float(e.response.headers.get("retry-after", ""))
                except ValueError:
                    pass
            except openai.APITimeoutError:
                reason = f"no response within {self.config.timeout_s:g}s"
            except openai.APIConnectionError:
                reason = "connection failed"
            else:
                content = (r.choices[0].message.content or "") if r.choices else ""
                response = CachedResponse(content, r.usage.prompt_tokens if r.usage else 0,
                                          r.usage.completion_tokens if r.usage else 0)
                self.usage.prompt_tokens += response.prompt_tokens
                self.usage.completion_tokens += response.completion_tokens
                return response
            if attempt + 1 == attempts or self.stopping:
                raise JudgeAPIError(f"{reason} on attempt {attempt + 1} of {attempts}")
            delay = self._delay(attempt, retry_after)
            self.usage.retries += 1
            log.debug("judge request failed (%s); retry %d of %d in %.2fs", reason, attempt + 1,
                      self.config.max_retries, delay)
            await asyncio.sleep(delay)
            attempt += 1

    async def close(self) -> None:
        await self._client.close()
