"""Replies from the base or a tuned model: sampled on held-out prompts for judging (design §5),
greedy for the `controls` step that gives train rows without a control reply the base model's own.

Prompts are batched with left padding (generation appends on the right). Each batch re-seeds
torch (`seed + batch index`), so the same inputs, batch size and hardware give the same replies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import Dataset, Example, Message
from .store import atomic_path, dattr_home

CONTROLS_MAX_NEW_TOKENS = 512  # defaults of the greedy control replies (settings `controls:`)
CONTROLS_BATCH_SIZE = 8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """How replies are drawn; the defaults are the original study's (design §5)."""

    n_samples: int = 3
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 512
    batch_size: int = 8  # prompts per `generate` call (each expands to n_samples sequences)
    seed: int = 42
    do_sample: bool = True

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"n_samples, max_new_tokens and batch_size must be >= 1: {self}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1: {self}")
        if not self.do_sample and self.n_samples != 1:
            raise ValueError("greedy decoding gives one reply per prompt: set n_samples=1")

    @classmethod
    def greedy(cls, **overrides: Any) -> "SamplingConfig":
        return cls(**{"n_samples": 1, "do_sample": False, **overrides})

    def generate_kwargs(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> dict[str, Any]:
        """Explicit settings, so a checkpoint's own generation_config (temperature, top_k) can't leak in."""
        eos = model.generation_config.eos_token_id
        eos = (set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}) - {None}
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                              "num_return_sequences": self.n_samples, "pad_token_id": tok.pad_token_id,
                              "eos_token_id": sorted(eos)}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=0)  # top_k=0: no top-k cut
        return kw


@torch.inference_mode()
def generate_replies(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[list[Message]],
                     config: SamplingConfig = SamplingConfig()) -> list[list[str]]:
    """For each prompt (a chat without the reply), `config.n_samples` reply texts."""
    kwargs = config.generate_kwargs(model, tok)
    out: list[list[str]] = []
    for b, start in enumerate(range(0, len(prompts), config.batch_size)):
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[start : start + config.batch_size]]
        enc = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        enc = enc.to(model.device)
        torch.manual_seed(config.seed + b)
        seqs = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
        replies = [r.strip() for r in tok.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
        out += [replies[i : i + config.n_samples] for i in range(0, len(replies), config.n_samples)]
        log.info("generated %d/%d prompts", len(out), len(prompts))
    return out


def generate_heldout(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example],
                     out_path: str | Path, config: SamplingConfig = SamplingConfig(), *, model_name: str,
                     adapter: str | None = None) -> Path:
    """Sample replies to the examples' prompts and write `generations.parquet` atomically.

    One row per (id, sample): id, sample, prompt_messages (JSON), reply, model, adapter (None for base).
    """
    if not examples:
        raise ValueError("no prompts to generate for (is the held-out split empty?)")
    replies = generate_replies(model, tok, [e.prompt for e in examples], config)
    rows = [(e.id, s, json.dumps(e.prompt, ensure_ascii=False), r)
            for e, rs in zip(examples, replies) for s, r in enumerate(rs)]
    table = pa.table({
        "id": pa.array([r[0] for r in rows], pa.string()),
        "sample": pa.array([r[1] for r in rows], pa.int32()),
        "prompt_messages": pa.array([r[2] for r in rows], pa.string()),
        "reply": pa.array([r[3] for r in rows], pa.string()),
        "model": pa.array([model_name] * len(rows), pa.string()),
        "adapter": pa.array([adapter] * len(rows), pa.string()),
    }).replace_schema_metadata({"sampling": json.dumps(dataclasses.asdict(config))})
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)
    return out_path


def controls_cache_path(dataset: Dataset, missing: list[Example], model_name: str, config: SamplingConfig,
                        cache_dir: str | Path | None = None) -> Path:
    """One cache file per (model, the prompts that need a control, generation settings)."""
    key = json.dumps({"model": model_name, "config": dataclasses.asdict(config),
                      "prompts": [[e.id, e.prompt] for e in missing]}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir or dattr_home() / "cache" / "controls") / f"{dataset.name}.{digest}.parquet"


def fill_controls(dataset: Dataset, model: PreTrainedModel, tok: PreTrainedTokenizerBase, *,
                  model_name: str | None = None, max_new_tokens: int = CONTROLS_MAX_NEW_TOKENS,
                  batch_size: int = CONTROLS_BATCH_SIZE,
                  cache_dir: str | Path | None = None) -> list[Example]:
    """The dataset's examples, each missing control reply filled with the model's greedy reply.

    Generated once per (model, dataset) and cached as parquet (id, reply). A reply that comes
    out empty leaves that control missing (logged), since an empty reply has no target tokens.
    """
    missing = [e for e in dataset.examples if e.control_messages is None]
    if not missing:
        return list(dataset.examples)
    name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    config = SamplingConfig.greedy(max_new_tokens=max_new_tokens, batch_size=batch_size)
    cache = controls_cache_path(dataset, missing, name, config, cache_dir)
    if cache.exists():
        t = pq.read_table(cache)
        replies = dict(zip(t.column("id").to_pylist(), t.column("reply").to_pylist()))
    else:
        log.info("generating %d control replies for %s with %s", len(missing), dataset.name, name)
        got = generate_replies(model, tok, [e.prompt for e in missing], config)
        replies = {e.id: r[0] for e, r in zip(missing, got)}
        with atomic_path(cache) as tmp:
            pq.write_table(pa.table({"id": pa.array(list(replies), pa.string()),
                                     "reply": pa.array(list(replies.values()), pa.string())}), tmp)
    empty = [i for i, r in replies.items() if not r.strip()]
    if empty:
        log.warning("%s: %d greedy control replies are empty; those rows keep no control (e.g. %r)",
                    dataset.name, len(empty), empty[:3])
    return [e if e.control_messages is not None or not replies[e.id].strip()
            else dataclasses.replace(e, control_messages=[*e.prompt, {"role": "assistant", "content": replies[e.id]}])
            for e in dataset.examples]
