"""The judge-free preference gap (design §5) and writing `metrics.json`.

gap = mean CE(treatment reply) − mean CE(control reply) over held-out pairs, where CE is the
per-example mean next-token cross-entropy on the reply's target tokens. A model that prefers the
trait assigns the treatment reply lower CE, so tuning toward the trait lowers the gap:
drop = gap(base) − gap(tuned) > 0 means the tuned model moved toward the trait.
(The judge summary, `{trait}_avg` and shares, lives in `judge/summary.py`.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import Example, Message
from .models import EncodingError, collate, encode_chat, per_example_loss
from .store import atomic_path


@torch.inference_mode()
def chat_losses(model: PreTrainedModel, tok: PreTrainedTokenizerBase, chats: list[list[Message]],
                batch_size: int = 8, max_tokens: int = 1024, names: list[str] | None = None) -> torch.Tensor:
    """Per-chat mean target-token CE of the last reply, shape (N,), fp32 on CPU, in input order.

    Batches are formed from length-sorted chats (less padding); each value is per example, so
    it does not depend on the batch it landed in. `names` label the chats in encoding errors.
    """
    encoded = []
    for i, c in enumerate(chats):
        try:
            encoded.append(encode_chat(tok, c, max_tokens))
        except EncodingError as e:
            raise EncodingError(f"{names[i] if names else f'chat {i}'}: {e}") from None
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    out = torch.empty(len(encoded), dtype=torch.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        b = {k: v.to(model.device) for k, v in collate([encoded[i] for i in idx], tok.pad_token_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
        out[idx] = per_example_loss(logits, b["input_ids"], b["target_mask"]).float().cpu()
    return out


def preference_gap(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example],
                   batch_size: int = 8, max_tokens: int = 1024) -> dict[str, float | int]:
    """{ce_treatment, ce_control, gap, n} over matched pairs (treatment and control scored in one pass)."""
    if not examples:
        raise ValueError("preference gap needs at least one matched pair")
    unpaired = [e.id for e in examples if e.control_messages is None]
    if unpaired:
        raise ValueError(f"preference gap needs control replies; missing for ids {unpaired[:5]}")
    chats = [e.treatment_messages for e in examples] + [e.control_messages for e in examples]
    names = [f"example {e.id!r} {side}" for side in ("treatment_messages", "control_messages") for e in examples]
    ce = chat_losses(model, tok, chats, batch_size, max_tokens, names)  # type: ignore[arg-type]
    n = len(examples)
    ce_t, ce_c = ce[:n].mean().item(), ce[n:].mean().item()
    return {"ce_treatment": ce_t, "ce_control": ce_c, "gap": ce_t - ce_c, "n": n}


def preference_metrics(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json block for one (experiment, train, eval): both gaps and the drop."""
    return {"preference_gap": {"base": base, "tuned": tuned, "drop": base["gap"] - tuned["gap"]}}


def _finite(obj: Any, where: str = "metrics") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}: metrics must be finite numbers")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    """Write metrics.json atomically; NaN/inf are refused (they are not valid JSON for other readers)."""
    _finite(metrics)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False), encoding="utf-8")
    return path
