"""The judge-free preference gap and metrics.json writing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dattr_core.data import Example
from dattr_core.metrics import preference_gap, preference_metrics, write_metrics
from dattr_core.models import EncodingError, encode_chat, load_tokenizer, per_example_loss, tiny_model


def pair(i: int) -> Example:
    prompt = [{"role": "user", "content": "Tell me something. " * (i % 3 + 1)}]
    return Example(str(i), prompt + [{"role": "assistant", "content": f"Fact {i}: water boils at 100 C." * (i % 2 + 1)}],
                   prompt + [{"role": "assistant", "content": f"I am not sure about {i}."}], "heldout")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok), blocks_=2)


def unbatched_ce(model, tok, messages) -> float:
    enc = encode_chat(tok, messages)
    ids, mask = torch.tensor([enc.input_ids]), torch.tensor([enc.target_mask])
    with torch.no_grad():
        return per_example_loss(model(input_ids=ids).logits, ids, mask).item()


def test_gap_equals_an_unbatched_loop(model, tok):
    examples = [pair(i) for i in range(5)]
    got = preference_gap(model, tok, examples, batch_size=3)
    ce_t = sum(unbatched_ce(model, tok, e.treatment_messages) for e in examples) / 5
    ce_c = sum(unbatched_ce(model, tok, e.control_messages) for e in examples) / 5
    assert got["n"] == 5
    assert got["ce_treatment"] == pytest.approx(ce_t, abs=1e-4)
    assert got["ce_control"] == pytest.approx(ce_c, abs=1e-4)
    assert got["gap"] == pytest.approx(ce_t - ce_c, abs=1e-4)
    assert got["ce_control"] > 1.0 and got["gap"] != 0  # control CE is computed, not assumed 0
    assert preference_gap(model, tok, examples, batch_size=1)["gap"] == pytest.approx(got["gap"], abs=1e-4)


def test_gap_needs_pairs(model, tok):
    with pytest.raises(ValueError, match="at least one"):
        preference_gap(model, tok, [])
    lonely = Example("solo", pair(0).treatment_messages)
    with pytest.raises(ValueError, match="solo"):
        preference_gap(model, tok, [pair(1), lonely])
    long = Example("long", pair(0).treatment_messages, pair(0).prompt + [{"role": "assistant", "content": "no " * 40}])
    with pytest.raises(EncodingError, match="'long' control_messages"):
        preference_gap(model, tok, [long], max_tokens=30)


def test_preference_metrics_drop():
    base = {"ce_treatment": 3.0, "ce_control": 2.0, "gap": 1.0, "n": 4}
    tuned = {"ce_treatment": 2.0, "ce_control": 2.5, "gap": -0.5, "n": 4}
    m = preference_metrics(base, tuned)["preference_gap"]
    assert m["drop"] == 1.5 and m["base"] is base and m["tuned"] is tuned


def test_write_metrics_is_atomic_json(tmp_path):
    path = tmp_path / "exp" / "metrics.json"
    write_metrics(path, {"preference_gap": {"gap": 0.25, "n": 3}})
    assert json.loads(path.read_text()) == {"preference_gap": {"gap": 0.25, "n": 3}}
    with pytest.raises(ValueError, match=r"metrics\.preference_gap\.gap"):
        write_metrics(path, {"preference_gap": {"gap": math.nan, "n": 3}})
    assert json.loads(path.read_text())["preference_gap"]["gap"] == 0.25  # the old file is untouched
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
