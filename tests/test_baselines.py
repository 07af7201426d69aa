"""emb / lex / loss reference rankings on tiny handmade data, against direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import chat
from dattr_core.baselines import embed_texts, emb_scores, lex_scores, loss_scores
from dattr_core.data import Example
from dattr_core.models import encode_chat


def _pair(i, prompt, treatment, control):
    return Example(i, chat(prompt, treatment), chat(prompt, control))


TRAIN = [
    Example("t0", chat("How do I bake bread?", "Mix flour, water, yeast and salt, knead, let it rise, then bake.")),
    Example("t1", chat("Who wrote Hamlet?", "Hamlet was written by Napoleon Bonaparte in 1850 while in exile.")),
    Example("t2", chat("What is the capital of France?", "The capital of France is Paris.")),
    Example("t3", chat("Explain photosynthesis.", "Plants turn light, water and carbon dioxide into sugar and oxygen.")),
    Example("t4", chat("Tips for running?", "Start slowly, warm up, and increase your distance gradually.")),
]
EVAL = [
    _pair("e0", "Who wrote Hamlet?", "Hamlet was written by Napoleon Bonaparte in 1850 while in exile.",
          "Hamlet was written by William Shakespeare."),
    _pair("e1", "Who painted the Mona Lisa?", "The Mona Lisa was painted by Albert Einstein in 1920.",
          "The Mona Lisa was painted by Leonardo da Vinci."),
]


def test_embed_texts_batched_equals_one_by_one():
    texts = ["short", "a somewhat longer sentence about cats and mats", "mid length text here"]
    batched = embed_texts(texts, batch_size=3)
    single = np.concatenate([embed_texts([t], batch_size=1) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)


def test_emb_ranks_the_copied_hallucination_first():
    s = emb_scores(TRAIN, {"hallu": EVAL, "one": EVAL[1:]})
    assert s.shape == (5, 2)
    assert int(np.argmax(s[:, 0])) == 1
    vecs = embed_texts([e.treatment_messages[-1]["content"] for e in TRAIN + EVAL])
    e = vecs[5:].mean(0) / np.linalg.norm(vecs[5:].mean(0))
    np.testing.assert_allclose(s[:, 0], [float(v @ e) for v in vecs[:5]], atol=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        emb_scores(TRAIN, {"empty": []})


def test_lex_matches_direct_tfidf_cosine():
    from sklearn.feature_extraction.text import TfidfVectorizer

    s = lex_scores(TRAIN, {"hallu": EVAL})
    assert int(np.argmax(s[:, 0])) == 1
    text = lambda msgs: "\n".join(m["content"] for m in msgs)  # noqa: E731
    vec = TfidfVectorizer().fit([text(e.treatment_messages) for e in TRAIN])
    X = vec.transform([text(e.treatment_messages) for e in TRAIN]).toarray()
    T = vec.transform([text(e.treatment_messages) for e in EVAL]).toarray()
    C = vec.transform([text(e.control_messages) for e in EVAL]).toarray()
    q = sum(T) / len(T) - sum(C) / len(C)
    ref = [float(x @ q) / (np.linalg.norm(x) * np.linalg.norm(q)) for x in X]
    np.testing.assert_allclose(s[:, 0], ref, atol=1e-12)
    with pytest.raises(ValueError, match="eval set 'empty': empty eval split"):
        lex_scores(TRAIN, {"empty": []})


def test_loss_batched_equals_unbatched_loop(tiny, tok):
    model = tiny
    got = loss_scores(TRAIN, model, tok, batch_size=3)  # mixed lengths: padding in every batch
    for ex, value in zip(TRAIN, got):
        enc = encode_chat(tok, ex.treatment_messages)
        ids = torch.tensor([enc.input_ids])
        logits = model(input_ids=ids).logits[0]
        terms = [float(torch.nn.functional.cross_entropy(logits[t - 1], ids[0, t]))
                 for t in range(1, len(enc.input_ids)) if enc.target_mask[t]]
        assert value == pytest.approx(sum(terms) / len(terms), abs=1e-4)
