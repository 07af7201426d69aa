"""`pv`: persona pairs from the trait's system prompts, and ψ_j = a(pos_j) − a(neg_j) at block L."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from dagster_fixtures import TRAIT, eval_examples
from dattr_core import methods as M
from dattr_core.attribute import AttributeConfig
from dattr_core.capture import capture
from dattr_core.data import DatasetError, load_dataset, write_examples
from dattr_core.generate import SamplingConfig
from dattr_core.models import collate, encode_chat
from dattr_core.persona import persona_vectors

PV_TRAIT = TRAIT.__class__(**{**TRAIT.__dict__, "positive_system_prompt": "Answer wrongly.",
                              "negative_system_prompt": "Answer correctly."})


def test_pv_is_mean_residual_difference_of_persona_replies(tiny, tok, home):
    ds = load_dataset(write_examples(home / "datasets" / "eval" / "ev.parquet", eval_examples(), PV_TRAIT), "eval")
    res = persona_vectors(ds, AttributeConfig(model="tiny", layer=1, root=str(home)), tiny, tok,
                          SamplingConfig(n_samples=1, max_new_tokens=5))
    vs = res.vectors["pv"]
    assert vs.meta["method"] == "pv" and vs.path.parent.name == "pv"
    assert set(vs.ids) <= {e.id for e in ds.split("attribution")}
    table = pq.read_table(next(home.glob("persona/*/ev.parquet"))).to_pylist()
    assert [r["id"] for r in table] == vs.ids
    row = table[0]
    assert row["treatment_messages"][0]["content"] == "Answer wrongly."
    assert row["control_messages"][0]["content"] == "Answer correctly."
    caps = [capture(tiny, 1, collate([encode_chat(tok, row[f])], tok.pad_token_id), backward=False)
            for f in ("treatment_messages", "control_messages")]
    ref = (M.residual(caps[0]) - M.residual(caps[1]))[0].numpy()
    np.testing.assert_allclose(vs.load()[0], ref, rtol=1e-4, atol=1e-6)


def test_pv_without_system_prompts_is_a_clear_error(tiny, tok, home):
    ds = load_dataset(write_examples(home / "datasets" / "eval" / "ev.parquet", eval_examples(), TRAIT), "eval")
    with pytest.raises(DatasetError, match="positive_system_prompt"):
        persona_vectors(ds, AttributeConfig(model="tiny", layer=1, root=str(home)), tiny, tok)
