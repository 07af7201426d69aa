"""LoRA fine-tuning on a selection of train examples (design §5), as a plain, readable torch loop.

Loss: next-token cross-entropy on the target tokens of the last assistant reply of
`treatment_messages` (mask from `models.encode_chat`), averaged per example first and then over
the batch. That is the same per-example loss ℓ the attribution methods differentiate (design §3),
so a long reply does not outweigh a short one, and a batch's loss does not depend on padding.

The adapter folder (`adapter_model.safetensors`, `adapter_config.json`, `train_config.json`,
`train_log.jsonl`, `summary.json`) is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import Example
from .models import Encoded, EncodingError, collate, encode_chat, per_example_loss
from .store import atomic_path

log = logging.getLogger(__name__)

LOSS_REDUCTION = "per-example mean over target tokens, then mean over the batch"
BUCKET_BATCHES = 50  # batches per length-sorting window: less padding, order still shuffled


@dataclass(frozen=True)
class FinetuneConfig:
    """Every training knob; the defaults are the original study's (design §5)."""

    r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 4
    epochs: int = 1
    max_tokens: int = 1024
    seed: int = 42
    max_grad_norm: float | None = 1.0  # Hugging Face Trainer's default; None turns clipping off

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        checks = {
            "r": self.r >= 1, "lora_alpha": self.lora_alpha > 0, "lora_dropout": 0 <= self.lora_dropout < 1,
            "target_modules": len(self.target_modules) > 0, "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0, "batch_size": self.batch_size >= 1,
            "epochs": self.epochs >= 1, "max_tokens": self.max_tokens >= 2,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid FinetuneConfig value(s) for {bad}: {self}")

    def lora_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")


def encode_examples(tok: PreTrainedTokenizerBase, examples: list[Example], max_tokens: int) -> list[Encoded]:
    """Treatment chats → token ids + target masks; an unusable row is named by its id."""
    out = []
    for ex in examples:
        try:
            out.append(encode_chat(tok, ex.treatment_messages, max_tokens))
        except EncodingError as e:
            raise EncodingError(f"example {ex.id!r}: {e}") from None
    return out


def batch_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches: seeded shuffle, length-sorted within windows, batch order shuffled."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * BUCKET_BATCHES
    batches = []
    for w in range(0, len(perm), window):
        chunk = sorted(perm[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def training_loss(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """The scalar that is minimised: see LOSS_REDUCTION."""
    return per_example_loss(logits, input_ids, target_mask).mean()


def train_lora(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example], config: FinetuneConfig = FinetuneConfig()
) -> tuple[PeftModel, list[dict[str, Any]]]:
    """Wrap `model` in fresh LoRA adapters and train them; returns the tuned model and a per-step log.

    peft injects the adapters into `model` itself (no copy: an 8B model is too big to copy), so the
    base behaviour afterwards is `with tuned.disable_adapter(): ...` or `tuned.unload()`.
    """
    if not examples:
        raise ValueError("cannot fine-tune on an empty selection")
    encoded = encode_examples(tok, examples, config.max_tokens)
    torch.manual_seed(config.seed)  # LoRA A matrices are random-initialised
    tuned = get_peft_model(model, config.lora_config())
    params = [p for p in tuned.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0 - step / total)  # linear to 0, no warm-up
    gen = torch.Generator().manual_seed(config.seed)
    lengths = [len(e.input_ids) for e in encoded]
    device, pad = tuned.device, tok.pad_token_id
    log.info("fine-tuning %d trainable parameters on %d examples: %d steps", sum(p.numel() for p in params),
             len(encoded), total)
    tuned.train()
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    for epoch in range(config.epochs):
        for idx in batch_order(lengths, config.batch_size, gen):
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad).items()}
            logits = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
            loss = training_loss(logits, batch["input_ids"], batch["target_mask"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {len(history)} (try a lower lr)")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            lr = sched.get_last_lr()[0]
            optim.step()
            sched.step()
            history.append({"step": len(history), "epoch": epoch, "loss": loss.item(), "lr": lr,
                            "examples": len(idx), "target_tokens": int(batch["target_mask"].sum()),
                            "seconds": round(time.perf_counter() - start, 3)})
            if len(history) % max(1, total // 10) == 0:
                log.info("step %d/%d loss %.4f", len(history), total, history[-1]["loss"])
    tuned.eval()
    return tuned, history


def summarize(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps, first/last loss and throughput of one training run."""
    seconds = history[-1]["seconds"]
    n = sum(h["examples"] for h in history)
    return {"steps": len(history), "examples_seen": n, "target_tokens_seen": sum(h["target_tokens"] for h in history),
            "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "seconds": seconds,
            "examples_per_s": n / seconds if seconds > 0 else None}


def save_adapter(tuned: PeftModel, adapter_dir: str | Path, config: FinetuneConfig, examples: list[Example],
                 history: list[dict[str, Any]]) -> Path:
    """Write the adapter folder atomically: complete or absent, an old one replaced whole."""
    adapter_dir = Path(adapter_dir)
    ids = sorted(e.id for e in examples)
    train_config = {
        "finetune": asdict(config), "loss": LOSS_REDUCTION,
        "base_model": getattr(tuned.get_base_model(), "name_or_path", None),
        "n_examples": len(examples), "example_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft")},
    }
    with atomic_path(adapter_dir) as tmp:
        tuned.save_pretrained(tmp)
        (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2), encoding="utf-8")
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summarize(history), indent=2), encoding="utf-8")
    return adapter_dir


def finetune(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example], adapter_dir: str | Path,
             config: FinetuneConfig = FinetuneConfig()) -> tuple[PeftModel, dict[str, Any]]:
    """Train LoRA adapters on `examples` and save them to `adapter_dir`; returns (tuned model, summary)."""
    tuned, history = train_lora(model, tok, examples, config)
    save_adapter(tuned, adapter_dir, config, examples, history)
    summary = summarize(history)
    log.info("adapter saved to %s: %s", adapter_dir, summary)
    return tuned, summary


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path) -> PeftModel:
    """Base model + a saved adapter, frozen and in eval mode."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: no complete adapter here (run `dattr finetune` first)")
    tuned = PeftModel.from_pretrained(model, str(adapter_dir))
    return tuned.eval().requires_grad_(False)
