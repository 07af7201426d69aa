"""`trak`, the weight-space baseline: per-example ∇ℓ(treatment) w.r.t. the weights of every linear
projection (q, k, v, o, gate, up, down) of every block, reduced to 4096 dims by a fixed random
projection (design §3).

No per-example gradient is ever materialised. For a linear layer y = W x the per-example weight
gradient is a sum of outer products over the example's tokens, ∇_W ℓ = Σ_t g_t x_tᵀ (g = ∂ℓ/∂y),
so a Kronecker-factored projection of it needs only projected activations and output gradients:

    P_out (Σ_t g_t x_tᵀ) P_inᵀ = Σ_t (P_out g_t)(P_in x_t)ᵀ          (k_out × k_in = 4096 numbers)

P_in x_t is taken in a forward hook, P_out g_t in a hook on the output's gradient, and the sum
over tokens is one batched matmul per module, so the whole batch costs one forward and one
backward (input gradients only; parameters stay frozen). The vector of an example is the sum over
modules of these per-module projections: a block-structured random projection of the
concatenated gradient (each module gets its own independent factors, so cross-module terms
vanish in expectation and inner products are preserved in expectation).

The factors are Rademacher (±1) scaled by 1/√k, drawn from a `torch.Generator` seeded with
sha256(seed, module name): integer draws, so the same bits on every process, run and machine
(float `torch.randn` on CPU takes an AVX2-only Box–Muller path whose last bits differ between
CPUs). A sha256 of all factors goes into the vectors' fingerprint, so shards made with other
factors are never mixed in.

Output: `vectors/{model_tag}/trak/{dataset}/`, with the same shards, index, meta.json, resume and
`torchrun` split as the activation methods (`dattr_core.attribute`).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .attribute import (AttributeConfig, AttributeResult, _encode, length_batches, model_revision, run_meta, run_shards,
                        vector_writers)
from .capture import target_logits_loss
from .data import Dataset
from .models import DEMO_MODEL, Encoded, blocks, check_layer, collate, default_layer, load_model, resolve_model
from .store import file_sha256, model_tag

METHOD = "trak"
DEFAULT_DIM = 4096
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTION_VERSION = "kron-rademacher-sha256-v1"  # bump if the way factors are drawn ever changes


# ---------------------------------------------------------------------------------------------
# The projection


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, module name) — sha256, never Python's salted hash()."""
    digest = hashlib.sha256(f"dattr-trak/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def factor_dims(dim: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out · k_in = dim and the two as close as possible (4096 → 64 × 64)."""
    if dim < 1:
        raise ValueError(f"projection dim must be positive, got {dim}")
    k_out = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return k_out, dim // k_out


def rademacher(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """±1 entries (float32) from integer draws: bit-identical on every CPU."""
    return torch.randint(0, 2, shape, generator=generator, dtype=torch.uint8).float().mul_(2).sub_(1)


class KroneckerProjector:
    """One independent factored projection per linear module, all into the same `dim` space.

    For module m with weight (out, in): P_out^m (k_out × out), P_in^m (k_in × in), entries
    ±1/√k_out and ±1/√k_in, so E‖P_out G P_inᵀ‖² = ‖G‖² and E⟨proj G, proj H⟩ = ⟨G, H⟩.
    The full vector is Σ_m vec(P_out^m G_m P_in^mᵀ) (row-major: index o·k_in + i).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], dim: int = DEFAULT_DIM, seed: int = 0):
        if not shapes:
            raise ValueError("nothing to project: no linear modules given")
        self.shapes = dict(shapes)  # name → (out_features, in_features)
        self.dim, self.seed = dim, seed
        self.k_out, self.k_in = factor_dims(dim)
        self._cpu: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._dev: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._sha: str | None = None

    @classmethod
    def for_model(cls, model: PreTrainedModel, dim: int = DEFAULT_DIM, seed: int = 0,
                  names: tuple[str, ...] = LINEAR_NAMES) -> "KroneckerProjector":
        return cls({n: (m.out_features, m.in_features) for n, m in linear_modules(model, names).items()}, dim, seed)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out, P_in) of one module, float32 on CPU, scaled."""
        if name not in self._cpu:
            out, inp = self.shapes[name]
            g = torch.Generator(device="cpu").manual_seed(stable_seed(self.seed, name))
            p_out = rademacher((self.k_out, out), g).div_(math.sqrt(self.k_out))
            p_in = rademacher((self.k_in, inp), g).div_(math.sqrt(self.k_in))
            self._cpu[name] = (p_out, p_in)
        return self._cpu[name]

    def device_factors(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_outᵀ, P_inᵀ) contiguous on `device`, ready to right-multiply activations."""
        key = (name, str(device))
        if key not in self._dev:
            p_out, p_in = self.factors(name)
            self._dev[key] = (p_out.t().contiguous().to(device), p_in.t().contiguous().to(device))
        return self._dev[key]

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The explicit projection of full weight gradients {name: (out, in)} → (dim,) (a reference;
        the fast path never builds these matrices)."""
        total = torch.zeros(self.k_out, self.k_in, dtype=torch.float64)
        for name, G in grads.items():
            p_out, p_in = self.factors(name)
            total += p_out.double() @ G.double() @ p_in.double().t()
        return total.reshape(-1).float()

    def sha256(self) -> str:
        """A digest of every factor: equal digests ⇔ the same projection."""
        if self._sha is None:
            h = hashlib.sha256(f"{PROJECTION_VERSION}/{self.dim}/{self.seed}".encode())
            for name in sorted(self.shapes):
                h.update(name.encode())
                for p in self.factors(name):
                    h.update(p.numpy().tobytes())
            self._sha = h.hexdigest()
        return self._sha

    def describe(self) -> dict:
        return {"kind": PROJECTION_VERSION, "dim": self.dim, "k_out": self.k_out, "k_in": self.k_in,
                "seed": self.seed, "modules": len(self.shapes),
                "params": sum(o * i for o, i in self.shapes.values()), "sha256": self.sha256()}


def linear_modules(model: PreTrainedModel, names: tuple[str, ...] = LINEAR_NAMES) -> dict[str, torch.nn.Linear]:
    """Every `nn.Linear` in the blocks whose own name is one of `names`, keyed "{block}.{path}"
    (e.g. "3.self_attn.q_proj"): stable names, so the projection does not depend on wrappers."""
    found = {f"{i}.{n}": m for i, block in enumerate(blocks(model)) for n, m in block.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names}
    if not found:
        raise TypeError(f"{type(model).__name__}: no linear modules named {names} in its blocks")
    return found


# ---------------------------------------------------------------------------------------------
# The fast batched pass


def project_batch(model: PreTrainedModel, batch: dict[str, torch.Tensor], proj: KroneckerProjector) -> torch.Tensor:
    """Projected per-example gradients (B, dim), fp32, from one forward and one backward.

    ℓ_i = mean next-token CE over example i's own target tokens; examples do not interact, so
    the gradient of Σ_i ℓ_i restricted to example i's positions is ∇ℓ_i. Pad positions add
    nothing, so a vector does not depend on its batch or on the padding side.
    """
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    B = batch["input_ids"].shape[0]
    # 1 on real tokens, 0 on padding. Output gradients at pad positions are exactly zero (no
    # real position reads a pad position), and P_in x is zeroed there too, so pads add nothing.
    real = batch["attention_mask"].to(torch.float32)[..., None]
    acc = torch.zeros(B, proj.k_out, proj.k_in, dtype=torch.float32, device=dev)
    modules = linear_modules(model, tuple({n.rsplit(".", 1)[-1] for n in proj.shapes}))
    if set(modules) != set(proj.shapes):
        raise ValueError("the projector was built for another model (its module names differ)")

    def hook_for(name: str) -> Callable:
        p_out_t, p_in_t = proj.device_factors(name, dev)

        def forward_hook(module, args, out):
            xp = (args[0].float() @ p_in_t).mul_(real)  # (B, T, k_in)

            def grad_hook(g):
                gp = g.float() @ p_out_t  # (B, T, k_out)
                acc.baddbmm_(gp.transpose(1, 2), xp)  # Σ_t (P_out g_t)(P_in x_t)ᵀ per example

            out.register_hook(grad_hook)

        return forward_hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    try:
        with torch.enable_grad():
            # Frozen weights: a leaf embedding that requires grad carries the backward to block 0.
            emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
            hidden = model.model(inputs_embeds=emb, attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], use_cache=False).last_hidden_state
            loss = target_logits_loss(model, hidden, batch["input_ids"], batch["target_mask"])
            torch.autograd.grad(loss.sum(), emb)
    finally:
        for h in handles:
            h.remove()
    return acc.reshape(B, -1)


def trak_vectors(model: PreTrainedModel, encoded: list[Encoded], proj: KroneckerProjector, pad_id: int,
                 batch_tokens: int = 8192, max_batch: int = 64) -> np.ndarray:
    """(N, dim) float32 trak vectors of encoded chats, in input order, length-bucketed batches."""
    out = np.zeros((len(encoded), proj.dim), np.float32)
    for idx in length_batches([len(e.input_ids) for e in encoded], batch_tokens, max_batch):
        out[idx] = project_batch(model, collate([encoded[i] for i in idx], pad_id), proj).cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------
# Slow reference (tests, benchmark): full weight gradients by autograd, one example at a time


def exact_weight_grads(model: PreTrainedModel, encoded: list[Encoded], pad_id: int,
                       names: tuple[str, ...] = LINEAR_NAMES) -> list[dict[str, torch.Tensor]]:
    """Per example, {module: ∂ℓ/∂W (out, in)}: plain autograd, batch size 1, on a copy of the model
    with trainable linear weights; ℓ from the logits of every position (the LM head on all of
    them, then the target mask), independent of the fast path's target-only head."""
    m = copy.deepcopy(model).requires_grad_(False)
    weights = {n: mod.weight.requires_grad_(True) for n, mod in linear_modules(m, names).items()}
    dev = next(m.parameters()).device
    out = []
    for enc in encoded:
        batch = {k: v.to(dev) for k, v in collate([enc], pad_id).items()}
        with torch.enable_grad():
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
            # (positions, vocab) layout: CPU cross-entropy over a strided class dim is less exact
            ce = torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch["input_ids"][0, 1:], reduction="none")
            mask = batch["target_mask"][0, 1:].float()
            loss = (ce * mask).sum() / mask.sum()
            grads = torch.autograd.grad(loss, list(weights.values()))
        out.append({n: g.detach().float().cpu() for n, g in zip(weights, grads)})
    return out


