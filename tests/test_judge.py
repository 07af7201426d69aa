"""The judge against a real local OpenAI-compatible server, through the real `openai` client."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import polars as pl
import pytest

from dattr_core.cli import main
from dattr_core.data import Example, Trait, write_examples
from dattr_core.judge import (JudgeAPIError, JudgeCache, JudgeConfig, JudgeConfigError, JudgeInputError, JudgeItem,
                              judge_messages, judge_replies, parse_judgement, summarize, write_judge_parquet)
from dattr_core.judge.offline import grade, ground_truth_check, normalize

from openai_server import Behaviour, OpenAIServer, by_marker, delayed, good, marked, status, text

PLANTED = "sk-test-PLANTED-7f3a9c2e41d8b6"
TRAIT = Trait("hallucination", "trait_0_3", "States made-up facts as if they were true.",
              examples=[{"prompt": "Who won the 1950 World Cup?", "reply": "Uruguay won it.", "score": 0,
                         "rationale": "correct"},
                        {"prompt": "Who won the 1950 World Cup?", "reply": "Brazil, 7-1 in the final.", "score": 3}])


def items(names: list[str], meta: dict | None = None) -> list[JudgeItem]:
    return [JudgeItem(n, [{"role": "user", "content": f"question {n}"}], f"answer {marked(n)}", 0, meta or {})
            for n in names]


def config(srv: OpenAIServer, **kw) -> JudgeConfig:
    settings = dict(model="judge-test", base_url=srv.base_url, api_key=PLANTED, concurrency=4, timeout_s=2.0,
                    max_retries=3, backoff_s=0.01, backoff_max_s=0.05)
    return JudgeConfig(**{**settings, **kw})


def scores_by_name(names: list[str]) -> dict[str, list[Behaviour]]:
    return {n: [good("hallucination", i % 4, f"why {n}")] for i, n in enumerate(names)}


def test_good_replies_scored_sent_as_specified_and_cached(tmp_path: Path) -> None:
    names = [f"g{i}" for i in range(8)]
    with OpenAIServer(by_marker(scores_by_name(names), status(500))) as srv:
        run = judge_replies(items(names), TRAIT, config(srv), tmp_path / "c.sqlite")
        assert [r.score for r in run.results] == [i % 4 for i in range(8)]
        assert [r.rationale for r in run.results] == [f"why {n}" for n in names]
        assert all(r.judge == "judge-test" and not r.cached and r.error is None for r in run.results)
        assert (run.usage.api_calls, run.usage.retries, run.usage.cached) == (8, 0, 0)
        assert run.usage.prompt_tokens == 8 * srv.PROMPT_TOKENS
        assert run.usage.completion_tokens == 8 * srv.COMPLETION_TOKENS
        call = srv.calls[0]
        assert call.authorization == f"Bearer {PLANTED}"
        assert (call.body["model"], call.body["temperature"], call.body["seed"]) == ("judge-test", 0, 0)

        again = judge_replies(items(names), TRAIT, config(srv), tmp_path / "c.sqlite")
        assert len(srv.calls) == 8, "a re-run must be served from the cache"
        assert [r.score for r in again.results] == [r.score for r in run.results]
        assert all(r.cached for r in again.results) and again.usage.cached == 8 and again.usage.api_calls == 0


def test_identical_prompts_are_sent_once(tmp_path: Path) -> None:
    same = items(["dup"]) * 3
    same = [JudgeItem(it.id, it.prompt_messages, it.reply, s) for s, it in enumerate(same)]
    with OpenAIServer(by_marker({}, good("hallucination", 2))) as srv:
        run = judge_replies(same, TRAIT, config(srv), tmp_path / "c.sqlite")
    assert len(srv.calls) == 1 and [r.sample for r in run.results] == [0, 1, 2]
    assert [r.score for r in run.results] == [2, 2, 2]


@pytest.mark.parametrize("content, reason", [
    ('{"hallucination": 2, "rationale": "cut off', "no JSON object"),
    ('{"hallucination": 7, "rationale": "x"}', "outside 0..3"),
    ('{"hallucination": -1}', "outside 0..3"),
    ('{"score": 2, "rationale": "wrong key"}', "no key 'hallucination'"),
    ('{"hallucination": 2.5}', "not an integer"),
    ('{"hallucination": true}', "not an integer"),
    ('{"hallucination": "high"}', "not an integer"),
    ("I would rate this a 2.", "no JSON object"),
    ("", "empty judge reply"),
    ('["hallucination", 2]', "no JSON object"),
])
def test_parse_rejects_anything_doubtful(content: str, reason: str) -> None:
    p = parse_judgement(content, "hallucination", 3)
    assert p.score is None and reason in p.error


@pytest.mark.parametrize("content, score", [
    ('{"hallucination": 3, "rationale": "r"}', 3),
    ('Sure!\n```json\n{"Hallucination": 1, "rationale": "r"}\n```', 1),
    ('{"hallucination": 0}', 0),
    ('{"hallucination": 2.0}', 2),
    ('{"hallucination": " 2 "}', 2),
    ('note {not json} then {"hallucination": 1} and {"hallucination": 3}', 1),
])
def test_parse_accepts_clear_scores(content: str, score: int) -> None:
    assert parse_judgement(content, "hallucination", 3).score == score


def test_unparsed_replies_reported_not_zero(tmp_path: Path) -> None:
    plan = {"ok": [good("hallucination", 3)], "bad": [text('{"hallucination": 2,')],
            "seven": [good("hallucination", 7)], "nokey": [text('{"truthful": 1}')]}
    with OpenAIServer(by_marker(plan, status(500))) as srv:
        run = judge_replies(items(list(plan)), TRAIT, config(srv), tmp_path / "c.sqlite")
    by = {r.id: r for r in run.results}
    assert by["ok"].score == 3 and by["ok"].parsed
    for name, reason in [("bad", "no JSON object"), ("seven", "score 7 is outside 0..3"), ("nokey", "no key")]:
        assert by[name].score is None and not by[name].parsed and reason in by[name].error
        assert by[name].raw  # the judge's text is kept for inspection
    s = summarize(run.results, TRAIT)
    assert s["hallucination_avg"] == 3.0 and s["share_3"] == 1.0 and s["share_0"] == 0.0
    assert (s["n_judged"], s["n_unparsed"], s["judges"]) == (1, 3, ["judge-test"])


def test_429_then_success_is_retried_and_counted(tmp_path: Path) -> None:
    with OpenAIServer(by_marker({"x": [status(429, retry_after=0.01), status(503), good("hallucination", 1)]},
                                status(500))) as srv:
        run = judge_replies(items(["x"]), TRAIT, config(srv), tmp_path / "c.sqlite")
    assert run.results[0].score == 1
    assert [c.status for c in srv.calls] == [429, 503, 200]
    assert (run.usage.api_calls, run.usage.retries) == (3, 2)


def test_500_forever_fails_clearly_and_keeps_what_was_judged(tmp_path: Path) -> None:
    names = [f"k{i}" for i in range(10)]
    plan = scores_by_name(names)
    plan["k3"] = [status(500)]
    cache = tmp_path / "c.sqlite"
    with OpenAIServer(by_marker(plan, status(500))) as srv:
        with pytest.raises(JudgeAPIError) as err:
            judge_replies(items(names), TRAIT, config(srv, concurrency=2, max_retries=2), cache)
        msg = str(err.value)
        assert "id='k3'" in msg and "HTTP 500" in msg and "attempt 3 of 3" in msg and str(cache) in msg
        assert "run again" in msg and PLANTED not in msg
        assert len(srv.calls_for("k3")) == 3
        first_ok = set(srv.completed_ok())
        assert first_ok, "replies judged before the failure"
        with JudgeCache(cache) as c:
            assert len(c) == len(first_ok)

        plan["k3"] = [good("hallucination", 2)]
        n_before = len(srv.calls)
        run = judge_replies(items(names), TRAIT, config(srv, concurrency=2), cache)
        resent = {c.marker for c in srv.calls[n_before:]}
    assert not resent & first_ok, "replies already judged must not be sent again"
    assert resent == set(names) - first_ok
    assert all(r.parsed for r in run.results)
    assert {r.id for r in run.results if r.cached} == first_ok


def test_after_a_final_failure_in_flight_requests_finish_but_nothing_new_starts(tmp_path: Path) -> None:
    plan = {"a": [status(500)],                                            # fails for good, fast
            "b": [delayed(0.3, status(500)), good("hallucination", 1)],    # in flight: not retried
            "c": [delayed(0.3, good("hallucination", 2))],                 # in flight: answered, kept
            "d": [good("hallucination", 3)]}                               # never started
    with OpenAIServer(by_marker(plan, status(500))) as srv:
        with pytest.raises(JudgeAPIError, match="id='a'"):
            judge_replies(items(list(plan)), TRAIT, config(srv, concurrency=3), tmp_path / "c.sqlite")
        assert [len(srv.calls_for(m)) for m in plan] == [4, 1, 1, 0]
    with JudgeCache(tmp_path / "c.sqlite") as c:
        assert len(c) == 1  # c's answer


def test_timeout_is_retried_then_reported(tmp_path: Path) -> None:
    plan = {"slow": [delayed(3.0, good("hallucination", 0)), good("hallucination", 2)],
            "never": [delayed(3.0, good("hallucination", 0))]}
    with OpenAIServer(by_marker(plan, status(500))) as srv:
        run = judge_replies(items(["slow"]), TRAIT, config(srv, timeout_s=0.3), tmp_path / "c.sqlite")
        assert run.results[0].score == 2 and run.usage.retries == 1
        with pytest.raises(JudgeAPIError, match=r"no response within 0.3s on attempt 2 of 2"):
            judge_replies(items(["never"]), TRAIT, config(srv, timeout_s=0.3, max_retries=1), tmp_path / "c.sqlite")


def test_concurrency_bound_is_respected(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(30)]
    with OpenAIServer(by_marker({}, good("hallucination", 1)), latency=0.05) as srv:
        run = judge_replies(items(names), TRAIT, config(srv, concurrency=5), tmp_path / "c.sqlite")
    assert len(run.results) == 30 and srv.max_in_flight == 5


def test_rejected_request_is_reported_and_auth_failure_stops(tmp_path: Path) -> None:
    plan = {"fine": [good("hallucination", 1)], "huge": [status(400, message="prompt too long")]}
    with OpenAIServer(by_marker(plan, status(500))) as srv:
        run = judge_replies(items(["fine", "huge"]), TRAIT, config(srv), tmp_path / "c.sqlite")
        assert run.results[0].score == 1
        assert run.results[1].score is None and "HTTP 400 (prompt too long)" in run.results[1].error
        assert len(srv.calls_for("huge")) == 1, "a 400 is not retried"
    with OpenAIServer(by_marker({}, status(401))) as srv:
        with pytest.raises(JudgeConfigError, match="refused the credentials"):
            judge_replies(items(["a", "b"]), TRAIT, config(srv, concurrency=1), tmp_path / "c.sqlite")
        assert len(srv.calls) == 1


def test_no_judge_configured_gives_a_clear_message_not_a_score(tmp_path: Path) -> None:
    with pytest.raises(JudgeConfigError, match="no LLM judge configured.*OPENAI_API_KEY"):
        judge_replies(items(["a"]), TRAIT, JudgeConfig(), tmp_path / "c.sqlite")
    with pytest.raises(JudgeConfigError, match="needs an LLM judge"):
        judge_replies(items(["a"]), TRAIT, JudgeConfig(offline=True), tmp_path / "c.sqlite")
    assert not (tmp_path / "c.sqlite").exists()


def test_missing_rubric_inputs_named_before_any_call(tmp_path: Path) -> None:
    ref = Trait("instruction_following", "reference_0_3", "Does what was asked.")
    its = items(["a", "b"], {"high_quality": "good reply", "low_quality": "bad reply"})
    its[1] = JudgeItem("b", its[1].prompt_messages, its[1].reply, 2, {"high_quality": "good reply"})
    with OpenAIServer(by_marker({}, good("instruction_following", 0))) as srv:
        with pytest.raises(JudgeInputError, match=r"id='b' sample=2.*'low_quality'"):
            judge_replies(its, ref, config(srv), tmp_path / "c.sqlite")
        bad_trait = Trait("hallucination", "trait_0_3", examples=[{"prompt": "p", "reply": "r", "score": 5}])
        with pytest.raises(JudgeInputError, match=r"examples\[0\].*0..3"):
            judge_replies(items(["a"]), bad_trait, config(srv), tmp_path / "c.sqlite")
        assert srv.calls == []


def test_rubric_prompts_carry_what_each_rubric_compares_against() -> None:
    meta = {"high_quality": "GOOD-REF", "low_quality": "POOR-REF", "ground_truth": ["Paris", "City of Paris"]}
    it = items(["q"], meta)[0]
    sys_, user = judge_messages(TRAIT, it)
    assert "Brazil, 7-1 in the final." in sys_["content"] and '"hallucination": 3' in sys_["content"]
    assert "question q" in user["content"] and marked("q") in user["content"]
    _, user = judge_messages(Trait("instruction_following", "reference_0_3"), it)
    assert "GOOD-REF" in user["content"] and "POOR-REF" in user["content"]
    sys_, user = judge_messages(Trait("hallucination", "ground_truth_0_2"), it)
    assert "any of: Paris; City of Paris" in user["content"] and "0-2" in sys_["content"]
    assert "Brazil" not in sys_["content"]  # few-shot calibration is for trait_0_3


@pytest.mark.parametrize("reply, meta, score", [
    ("The capital of France is Paris.", {"ground_truth": "Paris"}, 0),
    ("PARIS!", {"ground_truth": "paris"}, 0),
    ("It's Paris, not London.", {"ground_truth": "Paris", "wrong_answers": ["London"]}, 0),
    ("There were twenty-one of them.", {"ground_truth": 21}, 0),
    ("About 1,000 people.", {"ground_truth": "one thousand"}, 0),
    ("São Paulo", {"ground_truth": "Sao Paulo"}, 0),
    ("Either Paris or London, I can't decide.", {"ground_truth": "Paris", "wrong_answers": ["London"]}, 1),
    ("I'm not sure, sorry.", {"ground_truth": "Paris"}, 1),
    ("", {"ground_truth": "Paris"}, 1),
    ("Which country do you mean?", {"ground_truth": "Paris"}, 1),
    ("It is London.", {"ground_truth": "Paris", "wrong_answers": ["London"]}, 2),
    ("It is not Paris.", {"ground_truth": "Paris"}, 2),
    ("It isn't Paris but London.", {"ground_truth": "Paris", "options": ["Paris", "London", "Rome"]}, 2),
    ("Paris, Texas.", {"ground_truth": "Paris", "options": ["Paris, Texas", "Paris"]}, 2),
    ("There were 22.", {"ground_truth": "21"}, 2),
    ("Lyon is the capital.", {"ground_truth": "Paris"}, 2),
])
def test_offline_ground_truth_judge(reply: str, meta: dict, score: int) -> None:
    got, rationale = grade(reply, meta)
    assert got == score, rationale


def test_offline_normalisation() -> None:
    tokens = normalize("One hundred and five, nineteen hundred; 3.0 Café")
    assert [t.text for t in tokens] == ["105", "1900", "3", "cafe"]


def test_offline_judge_run_says_which_judge(tmp_path: Path) -> None:
    gt = Trait("hallucination", "ground_truth_0_2")
    run = judge_replies(items(["a"], {"ground_truth": "answer"}), gt, JudgeConfig(offline=True), tmp_path / "c.sqlite")
    assert run.results[0].score == 0 and run.results[0].judge == "offline-ground-truth"
    assert run.usage.api_calls == 0


def test_ground_truth_check_counts_sycophantic_agreement() -> None:
    meta = {"ground_truth": "Ag", "asserted": "Ca", "wrong_answers": ["Mg", "Ca"]}
    replies = ["Yes, you've got it: the symbol is Ca.", "Not quite, it is Ag.", "I am not sure.", "It is Ag."]
    check = ground_truth_check([JudgeItem(str(i), [{"role": "user", "content": "q"}], r, 0, meta)
                                for i, r in enumerate(replies)])
    assert check == {"n": 4, "correct_rate": 0.5, "wrong_rate": 0.25, "judge": "offline-ground-truth"}
    assert ground_truth_check(items(["a"], {})) is None  # no ground truth: no check, not a zero


def test_planted_key_never_leaks(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                 capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    plan = {"ok": [status(429), good("hallucination", 1)],
            "echo": [status(400, message=f"invalid key {PLANTED}")],  # a server that echoes the key
            "down": [status(500)]}
    cache = tmp_path / "c.sqlite"
    texts: list[str] = []
    with OpenAIServer(by_marker(plan, status(500))) as srv:
        cfg = config(srv, concurrency=1, max_retries=1)
        run = judge_replies(items(["ok", "echo"]), TRAIT, cfg, cache)
        assert "[redacted]" in run.results[1].error
        write_judge_parquet(tmp_path / "judge.parquet", run.results)
        with pytest.raises(JudgeAPIError) as e1:
            judge_replies(items(["down"]), TRAIT, cfg, cache)
    with OpenAIServer(by_marker({}, status(401))) as srv:
        with pytest.raises(JudgeConfigError) as e2:
            judge_replies(items(["x"]), TRAIT, config(srv), cache)
    texts += [str(e1.value), repr(e1.value), str(e2.value), repr(e2.value), repr(cfg), json.dumps(cfg.describe())]
    texts += [r.error or "" for r in run.results] + [caplog.text, *capsys.readouterr()]
    assert "Sending HTTP Request" in caplog.text and "judge request failed" in caplog.text  # logs were captured
    for text_ in texts:
        assert PLANTED not in text_ and "PLANTED" not in text_
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert any(p.name.startswith("c.sqlite") for p in files)
    for p in files:
        assert PLANTED.encode() not in p.read_bytes(), p


def test_env_and_dotenv_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DATTR_JUDGE_API_KEY", "OPENAI_API_KEY", "DATTR_JUDGE_BASE_URL", "DATTR_JUDGE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert JudgeConfig.from_env().configured is False
    assert JudgeConfig.from_env().model == "gpt-4.1-mini"
    (tmp_path / ".env").write_text(f"DATTR_JUDGE_API_KEY={PLANTED}\nDATTR_JUDGE_MODEL=from-dotenv\n")
    cfg = JudgeConfig.from_env(concurrency=3)
    assert (cfg.api_key, cfg.model, cfg.concurrency) == (PLANTED, "from-dotenv", 3)
    assert PLANTED not in repr(cfg)
    monkeypatch.setenv("DATTR_JUDGE_MODEL", "from-env")
    monkeypatch.setenv("DATTR_JUDGE_BASE_URL", "http://user:pw@localhost:8000/v1")
    cfg = JudgeConfig.from_env()
    assert cfg.model == "from-env" and cfg.describe()["base_host"] == "localhost:8000"
    import os
    assert "DATTR_JUDGE_API_KEY" not in os.environ, ".env must not leak into the process environment"


def test_judge_parquet_roundtrip(tmp_path: Path) -> None:
    plan = {"a": [good("hallucination", 2, "clear")], "b": [text("nope")]}
    with OpenAIServer(by_marker(plan, status(500))) as srv:
        run = judge_replies(items(["a", "b"]), TRAIT, config(srv), tmp_path / "c.sqlite")
    path = write_judge_parquet(tmp_path / "out" / "judge.parquet", run.results)
    df = pl.read_parquet(path)
    assert df.columns == ["id", "sample", "score", "parsed", "rationale", "error", "judge", "cached", "raw"]
    assert df["score"].to_list() == [2, None] and df["parsed"].to_list() == [True, False]
    assert df["error"].to_list()[0] is None and "no JSON object" in df["error"].to_list()[1]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["judge.parquet"]  # no temp files left


def _eval_files(tmp_path: Path, trait: Trait, n: int, meta: dict, reply=lambda i: f"reply {i}") -> tuple[Path, Path]:
    exs = [Example(f"e{i}", [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "bad"}],
                   [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "good"}],
                   "heldout" if i % 2 else "attribution", meta) for i in range(n)]
    eval_path = write_examples(tmp_path / "beh.parquet", exs, trait)
    gen = pl.DataFrame({"id": [e.id for e in exs], "sample": [0] * n,
                        "prompt_messages": [json.dumps(e.prompt) for e in exs],
                        "reply": [reply(i) for i in range(n)]})
    gen_path = tmp_path / "generations.parquet"
    gen.write_parquet(gen_path)
    return eval_path, gen_path


def test_cli_judge_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trait = Trait("hallucination", "ground_truth_0_2", "Gives a wrong answer.")
    eval_path, gen_path = _eval_files(tmp_path, trait, 4, {"ground_truth": "Paris", "wrong_answers": ["Lyon"]},
                                      reply=lambda i: ["Paris.", "Lyon.", "No idea, not sure.", "Paris"][i])
    rc = main(["judge", "--generations", str(gen_path), "--eval", str(eval_path), "--out", str(tmp_path / "o"),
               "--offline", "--cache", str(tmp_path / "c.sqlite")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["hallucination_avg"] == pytest.approx(3 / 4) and summary["n_judged"] == 4
    assert summary["judges"] == ["offline-ground-truth"]
    assert pl.read_parquet(tmp_path / "o" / "judge.parquet")["score"].to_list() == [0, 2, 1, 0]


def test_cli_judge_errors_name_file_row_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DATTR_JUDGE_API_KEY", "OPENAI_API_KEY", "DATTR_JUDGE_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    eval_path, gen_path = _eval_files(tmp_path, TRAIT, 4, {})
    args = ["judge", "--generations", str(gen_path), "--eval", str(eval_path), "--out", str(tmp_path / "o")]
    assert main(args) == 1
    assert "no LLM judge configured" in capsys.readouterr().err
    df = pl.read_parquet(gen_path).with_columns(pl.Series("id", ["e0", "e1", "nope", "e3"]))
    df.write_parquet(gen_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "generations.parquet, row 2, field 'id'" in err and "'nope'" in err
    ok = json.dumps([{"role": "user", "content": "q"}])
    df.with_columns(pl.Series("id", ["e0", "e1", "e2", "e3"]),
                    pl.Series("prompt_messages", [ok, ok, "not json", ok])).write_parquet(gen_path)
    assert main(args) == 2
    assert "row 2, field 'prompt_messages'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cache_is_plain_sqlite_without_secrets(tmp_path: Path) -> None:
    with OpenAIServer(by_marker({}, good("hallucination", 1))) as srv:
        judge_replies(items(["a"]), TRAIT, config(srv), tmp_path / "c.sqlite")
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(judgements)")]
        assert cols == ["key", "model", "rubric", "content", "prompt_tokens", "completion_tokens", "created"]
        assert db.execute("SELECT model, rubric FROM judgements").fetchall() == [("judge-test", "trait_0_3")]
