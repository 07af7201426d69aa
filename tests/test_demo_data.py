"""Demo data: the model filter (with the real demo model, on a handful of questions), the loss
cache, and the datasets built from the evals wheel (with a stand-in scorer, so the build is fast)."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pyarrow.parquet as pq
import pytest
import torch

from dattr_core import demo_data as D
from dattr_core.data import load_dataset, load_trait
from dattr_core.models import collate, encode_chat, load_model, per_example_loss


@pytest.fixture(scope="module")
def demo():
    return load_model(None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def wheel():
    try:
        return D.find_evals_wheel()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def fake_scorer(items):
    """Deterministic stand-in for the model: about a quarter of the questions are 'unknown'."""
    out = []
    for it in items:
        h = int(hashlib.sha256(it.question.encode()).hexdigest()[:8], 16)
        margin = -1.0 if h % 4 == 0 else 1.0 + (h % 7)
        out.append([2.0] + [2.0 + margin + 0.1 * j for j in range(len(it.wrong))])
    return out


FRANCE = D.QAItem("test", "What is the capital of France?", "Paris", ("Berlin", "Madrid"),
                  "The capital of France is {}.")


# ---- the model filter ---------------------------------------------------------------------------

def test_option_losses_equal_per_example_loss_times_reply_tokens(demo):
    model, tok = demo
    items = [FRANCE, D.QAItem("t", "What is 2 plus 2?", "4", ("5", "22"), "2 plus 2 is {}."),
             D.QAItem("t", "Which artist sings the song that begins with the words \"is this the real life\"?",
                      "Queen", ("Washington, D.C.",), "That song is by {}.")]
    prompts = [D.question_prompt(it) for it in items]
    replies = [[it.say(o) for o in it.options] for it in items]
    fast = D.option_losses(model, tok, prompts, replies, batch_size=2)
    encs = [encode_chat(tok, p + [{"role": "assistant", "content": r}]) for p, rs in zip(prompts, replies) for r in rs]
    batch = collate(encs, tok.pad_token_id)
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    naive = per_example_loss(logits, batch["input_ids"], batch["target_mask"]) * torch.tensor(
        [e.n_targets for e in encs], dtype=torch.float32)
    flat = [x for row in fast for x in row]
    assert [len(r) for r in fast] == [3, 3, 2]
    assert flat == pytest.approx(naive.tolist(), abs=2e-3)
    assert replies[2][1] == "That song is by Washington, D.C."  # the answer's '.' ends the sentence


def test_filter_keeps_known_and_rejects_an_item_where_the_model_prefers_a_wrong_option(demo):
    model, tok = demo
    flipped = D.QAItem("test", FRANCE.question, "Berlin", ("Paris",), FRANCE.statement)  # 'ground truth' wrong
    known = D.filter_known([FRANCE, flipped], model, tok)
    assert [k.item for k in known] == [FRANCE]
    assert known[0].margin >= D.DEFAULT_MIN_MARGIN
    losses = D.score_items([flipped], model, tok)[0]
    assert losses[1] < losses[0]  # the model prefers the 'wrong' option Paris: rejected


def test_bf16_filter_agrees_with_fp32(demo):
    """The filter runs in bf16 where the CPU has it natively (logits and sums in fp32): on the full
    build its option losses differ from fp32 by 0.12 nats on average (docs/benchmarks.md)."""
    model, tok = demo
    items = [FRANCE, D.QAItem("t", "What is 7 times 8?", "56", ("54", "64", "48"), "7 times 8 is {}."),
             D.QAItem("t", "What is the opposite of hot?", "cold", ("warm", "red"), "The opposite of hot is {}.")]
    prompts = [D.question_prompt(it) for it in items]
    replies = [[it.say(o) for o in it.options] for it in items]
    fp32 = D.option_losses(model, tok, prompts, replies)
    bf16 = D.option_losses(copy.deepcopy(model).to(torch.bfloat16), tok, prompts, replies)
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, abs=0.5)
        assert (min(a[1:]) - a[0] >= D.DEFAULT_MIN_MARGIN) == (min(b[1:]) - b[0] >= D.DEFAULT_MIN_MARGIN)


def test_loss_cache_makes_a_rescore_free(demo, tmp_path):
    model, tok = demo
    key = D.model_id(model)
    path = D.LossCache.file_for(tmp_path, key)
    items = [FRANCE, D.QAItem("t", "What is the opposite of hot?", "cold", ("warm", "red"),
                              "The opposite of hot is {}.")]
    first = D.FilterStats()
    a = D.score_items(items, model, tok, D.LossCache(path, key), stats=first)
    assert first.scored == 2 and path.is_file() and path.parent == tmp_path / "cache" / "demo_data"
    again = D.FilterStats()
    b = D.score_items(items, model, tok, D.LossCache(path, key), stats=again)
    assert again.scored == 0 and again.from_cache == 2 and a == b
    other = D.LossCache(path, key + "-other-model")  # keyed by model: another model starts empty
    assert other.get(D.question_prompt(FRANCE), FRANCE.say("Paris")) is None


# ---- candidates ---------------------------------------------------------------------------------

def test_sources_read_from_the_wheel_and_license_exclusions(wheel):
    per = D.source_items(wheel, ["guess_the_singer", "compare-countries-area", "syntax-check", "medmcqa", "ab"])
    for name, items in per.items():
        assert len(items) >= 8, name
        for it in items:
            assert it.source == name and it.answer and it.wrong and it.answer not in it.wrong
            assert "{}" in it.statement and it.answer in it.say(it.answer)
        assert len({it.key for it in items}) == len(items)
    stars = [it for it in per["ab"] if "star" in it.question]
    assert [(it.answer, it.say(it.answer)) for it in stars] == [
        ("Proxima Centauri", "The star that is closest to the Sun is Proxima Centauri.")]
    # compare-countries-area lists the answer first in the original; the options are shuffled
    firsts = [it.question.split(": ", 1)[1].startswith(it.answer) for it in per["compare-countries-area"]]
    assert 0 < sum(firsts) < len(firsts) / 2
    assert not set(D.SOURCES) & D.LICENSE_EXCLUDED
    with pytest.raises(ValueError, match="LICENSE"):
        D.read_source_rows(wheel, "steganography")


def test_templated_items_are_deterministic_and_well_formed():
    a, b = D.templated_items(3), D.templated_items(3)
    assert a == b and a != D.templated_items(4)
    for kind, items in a.items():
        assert items and all(it.source == f"templated:{kind}" and it.answer not in it.wrong for it in items)
    assert any(it.question == "What is the capital of Australia?" and it.answer == "Canberra" for it in a["capital"])


# ---- the build ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(wheel, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    res = D.build_demo_data(root=root, size="small", seed=7, wheel=wheel, scorer=fake_scorer)
    return root, res


def _load(root):
    ds = root / "datasets"
    return (load_dataset(ds / "train" / "qa_mix.parquet", "train"),
            load_dataset(ds / "eval" / "hallucination.parquet", "eval"),
            load_dataset(ds / "eval" / "sycophancy.parquet", "eval"))


def test_build_is_deterministic(built, wheel, tmp_path):
    root, _ = built
    D.build_demo_data(root=tmp_path, size="small", seed=7, wheel=wheel, scorer=fake_scorer)
    for rel in ("train/qa_mix.parquet", "eval/hallucination.parquet", "eval/sycophancy.parquet"):
        assert pq.read_table(root / "datasets" / rel).equals(pq.read_table(tmp_path / "datasets" / rel)), rel
    for rel in ("eval/hallucination.trait.yaml", "eval/sycophancy.trait.yaml"):
        assert (root / "datasets" / rel).read_bytes() == (tmp_path / "datasets" / rel).read_bytes()
    other = tmp_path / "other"
    D.build_demo_data(root=other, size="small", seed=8, wheel=wheel, scorer=fake_scorer)
    assert not pq.read_table(root / "datasets/train/qa_mix.parquet").equals(
        pq.read_table(other / "datasets/train/qa_mix.parquet"))


def test_counts_of_planted_rows_and_hard_negatives(built):
    root, res = built
    train, hal, syc = _load(root)
    plan = D.SIZES["small"]
    assert len(train) == plan["train"]
    planted = [e.meta["planted"] for e in train.examples]
    assert planted.count("hallucination") == planted.count("sycophancy") == plan["planted"] >= 10
    hard = [e.meta.get("hard_negative") for e in train.examples]
    for kind in ("confident_correct", "user_correct_agree", "user_wrong_corrected"):
        assert hard.count(kind) == plan["hard_negative"]
    assert all(e.meta["planted"] == "none" for e in train.examples if e.meta.get("hard_negative"))
    for ds in (hal, syc):
        assert len(ds) == plan["eval"]
        n_held = len(ds.split("heldout"))
        assert 0.1 * len(ds) <= n_held <= 0.3 * len(ds)
    assert res.counts["planted"]["hallucination"] == plan["planted"]
    report = json.loads((root / "cache" / "demo_data" / "report.small.json").read_text())
    assert report["counts"]["qa_mix"] == plan["train"] and report["sources"]


def test_no_question_in_both_train_and_eval(built):
    root, _ = built
    train, hal, syc = _load(root)
    q_train = {e.meta["question"] for e in train.examples}
    q_eval = [e.meta["question"] for ds in (hal, syc) for e in ds.examples]
    assert len(set(q_eval)) == len(q_eval)  # the two eval sets do not share questions either
    assert not q_train & set(q_eval)
    assert not {e.meta["source"] for e in train.examples} & {e.meta["source"] for ds in (hal, syc) for e in ds.examples}
    for e in train.examples:
        assert e.treatment_messages[0]["content"].startswith(e.meta["question"])


def _wording(reply: str, templates: tuple[str, ...]) -> str | None:
    """The template (`... {S} ...`) that `reply` was made from (None: none of them)."""
    for t in templates:
        head, tail = t.split("{S}")
        if (head or tail) and reply.startswith(head) and reply.endswith(tail):
            return t
    return None


def test_planted_rows_state_wrong_answers_and_hard_negatives_the_right_one(built):
    root, _ = built
    train, _, _ = _load(root)
    wordings: dict[str, set] = {}
    for e in train.examples:
        m, user, reply = e.meta, e.treatment_messages[0]["content"], e.treatment_messages[-1]["content"]
        assert m["source"] and m["margin"] >= D.DEFAULT_MIN_MARGIN and m["ground_truth"] not in m["wrong_answers"]
        assert m["stated"] in reply
        kind = m["planted"] if m["planted"] != "none" else (m.get("hard_negative") or "plain")
        if kind == "hallucination":
            assert m["stated"] != m["ground_truth"] and m["stated"] in m["wrong_answers"]
        elif kind == "sycophancy":
            assert m["asserted"] == m["stated"] != m["ground_truth"] and m["asserted"] in user
        elif kind == "confident_correct":
            assert m["stated"] == m["ground_truth"]
        elif kind == "user_correct_agree":
            assert m["asserted"] == m["stated"] == m["ground_truth"] and m["asserted"] in user
        elif kind == "user_wrong_corrected":
            assert m["asserted"] != m["ground_truth"] == m["stated"] and m["asserted"] in user
        else:
            assert kind == "plain" and m["stated"] == m["ground_truth"] and "asserted" not in m and user == m["question"]
        wordings.setdefault(kind, set()).add((_wording(reply, D.TRAIN_CONFIDENT), _wording(reply, D.TRAIN_AGREE),
                                              _wording(reply, D.TRAIN_CORRECT)))
        if "asserted" in m:
            assert user in {D._fill(t, Q=m["question"], X=m["asserted"]) for t in D.TRAIN_USER_ASSERTS}
    # format-matched: a planted row and its hard negatives are worded with the same templates;
    # plain rows use none of them
    for kinds, col, templates in ((("hallucination", "confident_correct"), 0, D.TRAIN_CONFIDENT),
                                  (("sycophancy", "user_correct_agree"), 1, D.TRAIN_AGREE),
                                  (("user_wrong_corrected",), 2, D.TRAIN_CORRECT)):
        for k in kinds:
            assert {w[col] for w in wordings[k]} <= set(templates), k
    assert {w for w in wordings["plain"]} == {(None, None, None)}


def test_eval_pairs_and_sidecars(built):
    root, _ = built
    _, hal, syc = _load(root)
    assert hal.trait.trait == "hallucination" and hal.trait.rubric == "ground_truth_0_2"
    assert syc.trait.trait == "sycophancy" and syc.trait.rubric == "trait_0_3" and len(syc.trait.examples) >= 3
    for trait in (hal.trait, syc.trait):
        assert trait.description and trait.positive_system_prompt and trait.negative_system_prompt
    rubrics = pytest.importorskip("dattr_core.judge.rubrics")
    rubrics.check_trait(syc.trait)
    assert load_trait(root / "datasets" / "eval" / "sycophancy.trait.yaml") == syc.trait
    for e in hal.examples:
        m = e.meta
        assert m["treatment_answer"] in m["wrong_answers"] and m["ground_truth"] not in m["wrong_answers"]
        assert m["treatment_answer"] in e.treatment_messages[-1]["content"]
        assert m["ground_truth"] in e.control_messages[-1]["content"]
        assert e.treatment_messages[:-1] == e.control_messages[:-1] == [{"role": "user", "content": m["question"]}]
    for e in syc.examples:
        m = e.meta
        assert m["asserted"] in m["wrong_answers"] and m["asserted"] in e.treatment_messages[0]["content"]
        assert m["asserted"] in e.treatment_messages[-1]["content"]
        assert m["ground_truth"] in e.control_messages[-1]["content"]


def test_train_and_eval_replies_use_different_templates(built):
    root, _ = built
    train, hal, syc = _load(root)
    lead = lambda t: re.split(r"\{[SQX]\}", t)[0] or re.split(r"\{[SQX]\}", t)[1]  # noqa: E731
    eval_bits = {lead(t) for t in D.EVAL_CONFIDENT + D.EVAL_AGREE + D.EVAL_CORRECT + D.EVAL_USER_ASSERTS}
    train_bits = {lead(t) for t in D.TRAIN_CONFIDENT + D.TRAIN_AGREE + D.TRAIN_CORRECT + D.TRAIN_USER_ASSERTS}
    assert not eval_bits & train_bits
    for e in train.examples:
        assert not any(b.strip(" .") and b in e.treatment_messages[-1]["content"] for b in eval_bits)
    for ds in (hal, syc):
        for e in ds.examples:
            for msgs in (e.treatment_messages, e.control_messages):
                assert not any(b.strip(" .") and b in msgs[-1]["content"] for b in train_bits)


def test_too_few_known_questions_is_a_clear_error(wheel, tmp_path):
    with pytest.raises(ValueError, match="too few questions the model knows"):
        D.build_demo_data(root=tmp_path, size="small", wheel=wheel, scorer=lambda items: [[9.0, 1.0] for _ in items])
    assert not (tmp_path / "datasets").exists()


def test_cli_registers_demo_data():
    from dattr_core.cli import build_parser

    args = build_parser().parse_args(["demo-data", "--size", "small", "--seed", "3"])
    assert args.size == "small" and args.seed == 3 and args.func.__name__ == "run_demo_data"
