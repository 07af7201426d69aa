"""Shared fixtures: the demo tokenizer, a tiny random-init Llama, and small chat datasets."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dattr_core.data import Example, load_dataset, write_examples  # noqa: E402
from dattr_core.models import load_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    """The SmolLM2 tokenizer (ChatML template) from the shipped demo model."""
    return load_tokenizer(None)


@pytest.fixture(scope="session")
def tiny(tok):
    return tiny_model(len(tok), hidden=64, blocks_=4)


def chat(prompt: str, reply: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def make_examples(n: int, paired: bool = True, seed: int = 0) -> list[Example]:
    """Chats of varied lengths, so batches mix lengths and need padding."""
    import random

    rng = random.Random(seed)
    words = "the a river mountain city blue green seven answer question because quickly".split()
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 25)))
        t = " ".join(rng.choice(words) for _ in range(rng.randint(2, 15)))
        c = " ".join(rng.choice(words) for _ in range(rng.randint(2, 15)))
        out.append(Example(f"ex{i}", chat(q, t), chat(q, c) if paired else None,
                           "heldout" if i % 5 == 0 else "attribution", {"i": i}))
    return out


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DATTR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def small_train(home):
    path = write_examples(home / "datasets" / "train" / "small.parquet", make_examples(23))
    return load_dataset(path, "train")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny, tok) -> Path:
    """The tiny model and the demo tokenizer saved as a model folder (for CLI / settings paths)."""
    d = tmp_path_factory.mktemp("tiny-model")
    tiny.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def restore_default_signals() -> None:
    """`preexec_fn` for test children: background jobs here start with SIGINT/SIGTERM ignored."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)
