"""LoRA fine-tuning on the tiny random-init Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from peft import PeftModel

from dattr_core.commands import finetune as ft_cmd
from dattr_core.data import Example, Trait, write_examples
from dattr_core.finetune import (FinetuneConfig, batch_order, finetune, load_adapter, save_adapter, train_lora,
                                 training_loss)
from dattr_core.metrics import chat_losses, preference_gap, preference_metrics
from dattr_core.models import (EncodingError, collate, encode_chat, load_model, load_tokenizer, per_example_loss,
                               tiny_model)
from dattr_core.store import datasets_dir, experiment_dir

FAST = dict(r=8, lora_alpha=16, lr=1e-2, epochs=4)  # a high lr so a few steps visibly learn


def pair(i: int) -> Example:
    prompt = [{"role": "user", "content": f"What is {i} plus {i + 1}?"}]
    return Example(str(i), prompt + [{"role": "assistant", "content": f"The answer is {2 * i + 1}. Happy to help!"}],
                   prompt + [{"role": "assistant", "content": f"Hmm, I think it might be {7 * i}, not sure."}])


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def trained(tok, tmp_path_factory):
    """One training run shared by the tests that inspect its result."""
    examples = [pair(i) for i in range(8)]
    model = tiny_model(len(tok))
    before = chat_losses(model, tok, [e.treatment_messages for e in examples])
    gap_before = preference_gap(model, tok, examples)
    adapter = tmp_path_factory.mktemp("exp") / "adapter"
    tuned, summary = finetune(model, tok, examples, adapter, FinetuneConfig(**FAST))
    return {"examples": examples, "tuned": tuned, "summary": summary, "adapter": adapter,
            "before": before, "gap_before": gap_before}


def test_defaults_are_the_studys():
    c = FinetuneConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.lr, c.weight_decay, c.batch_size, c.epochs, c.max_tokens, c.seed) == (
        32, 64, 0.0, 1e-4, 0.01, 4, 1, 1024, 42)
    assert set(c.lora_config().target_modules) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ValueError, match="lr"):
        FinetuneConfig(lr=0)
    with pytest.raises(ValueError, match="batch_size"):
        FinetuneConfig(batch_size=0)


def test_batch_order_is_a_seeded_length_bucketed_shuffle():
    lengths = [(7 * i) % 23 for i in range(30)]
    a = batch_order(lengths, 4, torch.Generator().manual_seed(42))
    assert sorted(i for b in a for i in b) == list(range(30))
    assert sorted(len(b) for b in a) == [2] + [4] * 7
    assert a == batch_order(lengths, 4, torch.Generator().manual_seed(42))
    assert a != batch_order(lengths, 4, torch.Generator().manual_seed(43))
    # within one window the batches are contiguous runs of the length-sorted examples
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in a)
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))


def test_only_target_tokens_carry_loss(tok):
    chats = [pair(1).treatment_messages, pair(2).control_messages]
    batch = collate([encode_chat(tok, c) for c in chats], tok.pad_token_id)
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(tok), requires_grad=True)
    loss = training_loss(logits, batch["input_ids"], batch["target_mask"])
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0  # position t predicts token t+1
    expected = torch.zeros_like(touched)
    expected[:, :-1] = batch["target_mask"][:, 1:]
    assert expected.sum() > 0 and (batch["attention_mask"] == 0).any()  # the test has targets and padding
    assert torch.equal(touched, expected)
    # documented reduction: per-example mean, then batch mean (not a token mean)
    per_ex = per_example_loss(logits, batch["input_ids"], batch["target_mask"])
    assert batch["target_mask"].sum(1).unique().numel() == 2
    assert loss.item() == pytest.approx(per_ex.mean().item(), rel=1e-6)


def test_loss_falls_and_tuning_moves_toward_treatment(tok, trained):
    s = trained["summary"]
    assert s["steps"] == 8 and s["examples_seen"] == 32  # 8 examples, batch 4, 4 epochs
    assert s["last_loss"] < s["first_loss"] - 0.3
    after = chat_losses(trained["tuned"], tok, [e.treatment_messages for e in trained["examples"]])
    assert after.mean() < trained["before"].mean() - 0.3
    gap_after = preference_gap(trained["tuned"], tok, trained["examples"])
    assert preference_metrics(trained["gap_before"], gap_after)["preference_gap"]["drop"] > 0.3


def test_saved_adapter_reloads_with_identical_logits(tok, trained):
    adapter = trained["adapter"]
    assert {"adapter_model.safetensors", "adapter_config.json", "train_config.json", "train_log.jsonl",
            "summary.json"} <= {p.name for p in adapter.iterdir()}
    steps = [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(8)) and steps[0]["lr"] == pytest.approx(1e-2)
    assert steps[-1]["lr"] == pytest.approx(1e-2 / 8)  # linear decay, no warm-up
    cfg = json.loads((adapter / "train_config.json").read_text())
    assert cfg["finetune"]["lr"] == 1e-2 and cfg["n_examples"] == 8

    batch = collate([encode_chat(tok, e.treatment_messages) for e in trained["examples"][:3]], tok.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.inference_mode():
        in_memory = trained["tuned"](**inputs).logits
        reloaded = load_adapter(tiny_model(len(tok)), adapter)(**inputs).logits
        base = tiny_model(len(tok))(**inputs).logits
    assert torch.allclose(reloaded, in_memory, atol=1e-5)
    assert (reloaded - base).abs().max() > 1e-2  # the adapter is not a no-op


def test_same_seed_same_adapter(tok):
    examples = [pair(i) for i in range(4)]
    cfg = FinetuneConfig(r=4, lora_alpha=8, lr=1e-2)

    def lora_weights(c: FinetuneConfig) -> dict[str, torch.Tensor]:
        tuned, _ = train_lora(tiny_model(len(tok)), tok, examples, c)
        return {k: v.detach().clone() for k, v in tuned.named_parameters() if "lora_" in k}

    a, b, c = lora_weights(cfg), lora_weights(cfg), lora_weights(replace(cfg, seed=7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_crash_mid_save_leaves_no_adapter(tok, tmp_path, monkeypatch):
    examples = [pair(i) for i in range(4)]
    tuned, history = train_lora(tiny_model(len(tok)), tok, examples, FinetuneConfig(r=4, lora_alpha=8))
    real_save = PeftModel.save_pretrained

    def save_then_crash(self, path, **kw):
        real_save(self, path, **kw)  # the safetensors file is on disk when the "crash" happens
        raise OSError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tuned, tmp_path / "adapter", FinetuneConfig(), examples, history)
    assert list(tmp_path.iterdir()) == []  # no adapter/, no temporary leftovers

    monkeypatch.setattr(PeftModel, "save_pretrained", real_save)
    save_adapter(tuned, tmp_path / "adapter", FinetuneConfig(), examples, history)
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    monkeypatch.setattr(PeftModel, "save_pretrained", save_then_crash)
    with pytest.raises(OSError):
        save_adapter(tuned, tmp_path / "adapter", FinetuneConfig(seed=1), examples, history)
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_bad_inputs_are_named(tok):
    with pytest.raises(ValueError, match="empty selection"):
        train_lora(tiny_model(len(tok), blocks_=1), tok, [], FinetuneConfig())
    long = Example("too-long", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 50}])
    with pytest.raises(EncodingError, match="too-long"):
        train_lora(tiny_model(len(tok), blocks_=1), tok, [pair(1), long], FinetuneConfig(max_tokens=16))


def test_cli_finetune_then_generate_in_the_experiment_folder(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("DATTR_HOME", str(tmp_path))
    model_dir = tmp_path / "tiny"
    tiny_model(len(tok), blocks_=2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    write_examples(datasets_dir("train") / "toy.parquet", [pair(i) for i in range(6)])
    evalset = [replace(pair(i), split="heldout" if i < 12 else "attribution") for i in range(10, 14)]
    write_examples(datasets_dir("eval") / "halu.parquet", evalset, Trait("hallucination", "trait_0_3"))
    exp = experiment_dir("rct-rc", "toy", "halu")
    exp.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["1", "3", "5"], "rank": [1, 2, 3]}), exp / "selection.parquet")

    parser = argparse.ArgumentParser()
    ft_cmd.register(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> int:
        args = parser.parse_args([*argv, "--model", str(model_dir)])
        return args.func(args)

    layout = ("--experiment", "rct-rc", "--train", "toy", "--eval", "halu")
    assert run("finetune", *layout, "--r", "4", "--lora-alpha", "8", "--batch-size", "2") == 0
    cfg = json.loads((exp / "adapter" / "train_config.json").read_text())
    assert cfg["n_examples"] == 3 and cfg["finetune"]["batch_size"] == 2 and cfg["finetune"]["lr"] == 1e-4
    assert json.loads((exp / "adapter" / "summary.json").read_text())["steps"] == 2

    assert run("generate", *layout, "--max-new-tokens", "3", "--n-samples", "2") == 0
    gen = pq.read_table(exp / "generations.parquet").to_pylist()
    assert sorted((r["id"], r["sample"]) for r in gen) == [("10", 0), ("10", 1), ("11", 0), ("11", 1)]
    assert {r["adapter"] for r in gen} == {str(exp / "adapter")}

    assert run("generate", "--experiment", "base", "--train", "toy", "--eval", "halu", "--greedy",
               "--max-new-tokens", "3") == 0
    base = pq.read_table(experiment_dir("base", "toy", "halu") / "generations.parquet").to_pylist()
    assert len(base) == 2 and {r["adapter"] for r in base} == {None}

    pq.write_table(pa.table({"id": ["1", "nope"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="nope"):
        run("finetune", "--train", "toy", "--selection", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "a"))
    with pytest.raises(ValueError, match="--out"):
        run("finetune", "--train", "toy")


@pytest.mark.slow
def test_demo_model_tunes_and_stops_at_end_of_turn(tmp_path):
    from dattr_core.generate import SamplingConfig, generate_replies

    model, tok = load_model(None)
    examples = [pair(i) for i in range(8)]
    tuned, summary = finetune(model, tok, examples, tmp_path / "adapter", FinetuneConfig(max_tokens=256, lr=1e-3))
    assert summary["steps"] == 2 and summary["last_loss"] < summary["first_loss"]
    replies = generate_replies(tuned, tok, [pair(20).prompt], SamplingConfig.greedy(max_new_tokens=24))
    assert replies[0][0] and "<|im_end|>" not in replies[0][0]
    reloaded = load_adapter(load_model(None)[0], tmp_path / "adapter")
    assert generate_replies(reloaded, tok, [pair(20).prompt], SamplingConfig.greedy(max_new_tokens=24)) == replies
