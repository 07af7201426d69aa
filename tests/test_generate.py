"""Generation on held-out prompts and the greedy `controls` fill, on the tiny random-init Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dattr_core import generate as gen_mod
from dattr_core.data import Dataset, Example
from dattr_core.generate import SamplingConfig, fill_controls, generate_heldout, generate_replies
from dattr_core.models import load_tokenizer, tiny_model

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You answer in French, briefly and politely, always."},
     {"role": "user", "content": "What is the capital of Italy, and what river runs through it?"}],
    [{"role": "user", "content": "Name a colour."}],
]


def example(i: int, prompt: list[dict[str, str]], control: bool = False) -> Example:
    reply = [{"role": "assistant", "content": f"reply {i}"}]
    return Example(f"ex{i}", prompt + reply, prompt + reply if control else None, "heldout")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def model(tok):
    """Tiny Llama with an untied random head: with tied embeddings a random model greedily copies its
    last prompt token ('\\n') forever, and empty replies would make the greedy tests vacuous."""
    m = tiny_model(len(tok), blocks_=2)
    head = torch.randn(m.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    m.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    return m


def test_sampling_defaults_are_the_studys(model, tok):
    c = SamplingConfig()
    assert (c.n_samples, c.temperature, c.top_p, c.seed, c.do_sample) == (3, 0.7, 0.9, 42, True)
    kw = c.generate_kwargs(model, tok)
    assert (kw["temperature"], kw["top_p"], kw["top_k"]) == (0.7, 0.9, 0)  # no hidden top-k=50 cut
    assert tok.eos_token_id in kw["eos_token_id"]
    greedy = SamplingConfig.greedy().generate_kwargs(model, tok)
    assert greedy["do_sample"] is False and "temperature" not in greedy
    with pytest.raises(ValueError, match="n_samples=1"):
        SamplingConfig.greedy(n_samples=3)


def test_generations_parquet_has_n_samples_per_prompt(model, tok, tmp_path):
    examples = [example(i, p) for i, p in enumerate(PROMPTS)]
    out = generate_heldout(model, tok, examples, tmp_path / "generations.parquet",
                           SamplingConfig(max_new_tokens=4, batch_size=2), model_name="tiny", adapter=None)
    table = pq.read_table(out)
    assert table.column_names == ["id", "sample", "prompt_messages", "reply", "model", "adapter"]
    rows = table.to_pylist()
    assert [(r["id"], r["sample"]) for r in rows] == [(f"ex{i}", s) for i in range(3) for s in range(3)]
    assert all(json.loads(r["prompt_messages"]) == PROMPTS[int(r["id"][2:])] for r in rows)
    assert all(r["model"] == "tiny" and r["adapter"] is None and r["reply"] for r in rows)
    assert json.loads(table.schema.metadata[b"sampling"])["top_p"] == 0.9
    assert [p.name for p in tmp_path.iterdir()] == ["generations.parquet"]  # no temp leftovers


def test_sampling_is_reproducible_with_the_seed(model, tok):
    cfg = SamplingConfig(max_new_tokens=4, batch_size=2)
    a = generate_replies(model, tok, PROMPTS, cfg)
    assert a == generate_replies(model, tok, PROMPTS, cfg)
    assert a != generate_replies(model, tok, PROMPTS, SamplingConfig(max_new_tokens=4, batch_size=2, seed=1))
    assert len({r for rs in a for r in rs}) > 3  # samples of one prompt differ from each other


def test_left_padded_batch_gives_one_by_one_greedy_replies(model, tok):
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    lengths = {len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts}
    assert len(lengths) == 3  # the batch really needs padding
    cfg = SamplingConfig.greedy(max_new_tokens=8, batch_size=3)
    batched = generate_replies(model, tok, PROMPTS, cfg)
    alone = [generate_replies(model, tok, [p], cfg)[0] for p in PROMPTS]
    assert batched == alone and all(len(r) == 1 and r[0] for r in batched)
    assert len({r[0] for r in batched}) > 1  # replies depend on the prompt


def test_fill_controls_uses_greedy_replies_and_caches(model, tok, tmp_path, monkeypatch):
    examples = [example(0, PROMPTS[0]), example(1, PROMPTS[1], control=True), example(2, PROMPTS[2])]
    ds = Dataset("toy", "train", Path("toy.parquet"), examples)
    filled = fill_controls(ds, model, tok, model_name="tiny", max_new_tokens=5, cache_dir=tmp_path)
    expected = generate_replies(model, tok, [PROMPTS[0], PROMPTS[2]], SamplingConfig.greedy(max_new_tokens=5))
    assert filled[0].control_messages == PROMPTS[0] + [{"role": "assistant", "content": expected[0][0]}]
    assert filled[2].control_messages == PROMPTS[2] + [{"role": "assistant", "content": expected[1][0]}]
    assert filled[1] is examples[1]  # an existing control is kept
    assert len(list(tmp_path.glob("toy.*.parquet"))) == 1

    def no_generation(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(gen_mod, "generate_replies", no_generation)
    assert fill_controls(ds, model, tok, model_name="tiny", max_new_tokens=5, cache_dir=tmp_path) == filled
    with pytest.raises(AssertionError, match="cache"):  # another model is another cache entry
        fill_controls(ds, model, tok, model_name="other", max_new_tokens=5, cache_dir=tmp_path)


def test_fill_controls_leaves_empty_replies_missing(model, tok, tmp_path, monkeypatch):
    ds = Dataset("toy", "train", Path("toy.parquet"), [example(0, PROMPTS[0]), example(2, PROMPTS[2])])
    monkeypatch.setattr(gen_mod, "generate_replies", lambda m, t, prompts, c: [[""], ["ok"]])
    filled = fill_controls(ds, model, tok, model_name="tiny", cache_dir=tmp_path)
    assert filled[0].control_messages is None
    assert filled[1].control_messages[-1] == {"role": "assistant", "content": "ok"}


def test_ensure_controls_reuses_the_filled_file_only_for_the_same_generation_settings(model, tok, tmp_path,
                                                                                      monkeypatch):
    from dattr_core.attribute import ensure_controls
    from dattr_core.data import load_dataset, write_examples

    write_examples(tmp_path / "toy.parquet", [example(0, PROMPTS[0]), example(2, PROMPTS[2])])
    ds = load_dataset(tmp_path / "toy.parquet", "train")
    short = ensure_controls(ds, "tiny", root=tmp_path, model=model, tok=tok, generation={"max_new_tokens": 3})
    for e in short.examples:
        assert len(tok(e.control_messages[-1]["content"], add_special_tokens=False)["input_ids"]) <= 4
    calls = []
    real = gen_mod.generate_replies
    monkeypatch.setattr(gen_mod, "generate_replies", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    again = ensure_controls(ds, "tiny", root=tmp_path, model=model, tok=tok, generation={"max_new_tokens": 3})
    assert again.examples == short.examples and calls == []
    longer = ensure_controls(ds, "tiny", root=tmp_path, model=model, tok=tok, generation={"max_new_tokens": 9})
    assert [c.max_new_tokens for c in calls] == [9]  # other settings: generated again, not the stale file
    assert longer.examples != short.examples
