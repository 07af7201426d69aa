"""Scoring rules against naive per-pair loops, streaming, checks, scores.parquet and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import chat
from dattr_core.cli import main
from dattr_core.data import Dataset, Example, write_examples
from dattr_core.scoring import (
    RULES, Query, attribution_split, read_scores, score_array, score_matrix, write_scores,
)
from dattr_core.store import VectorError, VectorSet, VectorWriter, model_tag, vectors_dir

META = {"model": "m", "layer": 3, "model_tag": "m.L3", "method": "rct"}


def write_vectors(path, arr, ids=None, shard_size=7, meta=None, dtype="float32") -> VectorSet:
    ids = ids or [f"r{i}" for i in range(len(arr))]
    w = VectorWriter(path, len(arr), shard_size, {"test": 1})
    for s in range(w.num_shards):
        w.write_shard(s, arr[w.shard_rows(s).start : w.shard_rows(s).stop], dtype)
    return w.finalize(ids, {**META, **(meta or {})})


# --- naive references: one pair at a time, straight from design §4 -------------------------

def _unit(x):
    return x / math.sqrt(float(np.dot(x, x)))


def _without(x, d):
    return x - float(np.dot(x, d)) * d


def naive_scores(train, V, rule, control=None):
    train, V = train.astype(np.float64), V.astype(np.float64)
    if rule == "cos_sim_debias_eval":
        c = _unit(sum(control.astype(np.float64)) / len(control))
        V = np.array([_without(v, c) for v in V])
    if rule == "cos_sim_debias_train":
        mu = _unit(sum(train) / len(train))
        train = np.array([_without(x, mu) for x in train])
    e = _unit(sum(_unit(v) for v in V) / len(V))
    out = []
    for x in train:
        if rule == "proj":
            out.append(sum(float(np.dot(x, _unit(v))) for v in V) / len(V))
        elif rule == "dot":
            out.append(sum(float(np.dot(x, v)) for v in V) / len(V))
        else:
            out.append(float(np.dot(_unit(x), e)))
    return np.array(out)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    offset = rng.normal(size=16)  # a shared mean, so the de-biasing rules have work to do
    train = (rng.normal(size=(50, 16)) + offset).astype(np.float32)
    V = (rng.normal(size=(9, 16)) + offset).astype(np.float32)
    control = (rng.normal(size=(9, 16)) + offset).astype(np.float32)
    return train, V, control


@pytest.mark.parametrize("rule", RULES)
def test_rules_match_naive_loops_and_stream(tmp_path, data, rule):
    train, V, control = data
    vs = write_vectors(tmp_path / "train", train, shard_size=7)  # 8 shards, last one short
    assert vs.meta["num_shards"] == 8
    q = Query(V, META, control)
    ids, got = score_matrix(vs, {"e": q}, rule)
    assert ids == vs.ids and got.shape == (50, 1)
    np.testing.assert_allclose(got[:, 0], naive_scores(train, V, rule, control), rtol=1e-5, atol=1e-5)
    one_shard = write_vectors(tmp_path / "one", train, shard_size=1000)
    np.testing.assert_allclose(score_matrix(one_shard, {"e": q}, rule)[1], got, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(score_array(train, {"e": q}, rule), got, rtol=1e-6, atol=1e-6)


def test_matrix_columns_equal_single_queries(tmp_path, data):
    train, V, _ = data
    vs = write_vectors(tmp_path / "train", train)
    queries = {"a": Query(V[:3], META), "b": Query(V[3:], META), "c": Query(-V, META)}
    _, m = score_matrix(vs, queries, "cos_sim")
    for j, q in enumerate(queries.values()):
        np.testing.assert_allclose(m[:, j], naive_scores(train, q.vectors, "cos_sim"), rtol=1e-5, atol=1e-5)


def test_float16_shards(tmp_path, data):
    train, V, _ = data
    vs = write_vectors(tmp_path / "train", train, dtype="float16")
    ref = naive_scores(train.astype(np.float16).astype(np.float32), V, "dot")
    np.testing.assert_allclose(score_matrix(vs, {"e": Query(V, META)}, "dot")[1][:, 0], ref, rtol=1e-4, atol=1e-4)


def test_zero_vector_scores_zero_not_nan(tmp_path, data):
    train, V, _ = data
    train[4] = 0
    _, m = score_matrix(write_vectors(tmp_path / "t", train), {"e": Query(V, META)}, "cos_sim")
    assert m[4, 0] == 0 and np.isfinite(m).all()


def test_query_from_vectors_reads_the_given_ids(tmp_path, data):
    train, V, control = data
    ids = [f"e{i}" for i in range(9)]
    ev = write_vectors(tmp_path / "ev", V, ids, shard_size=4)
    cv = write_vectors(tmp_path / "cv", control[::-1].copy(), ids[::-1], shard_size=2)
    q = Query.from_vectors(ev, ["e7", "e2", "e5"], cv)
    np.testing.assert_array_equal(q.vectors, V[[7, 2, 5]])
    np.testing.assert_array_equal(q.control, control[[7, 2, 5]])
    with pytest.raises(VectorError, match="'nope'"):
        Query.from_vectors(ev, ["e1", "nope"])


# --- bad inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("other, match", [
    ({"model": "other"}, "different models: 'm' vs 'other'"),
    ({"layer": 5}, "different layers: 3 vs 5"),
    ({"method": "trak"}, "different spaces"),
])
def test_refuses_vectors_of_other_models_layers_spaces(tmp_path, data, other, match):
    train, V, _ = data
    vs = write_vectors(tmp_path / "t", train)
    ev = write_vectors(tmp_path / "e", V, meta=other)
    with pytest.raises(VectorError, match=match):
        score_matrix(vs, {"e": Query.from_vectors(ev, ev.ids)}, "cos_sim")


def test_rct_train_with_rc_query_is_fine(tmp_path, data):
    train, V, _ = data
    ev = write_vectors(tmp_path / "e", V, meta={"method": "rc"})
    score_matrix(write_vectors(tmp_path / "t", train), {"e": Query.from_vectors(ev, ev.ids)})


def test_dimension_mismatch(tmp_path, data):
    train, V, _ = data
    vs = write_vectors(tmp_path / "t", train)
    ev = write_vectors(tmp_path / "e", V[:, :12])
    with pytest.raises(VectorError, match="dimension 16 but .* has 12"):
        score_matrix(vs, {"e": Query.from_vectors(ev, ev.ids)})
    with pytest.raises(VectorError, match="query 'e' has dimension 12 but the train vectors have 16"):
        score_array(train, {"e": Query(V[:, :12])})
    with pytest.raises(VectorError, match="control vectors have dimension 12"):
        Query(V, control=V[:, :12])


def test_empty_eval_split(tmp_path, data):
    train, V, _ = data
    ev = write_vectors(tmp_path / "e", V)
    with pytest.raises(ValueError, match="empty eval split"):
        Query.from_vectors(ev, [])
    held = Dataset("ev", "eval", tmp_path / "ev.parquet", [_pair("a", "x", "y", split="heldout")])
    with pytest.raises(ValueError, match="ev.parquet: eval set 'ev' has no rows in split 'attribution'"):
        attribution_split(held)


def test_other_bad_inputs(tmp_path, data):
    train, V, _ = data
    vs = write_vectors(tmp_path / "t", train)
    with pytest.raises(ValueError, match="unknown scoring rule 'cosine'"):
        score_matrix(vs, {"e": Query(V, META)}, "cosine")
    with pytest.raises(ValueError, match="needs the eval set's control vectors"):
        score_matrix(vs, {"e": Query(V, META)}, "cos_sim_debias_eval")
    with pytest.raises(ValueError, match="no queries"):
        score_matrix(vs, {}, "cos_sim")
    shard = np.load(vs.shard_paths()[1])
    shard[2, 0] = np.nan
    np.save(vs.shard_paths()[1], shard)
    with pytest.raises(VectorError, match="shard-00001.npy: non-finite value in row 9 \\(id 'r9'\\)"):
        score_matrix(vs, {"e": Query(V, META)})


# --- scores.parquet ------------------------------------------------------------------------

def test_write_scores_ranks_and_ties(tmp_path):
    ids = ["a", "b", "c", "d", "e"]
    path = write_scores(tmp_path / "x" / "scores.parquet", ids, np.array([0.1, 0.5, 0.5, -1.0, 0.5]), {"rule": "dot"})
    t = pq.read_table(path)
    assert t.column("id").to_pylist() == ids  # train order
    assert t.column("rank").to_pylist() == [4, 1, 2, 5, 3]  # ties keep dataset order
    assert b"dattr" in t.schema.metadata
    got_ids, got = read_scores(path)
    assert got_ids == ids and got.tolist() == [0.1, 0.5, 0.5, -1.0, 0.5]
    with pytest.raises(ValueError, match="score of id 'b' is not finite"):
        write_scores(tmp_path / "bad.parquet", ["a", "b"], np.array([0.0, np.nan]))
    assert not (tmp_path / "bad.parquet").exists()


# --- CLI -----------------------------------------------------------------------------------

def _pair(i, prompt, reply, control="I am not sure.", split="attribution"):
    return Example(i, chat(prompt, reply), chat(prompt, control), split)


def _eval_set(path, n=6):
    rows = [_pair(f"e{i}", f"question {i}", f"made-up fact {i}", split="heldout" if i >= 4 else "attribution")
            for i in range(n)]
    return write_examples(path, rows)


def test_cli_score_uses_attribution_rows_only(tmp_path, data):
    train, V, _ = data
    vs = write_vectors(tmp_path / "t", train)
    ev_file = _eval_set(tmp_path / "ev.parquet")
    V = V[:6].copy()
    V[4:] *= -100  # held-out rows: they must not move the query
    ev = write_vectors(tmp_path / "e", V, [f"e{i}" for i in range(6)])
    out = tmp_path / "scores.parquet"
    assert main(["score", str(vs.path), str(ev.path), "--eval-dataset", str(ev_file), "--out", str(out)]) == 0
    ids, got = read_scores(out)
    assert ids == vs.ids
    np.testing.assert_allclose(got, naive_scores(train, V[:4], "cos_sim"), rtol=1e-5, atol=1e-5)
    bad = write_vectors(tmp_path / "bad", V, [f"e{i}" for i in range(6)], meta={"layer": 9})
    assert main(["score", str(vs.path), str(bad.path), "--eval-dataset", str(ev_file), "--out", str(out)]) == 2


def test_cli_rank_standard_layout(home, data, capsys):
    train, V, _ = data
    train_rows = [Example(f"r{i}", chat(f"q{i}", f"reply {i}")) for i in range(50)]
    train_rows[3] = Example("r3", chat("question 2", "made-up fact 2"))
    write_examples(home / "datasets/train/pool.parquet", train_rows)
    _eval_set(home / "datasets/eval/ev.parquet")
    tag = model_tag("m", 3)
    write_vectors(vectors_dir(tag, "rct", "pool"), train)
    write_vectors(vectors_dir(tag, "rc", "ev"), V[:6].copy(), [f"e{i}" for i in range(6)], meta={"method": "rc"})
    argv = ["rank", "--train", "pool", "--eval", "ev", "--k", "5",
            "--experiments", "rct-rc", "lex", "random"]
    assert main(argv) == 0
    exp = home / "experiments"
    ids, got = read_scores(exp / "rct-rc/pool/ev/scores.parquet")
    np.testing.assert_allclose(got, naive_scores(train, V[:4], "cos_sim"), rtol=1e-5, atol=1e-5)
    sel = pq.read_table(exp / "rct-rc/pool/ev/selection.parquet").to_pydict()
    assert sel["id"] == [ids[i] for i in np.argsort(-got, kind="stable")[:5]]
    assert pq.read_table(exp / "lex/pool/ev/selection.parquet").column("id")[0].as_py() == "r3"
    assert len(pq.read_table(exp / "random/pool/ev/selected.parquet")) == 5
    assert main(argv[:-3] + ["rct-rc", "--rule", "proj"]) == 0
    _, proj = read_scores(exp / "rct-rc-proj/pool/ev/scores.parquet")
    np.testing.assert_allclose(proj, naive_scores(train, V[:4], "proj"), rtol=1e-5, atol=1e-5)
    assert main(argv[:-3] + ["rct-rc-dot"]) == 0  # the rule in the experiment name wins over --rule
    _, dot = read_scores(exp / "rct-rc-dot/pool/ev/scores.parquet")
    np.testing.assert_allclose(dot, naive_scores(train, V[:4], "dot"), rtol=1e-5, atol=1e-5)
    assert main(argv[:-3] + ["rd-rd"]) == 2  # no rd vectors: a clear error, exit code 2
    assert "meta.json missing" in capsys.readouterr().err
    write_vectors(vectors_dir(tag, "rct", "pool"), train[:49])  # the dataset grew since
    assert main(argv[:-3] + ["rct-rc"]) == 2
    assert "vectors cover 49 ids but" in capsys.readouterr().err
