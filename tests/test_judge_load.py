"""The judge under load and under SIGKILL, against the local OpenAI-compatible test server."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from dattr_core.data import Example, Trait, write_examples
from dattr_core.judge import JudgeConfig, JudgeItem, judge_replies

from conftest import restore_default_signals
from openai_server import Behaviour, OpenAIServer, delayed, good, marked, status, text

REPO = Path(__file__).resolve().parents[1]


TRAIT = Trait("hallucination", "trait_0_3", "States made-up facts as if they were true.")
# `dattr judge` exactly as the CLI registers it, without importing the other (torch-heavy) commands
JUDGE_COMMAND = """
import argparse, sys
from dattr_core.commands import evaluate
parser = argparse.ArgumentParser()
evaluate.register(parser.add_subparsers(required=True))
args = parser.parse_args()
sys.exit(args.func(args))
"""


def test_load_1000_requests_with_20_percent_faults(tmp_path: Path) -> None:
    n, limit, latency, timeout, max_retries, seed = 1000, 20, 0.3, 0.7, 8, 1234
    names = [f"L{i:04d}" for i in range(n)]
    malformed = set(random.Random(seed).sample(names, 50))

    def fault(name: str, attempt: int) -> Behaviour | None:
        """Seeded per (reply, attempt), so the plan does not depend on the order requests arrive in."""
        rng = random.Random(f"{seed}:{name}:{attempt}")
        if rng.random() >= 0.2:
            return None
        return rng.choice([status(429), status(500), status(502), delayed(30.0, good("hallucination", 0))])

    def script(marker: str | None, attempt: int, body: dict) -> Behaviour:
        f = fault(marker or "", attempt)
        if f is not None:
            return f
        return text('{"hallucination": ') if marker in malformed else good("hallucination", int(marker[1:]) % 4)

    leading_faults = {m: next(a for a in range(99) if fault(m, a) is None) for m in names}
    assert max(leading_faults.values()) <= max_retries, "seed makes some reply fail for good: pick another"

    its = [JudgeItem(m, [{"role": "user", "content": f"q {m}"}], f"a {marked(m)}") for m in names]
    with OpenAIServer(script, latency=latency) as srv:
        cfg = JudgeConfig(model="judge-load", base_url=srv.base_url, api_key="sk-test-load", concurrency=limit,
                          timeout_s=timeout, max_retries=max_retries, backoff_s=0.05, backoff_max_s=0.5)
        t0 = time.perf_counter()
        run = judge_replies(its, TRAIT, cfg, tmp_path / "c.sqlite")
        elapsed = time.perf_counter() - t0
        calls = list(srv.calls)
        max_in_flight = srv.max_in_flight

    ideal = n / limit * latency
    by_id = {r.id: r for r in run.results}
    assert len(by_id) == n
    for m in names:
        r = by_id[m]
        if m in malformed:
            assert r.score is None and "no JSON object" in r.error
        else:
            assert r.score == int(m[1:]) % 4 and r.error is None
    assert max_in_flight <= limit
    assert run.usage.api_calls == len(calls) and run.usage.retries == len(calls) - n
    # every planned fault was met and retried (an unplanned timeout under CPU load may add a few)
    assert len(calls) >= n + sum(leading_faults.values())
    assert elapsed <= 2 * ideal, f"{elapsed:.1f}s for {n} requests; ideal {ideal:.1f}s"


def test_sigkill_midway_then_rerun_judges_nothing_twice(tmp_path: Path) -> None:
    n = 120
    exs = [Example(f"k{i:03d}", [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "t"}],
                   [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "c"}],
                   "heldout" if i % 2 else "attribution") for i in range(n)]
    eval_path = write_examples(tmp_path / "beh.parquet", exs, TRAIT)
    pl.DataFrame({"id": [e.id for e in exs], "sample": [0] * n,
                  "prompt_messages": [json.dumps(e.prompt) for e in exs],
                  "reply": [f"reply {marked(e.id)}" for e in exs]}).write_parquet(tmp_path / "gen.parquet")
    cache = tmp_path / "cache.sqlite"
    cmd = [sys.executable, "-c", JUDGE_COMMAND, "judge", "--generations", str(tmp_path / "gen.parquet"),
           "--eval", str(eval_path), "--out", str(tmp_path / "out"), "--concurrency", "4", "--cache", str(cache)]

    def script(marker: str | None, attempt: int, body: dict) -> Behaviour:
        return good("hallucination", 1, rationale=f"judged {marker}")

    def start(srv: OpenAIServer) -> subprocess.Popen:
        env = {**os.environ, "DATTR_JUDGE_BASE_URL": srv.base_url, "DATTR_JUDGE_API_KEY": "sk-test-kill",
               "DATTR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=restore_default_signals)

    with OpenAIServer(script, latency=0.05) as srv:
        child = start(srv)
        deadline = time.monotonic() + 30
        while len(srv.completed_ok()) < n // 3:
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.communicate()
        assert child.returncode == -signal.SIGKILL
        with sqlite3.connect(cache) as db:
            saved = {json.loads(c)["rationale"].split()[-1] for (c,) in db.execute("SELECT content FROM judgements")}
        assert 0 < len(saved) < n, "killed midway"

        first_run = len(srv.calls)
        child = start(srv)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
        resent = [c.marker for c in srv.calls[first_run:]]

    assert not set(resent) & saved, "a reply judged before the kill was sent again"
    assert sorted(resent) == sorted({e.id for e in exs} - saved), "each missing reply sent exactly once"
    df = pl.read_parquet(tmp_path / "out" / "judge.parquet")
    assert df.height == n and df["parsed"].all()
    assert set(df.filter(pl.col("cached"))["id"]) == saved
    assert json.loads(out)["n_judged"] == n
    for blob in [out, err, *(f.read_bytes() for f in tmp_path.rglob("*") if f.is_file())]:
        assert b"sk-test-kill" not in blob
