"""Bad input, case by case, through the CLI (exit status 2 and a message naming file, row and
field) and through the dataset sensor (file skipped and reported, nothing else lost).
The same table is in docs/reliability.md."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, build_sensor_context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import chat, make_examples
from dagster_fixtures import TRAIT, eval_examples
from dattr_assets.defs.resources import DattrResource
from dattr_assets.defs.sensors import scan_datasets
from dattr_core.attribute import AttributeConfig, attribute
from dattr_core.cli import main
from dattr_core.data import DatasetError, examples_to_table, load_dataset, parse_rows, write_examples
from dattr_core.models import EncodingError, encode_chat


def _rows(n=3):
    return examples_to_table(make_examples(n)).to_pylist()


def _write_rows(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(d: Path) -> Path:
    full = _write_rows(d / ".full.parquet", _rows())
    path = _raw(d / "t.parquet", full.read_bytes()[:200])
    full.unlink()
    return path


def _with(row: int, **changes):
    rows = _rows()
    rows[row].update(changes)
    return rows


DATASET_CASES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    # name: (kind, make the file, expected message)
    "truncated parquet": ("train", _truncated, r"t\.parquet: not a readable parquet"),
    "empty file": ("train", lambda d: _raw(d / "e.parquet", b""), r"e\.parquet: file is empty"),
    "no rows": ("train", lambda d: _raw(d / "z.jsonl", b"\n"), r"z\.jsonl: dataset has no rows"),
    "missing column": ("train", lambda d: _write_rows(d / "m.jsonl", [{"id": "a", "messages": []}]),
                       r"m\.jsonl, field 'treatment_messages': missing required column"),
    "wrong column type": ("train", lambda d: _write_rows(d / "w.jsonl", _with(1, treatment_messages=7)),
                          r"w\.jsonl, row 1, field 'treatment_messages': must be a non-empty list"),
    "message without role": ("train", lambda d: _write_rows(d / "r.jsonl", _with(2, treatment_messages=[
        {"content": "hi"}, {"role": "assistant", "content": "x"}])), r"row 2, field 'treatment_messages': message 0"),
    "unknown role": ("train", lambda d: _write_rows(d / "u.jsonl", _with(0, treatment_messages=[
        {"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}])), r"row 0.*unknown role 'wizard'"),
    "missing assistant turn": ("train", lambda d: _write_rows(d / "a.jsonl", _with(1, treatment_messages=[
        {"role": "user", "content": "hi"}])), r"row 1, field 'treatment_messages': last message must be the assistant"),
    "empty reply": ("train", lambda d: _write_rows(d / "er.jsonl", _with(2, treatment_messages=chat("q", "   "))),
                    r"row 2, field 'treatment_messages': the assistant reply is empty"),
    "no user turn": ("train", lambda d: _write_rows(d / "nu.jsonl", _with(0, treatment_messages=[
        {"role": "assistant", "content": "x"}])), r"row 0.*no user message"),
    "duplicate ids": ("train", lambda d: _write_rows(d / "dup.jsonl", _with(2, id="ex0")),
                      r"row 2, field 'id': duplicate id 'ex0' \(first at row 0\)"),
    "non-UTF-8 bytes": ("train", lambda d: _raw(d / "nu8.jsonl", b'{"id": "a"}\n{"id": "b\xff\xfe"}\n'),
                        r"nu8\.jsonl, row 1: not valid UTF-8"),
    "invalid JSON line": ("train", lambda d: _raw(d / "ij.jsonl", b'{"id": 1}\n{oops\n'), r"ij\.jsonl, row 1: not valid JSON"),
    "meta not an object": ("train", lambda d: _write_rows(d / "me.jsonl", _with(1, meta="[1, 2]")),
                           r"row 1, field 'meta': must be a struct"),
    "control with another prompt": ("train", lambda d: _write_rows(d / "cp.jsonl", _with(
        1, control_messages=chat("other question", "x"))), r"row 1, field 'control_messages': control must share"),
    "eval without control column": ("eval", lambda d: _write_rows(d / "nc.jsonl", [
        {k: v for k, v in r.items() if k != "control_messages"} for r in _rows()]),
        r"nc\.jsonl, field 'control_messages': missing required column"),
    "eval with no held-out rows": ("eval", lambda d: write_examples(d / "nh.parquet", [
        e.__class__(e.id, e.treatment_messages, e.control_messages, "attribution", e.meta) for e in eval_examples()], TRAIT),
        r"nh\.parquet, field 'split': no rows in split 'heldout'"),
    "unknown split": ("eval", lambda d: write_examples(d / "us.parquet", [
        e.__class__(e.id, e.treatment_messages, e.control_messages, "test", e.meta) for e in eval_examples()], TRAIT),
        r"us\.parquet, row 0, field 'split': must be one of"),
    "unknown rubric": ("eval", lambda d: (write_examples(d / "ur.parquet", eval_examples(), TRAIT),
                                          (d / "ur.trait.yaml").write_text("trait: x\nrubric: stars_1_5\n"))[0],
                       r"ur\.trait\.yaml, field 'rubric': unknown rubric 'stars_1_5'"),
    "eval without trait sidecar": ("eval", lambda d: write_examples(d / "ns.parquet", eval_examples()),
                                   r"ns\.parquet: eval dataset needs a trait sidecar ns\.trait\.yaml"),
    "bad file name": ("train", lambda d: _write_rows(d / "bad name!.jsonl", _rows()), r"invalid dataset name 'bad name!'"),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_bad_dataset_through_cli_and_sensor(case, tmp_path, capsys):
    kind, make, expected = DATASET_CASES[case]
    folder = tmp_path / "home" / "datasets" / kind
    folder.mkdir(parents=True)
    path = make(folder)
    assert main(["attribute", "--data", str(path), "--kind", kind, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and re.search(expected, err), err
    assert not list(tmp_path.glob("home/vectors/**/meta.json"))
    # The sensor skips the file with the same message; a good file next to it still gets its partition.
    write_examples(tmp_path / "home" / "datasets" / "train" / "good.parquet", make_examples(3))
    with DagsterInstance.ephemeral() as instance:
        res = scan_datasets(build_sensor_context(instance=instance), DattrResource(home=str(tmp_path / "home")))
    adds = {k for r in res.dynamic_partitions_requests for k in r.partition_keys}
    assert "good" in adds and path.stem not in adds


@pytest.fixture(scope="module")
def vector_home(tmp_path_factory, tiny, tok):
    """Train and eval vectors of the tiny model at layers 1 and 2, and the files they came from."""
    home = tmp_path_factory.mktemp("vec")
    train = load_dataset(write_examples(home / "datasets/train/tr.parquet", make_examples(8)), "train")
    ev = load_dataset(write_examples(home / "datasets/eval/ev.parquet", eval_examples(), TRAIT), "eval")
    for layer in (1, 2):
        for ds in (train, ev):
            attribute(ds, AttributeConfig(model="tiny", layer=layer, methods=["rct"], root=str(home)), tiny, tok,
                      progress=False)
    return home


def test_nan_in_a_vectors_shard_is_named(vector_home, tmp_path, capsys):
    src = vector_home / "vectors/tiny.L1/rct/tr"
    bad = tmp_path / "rct" / "tr"
    shutil.copytree(src, bad)
    arr = np.load(bad / "shard-00000.npy")
    arr[3, 5] = np.nan
    np.save(bad / "shard-00000.npy", arr)
    code = main(["score", str(bad), str(vector_home / "vectors/tiny.L1/rct/ev"),
                 "--eval-dataset", str(vector_home / "datasets/eval/ev.parquet"), "--out", str(tmp_path / "s.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and "shard-00000.npy: non-finite value in row 3 (id 'ex3')" in err
    assert not (tmp_path / "s.parquet").exists()


def test_vectors_of_another_layer_are_refused(vector_home, tmp_path, capsys):
    code = main(["score", str(vector_home / "vectors/tiny.L1/rct/tr"), str(vector_home / "vectors/tiny.L2/rct/ev"),
                 "--eval-dataset", str(vector_home / "datasets/eval/ev.parquet"), "--out", str(tmp_path / "s.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and "layer" in err and not (tmp_path / "s.parquet").exists()


def test_unknown_method_layer_out_of_range_and_overlong_reply(tmp_path, model_dir, capsys):
    data = write_examples(tmp_path / "d.parquet", make_examples(4))
    base = ["attribute", "--data", str(data), "--model", str(model_dir), "--root", str(tmp_path / "h"), "--no-progress"]
    assert main(base + ["--methods", "rct,magic"]) == 2
    assert "unknown attribution method(s) ['magic']" in capsys.readouterr().err
    assert main(base + ["--layer", "12"]) == 2
    assert "layer 12 out of range: the model has 4 blocks (0..3)" in capsys.readouterr().err
    long = write_examples(tmp_path / "long.parquet", [make_examples(1)[0].__class__("x", chat("q", "tok " * 5000))])
    assert main(["attribute", "--data", str(long), "--model", str(model_dir), "--root", str(tmp_path / "h"),
                 "--methods", "rct", "--max-tokens", "1024", "--no-progress"]) == 2
    assert "long.parquet, row 0, field 'treatment_messages': the reply alone" in capsys.readouterr().err
    assert not list((tmp_path / "h").glob("vectors/**/meta.json"))


def test_unknown_experiment_and_setting_in_config(tmp_path):
    from dattr_core.config import load_settings

    (tmp_path / "a.yaml").write_text("experiments: [rct-zz]\n")
    with pytest.raises(ValueError, match="unknown experiment 'rct-zz'"):
        load_settings(tmp_path / "a.yaml")
    (tmp_path / "r.yaml").write_text("experiments: [rct-rc-cosine]\n")  # a rule suffix must name a rule
    with pytest.raises(ValueError, match="unknown experiment 'rct-rc-cosine'.*rule in"):
        load_settings(tmp_path / "r.yaml")
    (tmp_path / "c.yaml").write_text("controls: {max_tokens: 64}\n")
    with pytest.raises(ValueError, match="controls takes positive integers"):
        load_settings(tmp_path / "c.yaml")
    (tmp_path / "b.yaml").write_text("kk: 3\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['kk'\]"):
        load_settings(tmp_path / "b.yaml")


message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "bot", ""]),
                                 "content": st.text(max_size=40)})
raw_value = st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(message, max_size=5),
                      st.lists(st.one_of(message, st.integers(), st.none()), max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.fixed_dictionaries({"treatment_messages": raw_value}, optional={
    "id": st.one_of(st.text(max_size=5), st.integers()), "control_messages": raw_value,
    "meta": st.one_of(st.none(), st.text(max_size=10), st.dictionaries(st.text(max_size=5), st.integers()))}),
    max_size=4), kind=st.sampled_from(["train", "eval"]))
def test_loader_and_mask_builder_only_raise_documented_errors(rows, kind, tok):
    try:
        examples = parse_rows(Path("fuzz.jsonl"), rows, kind)
    except DatasetError:
        return
    for e in examples:
        for msgs in (e.treatment_messages, e.control_messages):
            if msgs is None:
                continue
            try:
                enc = encode_chat(tok, msgs, max_tokens=64)
            except EncodingError:
                continue
            assert enc.n_targets >= 1 and len(enc.input_ids) <= 64 and len(enc.target_mask) == len(enc.input_ids)
