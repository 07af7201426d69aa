"""A small OpenAI-compatible chat-completions server for tests, on 127.0.0.1 in a background thread.

Tests talk to it through the real `openai` client over real HTTP. What it answers is scripted per
request (`Behaviour`: status, content, delay), so tests can provoke 429s, 500s, timeouts and bad
JSON, and it records every call and the highest number of requests in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Behaviour:
    """How to answer one request: an HTTP status, the content (the assistant message for 200, else
    the error message), after a delay."""

    status: int = 200
    content: str | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def good(trait: str, score: int, rationale: str = "scripted") -> Behaviour:
    return Behaviour(content=json.dumps({trait: score, "rationale": rationale}))


def text(content: str) -> Behaviour:
    return Behaviour(content=content)


def status(code: int, retry_after: float | None = None, message: str | None = None) -> Behaviour:
    return Behaviour(status=code, content=message,
                     headers={"retry-after": str(retry_after)} if retry_after is not None else {})


def delayed(seconds: float, then: Behaviour) -> Behaviour:
    return Behaviour(then.status, then.content, seconds, then.headers)


@dataclass
class Call:
    """One request as the server saw it."""

    marker: str | None
    attempt: int          # 0 for the first request carrying this marker, 1 for the next, ...
    status: int
    authorization: str
    body: dict[str, Any]
    completed: bool = False   # the handler ran to the end (not cancelled by a client disconnect)


Script = Callable[[str | None, int, dict[str, Any]], Behaviour]


def by_marker(plan: dict[str, list[Behaviour]], default: Behaviour) -> Script:
    """Answer requests for `marker` with plan[marker][attempt]; the last step repeats."""

    def script(marker: str | None, attempt: int, body: dict[str, Any]) -> Behaviour:
        steps = plan.get(marker or "")
        if not steps:
            return default
        return steps[min(attempt, len(steps) - 1)]

    return script


MARKER = re.compile(r"\[\[([^\[\]]+)\]\]")


def marked(name: str) -> str:
    """Text that tags a judged reply, so the server knows which reply a request is about."""
    return f"[[{name}]]"


class OpenAIServer:
    """`with OpenAIServer(script, latency=...) as srv: ... srv.base_url ...`

    Tests tag each judged reply with `marked(name)`; the server reads the first tag in the last
    user message, passes it to the script, and tracks attempts per tag.
    """

    PROMPT_TOKENS, COMPLETION_TOKENS = 11, 7

    def __init__(self, script: Script, latency: float = 0.0):
        self.script, self.latency = script, latency
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._attempts: dict[str | None, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def calls_for(self, marker: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.marker == marker]

    def completed_ok(self) -> list[str | None]:
        """Markers of requests that the server answered with a 200 and was not cut off."""
        with self._lock:
            return [c.marker for c in self.calls if c.status == 200 and c.completed]

    @staticmethod
    def _marker(body: dict[str, Any]) -> str | None:
        users = [m for m in body.get("messages", []) if m.get("role") == "user"]
        found = MARKER.search(str(users[-1].get("content", ""))) if users else None
        return found.group(1) if found else None

    async def _handle(self, request: web.Request) -> web.Response:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.json()
            marker = self._marker(body)
            with self._lock:
                attempt = self._attempts[marker]
                self._attempts[marker] += 1
            b = self.script(marker, attempt, body)
            call = Call(marker, attempt, b.status, request.headers.get("Authorization", ""), body)
            with self._lock:
                self.calls.append(call)
            await asyncio.sleep(self.latency + b.delay)
            call.completed = True
        finally:
            with self._lock:
                self.in_flight -= 1
        if b.status != 200:
            err = {"error": {"message": b.content or f"scripted status {b.status}", "type": "test", "code": None}}
            return web.json_response(err, status=b.status, headers=b.headers)
        return web.json_response({
            "id": f"chatcmpl-{len(self.calls)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "test"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": b.content}}],
            "usage": {"prompt_tokens": self.PROMPT_TOKENS, "completion_tokens": self.COMPLETION_TOKENS,
                      "total_tokens": self.PROMPT_TOKENS + self.COMPLETION_TOKENS},
        }, headers=b.headers)

    def start(self) -> OpenAIServer:
        ready = threading.Event()

        async def serve() -> None:
            self._stop = asyncio.Event()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._handle)
            # Cancel a handler when its client hangs up (a client-side timeout), so `in_flight`
            # counts what the client really has open.
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.port = runner.addresses[0][1]
            ready.set()
            await self._stop.wait()
            await runner.cleanup()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="openai-test-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("test OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            self._loop = self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
