"""Top/bottom/random selection against a naive sort, ties, seeds, and the written files."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import chat
from dattr_core.cli import main
from dattr_core.data import Example, load_dataset, write_examples
from dattr_core.scoring import write_scores
from dattr_core.selection import select, write_selection


def naive_top(scores, k, descending=True):
    """Sort (score, row) pairs by hand: higher (or lower) score first, then the earlier row."""
    keyed = [(-s if descending else s, row) for row, s in enumerate(scores)]
    return [row for _, row in sorted(keyed)[:k]]


@pytest.mark.parametrize("seed", range(5))
def test_top_and_bottom_match_naive_sort(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    for k in (1, 7, 40):
        assert select(scores, k, "top").tolist() == naive_top(scores, k)
        assert select(scores, k, "bottom").tolist() == naive_top(scores, k, descending=False)


def test_ties_keep_dataset_order():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 1.0])
    assert select(scores, 2, "top").tolist() == [1, 2]
    assert select(scores, 4, "top").tolist() == [1, 2, 4, 3]
    assert select(scores, 3, "bottom").tolist() == [0, 5, 3]


def test_random_is_seeded_and_ignores_scores():
    scores = np.arange(1000, dtype=float)
    a = select(scores, 50, "random", seed=1)
    assert a.tolist() == select(scores, 50, "random", seed=1).tolist()
    assert a.tolist() == select(-scores, 50, "random", seed=1).tolist()
    assert a.tolist() != select(scores, 50, "random", seed=2).tolist()
    assert len(set(a.tolist())) == 50 and a.min() >= 0 and a.max() < 1000
    assert a.tolist() != select(scores, 50, "top").tolist()


def test_k_larger_than_dataset_clamps_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert select(np.array([0.2, 0.9, 0.5]), 500).tolist() == [1, 2, 0]
    assert "k=500 is larger than the 3 scored rows" in caplog.text


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown selection strategy 'best'"):
        select(np.zeros(3), 1, "best")
    with pytest.raises(ValueError, match="k must be at least 1"):
        select(np.zeros(3), 0)


def _train(path, n=10):
    rows = [Example(f"x{i}", chat(f"q{i}", f"a{i}")) for i in range(n)]
    write_examples(path, rows)
    return load_dataset(path, "train")


def test_write_selection_files(tmp_path):
    train = _train(tmp_path / "pool.parquet")
    scores = np.array([0, 9, 1, 8, 2, 7, 3, 6, 4, 5], dtype=float)
    chosen = select(scores, 3)
    sel, selected = write_selection(tmp_path / "out", train.ids, scores, chosen, train, {"k": 3})
    t = pq.read_table(sel).to_pydict()
    assert t == {"id": ["x1", "x3", "x5"], "rank": [1, 2, 3], "score": [9.0, 8.0, 7.0]}
    again = load_dataset(selected, "train")
    assert again.ids == ["x1", "x3", "x5"]  # dataset order
    assert again.examples[1] == train.examples[3]
    with pytest.raises(ValueError, match="scored id 'ghost' is not in the train dataset"):
        write_selection(tmp_path / "out2", ["ghost"] + train.ids[1:], scores, np.array([0]), train)


def test_cli_select(tmp_path):
    train = _train(tmp_path / "pool.parquet")
    scores = np.linspace(0, 1, 10)
    write_scores(tmp_path / "exp" / "scores.parquet", train.ids, scores)
    argv = ["select", str(tmp_path / "exp" / "scores.parquet"), "--train-dataset", str(train.path), "--k", "4"]
    assert main(argv + ["--strategy", "bottom"]) == 0
    assert pq.read_table(tmp_path / "exp" / "selection.parquet").column("id").to_pylist() == ["x0", "x1", "x2", "x3"]
    assert main(argv + ["--strategy", "random", "--seed", "3", "--out", str(tmp_path / "r")]) == 0
    got = pq.read_table(tmp_path / "r" / "selection.parquet").column("id").to_pylist()
    assert got == [train.ids[i] for i in select(scores, 4, "random", seed=3)]
    assert len(load_dataset(tmp_path / "r" / "selected.parquet", "train")) == 4
