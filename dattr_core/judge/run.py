"""Judge a batch of replies: validate, serve from the cache, send the rest with bounded concurrency.

Identical judge prompts (same model, rubric, prompt and reply) are sent once and share the
answer. Each response is committed to the cache the moment it arrives, so an interrupted run
(error, Ctrl-C, SIGKILL) resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from ..data import Message, Trait
from .cache import CachedResponse, JudgeCache, cache_key, default_cache_path
from .client import ChatJudge, JudgeConfig, RequestRejected
from .offline import JUDGE_NAME as OFFLINE_JUDGE
from .offline import offline_judge
from .parse import parse_judgement
from .records import JudgeAPIError, JudgeConfigError, JudgeError, JudgeItem, JudgeResult, JudgeRun, Usage
from .rubrics import MAX_SCORE, check_item, check_trait, judge_messages

log = logging.getLogger(__name__)


def _require_judge(trait: Trait, config: JudgeConfig) -> None:
    if config.offline and trait.rubric != "ground_truth_0_2":
        raise JudgeConfigError(
            f"trait {trait.trait!r} uses rubric {trait.rubric!r}, which needs an LLM judge; the offline "
            f"judge ({OFFLINE_JUDGE}) only grades rubric 'ground_truth_0_2'")
    if not config.offline and not config.configured:
        hint = " or use the offline judge (--offline)" if trait.rubric == "ground_truth_0_2" else ""
        raise JudgeConfigError(
            f"no LLM judge configured for trait {trait.trait!r} (rubric {trait.rubric!r}): set "
            f"OPENAI_API_KEY or DATTR_JUDGE_API_KEY, and DATTR_JUDGE_BASE_URL for a local "
            f"OpenAI-compatible server, in the environment or .env{hint}")


async def _send_all(prompts: dict[str, list[Message]], judge: ChatJudge, store: Callable[[str, CachedResponse], None],
                    rejected: dict[str, str], concurrency: int) -> tuple[str, JudgeError] | None:
    """`concurrency` workers drain the prompts. The first unrecoverable error stops new work (requests
    in flight still finish and are stored) and is returned with the key it happened on."""
    todo = iter(list(prompts))
    failures: list[tuple[str, JudgeError]] = []
    done, step = 0, max(1, len(prompts) // 10)

    async def worker() -> None:
        nonlocal done
        while not failures:
            key = next(todo, None)
            if key is None:
                return
            try:
                response = await judge.complete(prompts[key])
            except RequestRejected as e:
                rejected[key] = str(e)
                continue
            except (JudgeAPIError, JudgeConfigError) as e:
                failures.append((key, e))
                judge.stopping = True
                return
            store(key, response)
            done += 1
            if done % step == 0:
                log.info("judge: %d/%d new judgements", done, len(prompts))

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(prompts)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return failures[0] if failures else None


async def judge_replies_async(items: list[JudgeItem], trait: Trait, config: JudgeConfig,
                              cache_path: str | Path | None = None) -> JudgeRun:
    """Judge every item under `trait`'s rubric; results come back in item order."""
    check_trait(trait)
    for item in items:
        check_item(item, trait.rubric)
    _require_judge(trait, config)
    if config.offline:
        return JudgeRun([offline_judge(item) for item in items])

    messages = [judge_messages(trait, item) for item in items]
    keys = [cache_key(config.model, trait.rubric, m, item.reply) for m, item in zip(messages, items, strict=True)]
    usage = Usage()
    responses: dict[str, CachedResponse] = {}
    rejected: dict[str, str] = {}
    cache_path = Path(cache_path) if cache_path is not None else default_cache_path()
    with JudgeCache(cache_path) as cache:
        for key in set(keys):
            hit = cache.get(key)
            if hit is not None:
                responses[key] = hit
        cached = set(responses)
        usage.cached = sum(k in cached for k in keys)
        prompts = {k: m for k, m in zip(keys, messages, strict=True) if k not in responses}

        def store(key: str, response: CachedResponse) -> None:
            cache.put(key, config.model, trait.rubric, response)
            responses[key] = response

        judge = ChatJudge(config, usage)
        try:
            failure = await _send_all(prompts, judge, store, rejected, config.concurrency)
        finally:
            await judge.close()
    if failure is not None:
        key, error = failure
        if isinstance(error, JudgeConfigError):
            raise error
        done = sum(k in responses for k in keys)
        where = items[keys.index(key)].where
        raise JudgeAPIError(
            f"judge API at {config.describe()['base_host'] or 'the OpenAI default'} kept failing for {where} "
            f"({error}); {done} of {len(items)} replies are judged and saved in the cache {cache_path}: "
            "run again to continue from there")
    log.info("judge: %d replies, %d from cache, %d API calls (%d retries), %d tokens",
             len(items), usage.cached, usage.api_calls, usage.retries, usage.total_tokens)
    return JudgeRun([_result(item, key, responses, rejected, trait, config.model, key in cached)
                     for item, key in zip(items, keys, strict=True)], usage)


def _result(item: JudgeItem, key: str, responses: dict[str, CachedResponse], rejected: dict[str, str],
            trait: Trait, model: str, cached: bool) -> JudgeResult:
    if key in rejected:
        return JudgeResult(item.id, item.sample, None, "", model, error=rejected[key])
    content = responses[key].content
    p = parse_judgement(content, trait.trait, MAX_SCORE[trait.rubric])
    return JudgeResult(item.id, item.sample, p.score, p.rationale, model, cached, p.error, content)


def judge_replies(items: list[JudgeItem], trait: Trait, config: JudgeConfig,
                  cache_path: str | Path | None = None) -> JudgeRun:
    """Synchronous entry point (CLI, Dagster assets): runs `judge_replies_async` in a new event loop."""
    return asyncio.run(judge_replies_async(items, trait, config, cache_path))
