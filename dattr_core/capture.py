"""The one forward/backward pass: z_in, z_out and G = ∂ℓ/∂z_out at block L for a batch.

Efficiency by construction:
- parameters are frozen, so no weight gradient is ever computed;
- block L's output is re-entered as a fresh leaf tensor, so the backward pass stops there and
  nothing below block L keeps a graph;
- the LM head runs only on positions that predict a target token (it is a large share of a
  small model's forward);
- each example's loss is the mean over its own target tokens, and examples in a batch do not
  interact, so summing the losses gives every example its own gradient in one backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .models import blocks


@dataclass
class Capture:
    """Block-L tensors of one batch (fp32 copies) and the masks that go with them."""

    z_in: torch.Tensor  # (B, T, D) input of block L
    z_out: torch.Tensor  # (B, T, D) output of block L
    grad: torch.Tensor  # (B, T, D) ∂ℓ_i/∂z_out for each example i (zeros if no backward)
    target_mask: torch.Tensor  # (B, T) bool: target tokens of the last reply
    attention_mask: torch.Tensor  # (B, T) bool: real (non-pad) tokens
    loss: torch.Tensor  # (B,) per-example mean target-token cross-entropy


def target_logits_loss(model: PreTrainedModel, hidden: torch.Tensor, input_ids: torch.Tensor,
                       target_mask: torch.Tensor) -> torch.Tensor:
    """Per-example loss from final hidden states, running the LM head only where it matters."""
    pred = target_mask[:, 1:]  # position t-1 predicts target token t
    b_idx, t_idx = pred.nonzero(as_tuple=True)
    logits = model.lm_head(hidden[b_idx, t_idx]).float()
    ce = torch.nn.functional.cross_entropy(logits, input_ids[b_idx, t_idx + 1], reduction="none")
    B = input_ids.shape[0]
    sums = torch.zeros(B, device=ce.device).index_add_(0, b_idx, ce)
    counts = torch.zeros(B, device=ce.device).index_add_(0, b_idx, torch.ones_like(ce))
    return sums / counts.clamp(min=1)


def capture(model: PreTrainedModel, layer: int, batch: dict[str, torch.Tensor], backward: bool = True) -> Capture:
    """Run the batch once; record block `layer`'s input/output and, with `backward`, G."""
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        z_in = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        seen["z_in"] = z_in.detach()
        leaf = out.detach().requires_grad_(backward)
        seen["z_out"] = leaf
        return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

    handle = blocks(model)[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.enable_grad() if backward else torch.inference_mode():
            hidden = model.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False,
            ).last_hidden_state
            loss = target_logits_loss(model, hidden, batch["input_ids"], batch["target_mask"])
            if backward:
                (g,) = torch.autograd.grad(loss.sum(), seen["z_out"])
            else:
                g = torch.zeros_like(seen["z_out"])
    finally:
        handle.remove()
    real = batch["attention_mask"].bool()
    keep = real[..., None]
    # Pad positions carry no information; zero them so nothing undefined there can leak into sums.
    return Capture(
        z_in=torch.where(keep, seen["z_in"].float(), 0.0), z_out=torch.where(keep, seen["z_out"].detach().float(), 0.0),
        grad=torch.where(keep, g.float(), 0.0), target_mask=batch["target_mask"].bool() & real,
        attention_mask=real, loss=loss.detach().float(),
    )
