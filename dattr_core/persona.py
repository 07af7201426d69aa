"""`pv`, the persona-vector query (design §3): for each eval prompt, the model's own reply under
the trait's positive and negative system prompts; ψ_j = a(pos_j) − a(neg_j) at block L's output.

The pairs go through the same one-pass engine as `rd` (treatment = positive, control = negative),
written to the `pv` vectors folder, so `pv` shares the layer indexing, batching and storage of
every other method.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .attribute import AttributeConfig, AttributeResult, attribute
from .data import Dataset, DatasetError, Example, examples_to_table
from .generate import SamplingConfig, generate_replies
from .store import atomic_path, dattr_home, model_slug


def persona_pairs(eval_ds: Dataset, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                  sampling: SamplingConfig) -> list[Example]:
    """(positive-system chat + its reply, negative-system chat + its reply) per attribution prompt."""
    trait = eval_ds.trait
    if trait is None or not trait.positive_system_prompt or not trait.negative_system_prompt:
        raise DatasetError(eval_ds.path, "the pv query needs positive_system_prompt and negative_system_prompt in "
                           "the trait sidecar", field="positive_system_prompt")
    rows = eval_ds.split("attribution")
    user_turns = [[m for m in e.prompt if m["role"] != "system"] for e in rows]
    pos = [[{"role": "system", "content": trait.positive_system_prompt}, *u] for u in user_turns]
    neg = [[{"role": "system", "content": trait.negative_system_prompt}, *u] for u in user_turns]
    replies = generate_replies(model, tok, pos + neg, sampling)
    n = len(rows)
    out = []
    for j, e in enumerate(rows):
        rp, rn = replies[j][0], replies[n + j][0]
        if not rp.strip() or not rn.strip():
            continue  # an empty reply has no target tokens; the query is a mean over the rest
        out.append(Example(e.id, pos[j] + [{"role": "assistant", "content": rp}],
                           neg[j] + [{"role": "assistant", "content": rn}], "attribution",
                           {"source": "persona", "system": "positive/negative"}))
    if not out:
        raise DatasetError(eval_ds.path, "every persona reply came out empty; no pv query can be built")
    return out


def persona_vectors(eval_ds: Dataset, cfg: AttributeConfig, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                    sampling: SamplingConfig | None = None, model_name: str | None = None) -> AttributeResult:
    """Generate the persona pairs (saved next to the vectors for inspection) and their `pv` vectors."""
    sampling = sampling or SamplingConfig.greedy(max_new_tokens=64)
    pairs = persona_pairs(eval_ds, model, tok, sampling)
    path = dattr_home(cfg.root) / "persona" / model_slug(model_name or cfg.model or "demo") / f"{eval_ds.name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(examples_to_table(pairs), tmp)
    ds = Dataset(eval_ds.name, "eval", Path(path), pairs, eval_ds.trait)
    return attribute(ds, AttributeConfig(**{**cfg.__dict__, "methods": ["rd"], "folders": {"rd": "pv"}}),
                     model, tok, progress=False)
