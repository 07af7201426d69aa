"""The attribution math against slow references, batch/padding invariance, storage and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import chat, make_examples
from dattr_core import methods as M
from dattr_core.attribute import AttributeConfig, attribute, length_batches
from dattr_core.capture import capture
from dattr_core.data import DatasetError, load_dataset, write_examples
from dattr_core.models import collate, encode_chat, per_example_loss
from dattr_core.store import VectorSet

LAYER = 2


def _enc(tok, n=6):
    return [encode_chat(tok, e.treatment_messages) for e in make_examples(n)]


def _naive_rct(z_in, g, m, w):
    """The T×T formula exactly as written: −(1/|m|) Σ_t m_t Σ_s w_s ⟨z_in,t, z_in,s⟩ g_s."""
    T = z_in.shape[0]
    total = torch.zeros(z_in.shape[1], dtype=torch.float64)
    for t in range(T):
        if not m[t]:
            continue
        for s in range(T):
            total += float(w[s]) * torch.dot(z_in[t].double(), z_in[s].double()) * g[s].double()
    return -total / m.sum()


def test_rct_matches_naive_t_by_t_formula(tiny, tok):
    cap = capture(tiny, LAYER, collate(_enc(tok, 3), tok.pad_token_id))
    for fn, weights in ((M.rct, cap.attention_mask), (M.rct_response, cap.target_mask)):
        fast = fn(cap)
        for b in range(3):
            ref = _naive_rct(cap.z_in[b], cap.grad[b], cap.target_mask[b], weights[b])
            torch.testing.assert_close(fast[b].double(), ref, rtol=1e-4, atol=1e-7)


def _surrogate_rct(model, batch, layer, response_only: bool):
    """rct from an explicit linear surrogate: block L's output gets + z_in·W (W = 0), autograd
    gives ∂ℓ/∂W, one SGD step ΔW = −∂ℓ/∂W, and rct = mean over targets of z_in,t·ΔW."""
    D = model.config.hidden_size
    W = torch.zeros(D, D, requires_grad=True)
    seen = {}
    w_mask = (batch["target_mask"] if response_only else batch["attention_mask"]).float()[..., None]

    def hook(mod, args, kwargs, out):
        z_in = args[0] if args else kwargs["hidden_states"]
        seen["z_in"] = z_in.detach()
        return out + (w_mask * z_in.detach()) @ W

    h = model.model.layers[layer].register_forward_hook(hook, with_kwargs=True)
    with torch.enable_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        losses = per_example_loss(logits, batch["input_ids"], batch["target_mask"])
    h.remove()
    out = []
    for b in range(losses.shape[0]):
        (gW,) = torch.autograd.grad(losses[b], W, retain_graph=True)
        m = batch["target_mask"][b].float()
        out.append(-(m[:, None] * (seen["z_in"][b] @ gW)).sum(0) / m.sum())
    return torch.stack(out)


@pytest.mark.parametrize("response_only", [False, True])
def test_rct_equals_linear_surrogate_autograd(tiny, tok, response_only):
    batch = collate(_enc(tok, 4), tok.pad_token_id)
    cap = capture(tiny, LAYER, batch)
    fast = (M.rct_response if response_only else M.rct)(cap)
    torch.testing.assert_close(fast, _surrogate_rct(tiny, batch, LAYER, response_only), rtol=1e-3, atol=1e-6)


def test_grad_and_residual_match_autograd_hidden_states(tiny, tok):
    batch = collate(_enc(tok, 4), tok.pad_token_id)
    cap = capture(tiny, LAYER, batch)
    with torch.enable_grad():
        emb = tiny.get_input_embeddings()(batch["input_ids"]).requires_grad_(True)
        out = tiny(inputs_embeds=emb, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   output_hidden_states=True)
        hs = out.hidden_states[LAYER + 1]  # block L's output
        hs.retain_grad()
        per_example_loss(out.logits, batch["input_ids"], batch["target_mask"]).sum().backward()
    m = batch["target_mask"].float()[..., None]
    torch.testing.assert_close(M.grad(cap), -(m * hs.grad).sum(1) / m.sum(1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(M.residual(cap), (m * hs.detach()).sum(1) / m.sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap.loss, per_example_loss(out.logits, batch["input_ids"], batch["target_mask"]).detach())


def test_vectors_do_not_depend_on_batch_or_padding_side(tiny, tok):
    enc = _enc(tok, 6)
    assert len({len(e.input_ids) for e in enc}) > 1, "need mixed lengths"
    results = []
    for side in ("right", "left"):
        cap = capture(tiny, LAYER, collate(enc, tok.pad_token_id, side))
        results.append({m: f(cap) for m, f in M.SEQUENCE_METHODS.items()})
    alone = [capture(tiny, LAYER, collate([e], tok.pad_token_id)) for e in enc]
    for m, f in M.SEQUENCE_METHODS.items():
        single = torch.cat([f(c) for c in alone])
        for r in results:
            torch.testing.assert_close(r[m], single, rtol=1e-4, atol=1e-6)


def test_target_mask_marks_exactly_the_last_reply(tok):
    msgs = chat("First question?", "First answer.") + [{"role": "user", "content": "Second?"},
                                                         {"role": "assistant", "content": "Final reply here."}]
    e = encode_chat(tok, msgs)
    target_text = tok.decode([i for i, m in zip(e.input_ids, e.target_mask) if m])
    assert target_text.startswith("Final reply here.") and "First answer" not in target_text
    assert target_text[len("Final reply here."):] in (tok.eos_token, "<|im_end|>")


def test_length_batches_respect_budget_and_cover_every_index():
    lengths = [5, 50, 7, 49, 3, 100, 8]
    batches = length_batches(lengths, batch_tokens=100, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 100 or len(b) == 1


def test_attribute_writes_every_row_once_and_resumes(tiny, tok, small_train):
    cfg = AttributeConfig(model="tiny", layer=LAYER, shard_size=5, batch_tokens=300)
    res = attribute(small_train, cfg, tiny, tok, progress=False)
    assert res.shards_computed == 5 and res.shards_reused == 0  # 23 rows, the tail shard of 3 kept
    vs = res.vectors["rc"]
    assert vs.ids == small_train.ids and vs.load().shape == (23, 64)
    assert vs.meta["layer"] == LAYER and vs.meta["method"] == "rc" and vs.meta["count"] == 23
    full = {m: v.load() for m, v in res.vectors.items()}
    # interrupt: lose one finished shard (and meta) → only that shard is recomputed
    for v in res.vectors.values():
        (v.path / "shard-00002.npy").unlink()
        (v.path / "meta.json").unlink()
    again = attribute(small_train, cfg, tiny, tok, progress=False)
    assert again.shards_computed == 1 and again.shards_reused == 4
    for m, v in again.vectors.items():
        np.testing.assert_array_equal(v.load(), full[m])


def test_paired_methods_are_treatment_minus_control(tiny, tok, small_train):
    res = attribute(small_train, AttributeConfig(model="tiny", layer=LAYER,
                                                 methods=["rd", "residual", "residual_control", "rc", "rct", "rct_control"]),
                    tiny, tok, progress=False)
    v = {m: vs.load() for m, vs in res.vectors.items()}
    np.testing.assert_allclose(v["rd"], v["residual"] - v["residual_control"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(v["rc"], v["rct"] - v["rct_control"], rtol=1e-6, atol=1e-7)
    ex = small_train.examples[7]
    caps = [capture(tiny, LAYER, collate([encode_chat(tok, msgs)], tok.pad_token_id), backward=False)
            for msgs in (ex.treatment_messages, ex.control_messages)]
    ref = (M.residual(caps[0]) - M.residual(caps[1]))[0].numpy()
    np.testing.assert_allclose(res.vectors["rd"].load()[7], ref, rtol=1e-4, atol=1e-6)


def test_float16_storage(tiny, tok, small_train):
    res = attribute(small_train, AttributeConfig(model="tiny", layer=LAYER, methods=["rct"], storage_dtype="float16"),
                    tiny, tok, progress=False)
    assert np.load(res.vectors["rct"].shard_paths()[0]).dtype == np.float16


def test_bad_layer_and_missing_controls_are_clear_errors(tiny, tok, home):
    path = write_examples(home / "datasets" / "train" / "noctl.parquet", make_examples(4, paired=False))
    ds = load_dataset(path, "train")
    with pytest.raises(ValueError, match="layer 9 out of range: the model has 4 blocks"):
        attribute(ds, AttributeConfig(model="tiny", layer=9, methods=["rct"]), tiny, tok, progress=False)
    with pytest.raises(DatasetError, match=r"noctl.parquet, row 0, field 'control_messages'.*dattr controls"):
        attribute(ds, AttributeConfig(model="tiny", layer=1, methods=["rc"]), tiny, tok, progress=False)
    assert not list(home.glob("vectors/**/meta.json"))


def test_unencodable_row_names_the_row_and_leaves_no_complete_folder(tiny, tok, home):
    exs = make_examples(6)
    long_reply = chat("q", "word " * 400)
    exs[4] = type(exs[4])("ex4", long_reply, long_reply)
    ds = load_dataset(write_examples(home / "datasets" / "train" / "long.parquet", exs), "train")
    with pytest.raises(DatasetError, match=r"row 4, field 'treatment_messages'.*longer than max_tokens=64"):
        attribute(ds, AttributeConfig(model="tiny", layer=1, methods=["rct"], max_tokens=64, shard_size=2),
                  tiny, tok, progress=False)
    folder = next(home.glob("vectors/*/rct/long"))
    assert not (folder / "meta.json").exists()
    with pytest.raises(ValueError, match="meta.json missing"):
        VectorSet.open(folder)