# ---------------------------------------------------------------------------------------------
# Dataset → vectors folder (the activation methods' shard driver: layout, resume, torchrun split)


@dataclass
class TrakConfig(AttributeConfig):
    """`AttributeConfig` plus the projection. `layer` only names the folder (`model_tag`), so trak
    vectors sit next to the activation vectors of the same model and layer."""

    methods: list[str] = field(default_factory=lambda: [METHOD])
    proj_dim: int = DEFAULT_DIM
    seed: int = 0


def attribute_trak(ds: Dataset, cfg: TrakConfig | None = None, model: PreTrainedModel | None = None,
                   tok: PreTrainedTokenizerBase | None = None, progress: bool = True,
                   projector: KroneckerProjector | None = None) -> AttributeResult:
    """Compute (or resume) the `trak` vectors of the treatment replies of one dataset."""
    cfg = cfg or TrakConfig()
    path = resolve_model(cfg.model)
    if model is None or tok is None:
        model, tok = load_model(path, cfg.device, cfg.dtype)
    layer = check_layer(model, default_layer(len(blocks(model))) if cfg.layer is None else cfg.layer)
    proj = projector or KroneckerProjector.for_model(model, cfg.proj_dim, cfg.seed)
    if (proj.dim, proj.seed) != (cfg.proj_dim, cfg.seed):
        raise ValueError(f"projector (dim {proj.dim}, seed {proj.seed}) does not match the config "
                         f"(proj_dim {cfg.proj_dim}, seed {cfg.seed})")
    name = cfg.model or DEMO_MODEL
    tag = model_tag(name, layer)
    fingerprint = {"dataset_sha256": file_sha256(ds.path), "model": name, "model_revision": model_revision(model, path),
                   "layer": layer, "max_tokens": cfg.max_tokens, "shard_size": cfg.shard_size,
                   "storage_dtype": cfg.storage_dtype, "rows": len(ds),
                   "loss": "mean target-token CE of the treatment reply", "projection": proj.describe()}
    writers = vector_writers(ds, cfg, tag, [METHOD], fingerprint)

    def shard_fn(rows: list[int]) -> tuple[dict[str, np.ndarray], int]:
        enc = [_encode(ds, tok, r, "treatment_messages", cfg.max_tokens) for r in rows]
        vecs = trak_vectors(model, enc, proj, tok.pad_token_id, cfg.batch_tokens, cfg.max_batch)
        return {METHOD: vecs}, sum(len(e.input_ids) for e in enc)

    return run_shards(ds, cfg, writers, shard_fn, run_meta(ds, cfg, model, tag), progress, desc=f"trak {ds.name}")
