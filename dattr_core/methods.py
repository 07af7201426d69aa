"""Attribution methods as functions of one `Capture` (design §3). Adding a method is a few lines.

Per-sequence methods map a capture to (B, D) vectors; paired methods (`rd`, `rc`) are the
difference of a per-sequence method between the treatment and the control reply.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .capture import Capture


def _n_targets(c: Capture) -> torch.Tensor:
    return c.target_mask.sum(1, keepdim=True).clamp(min=1).float()


def residual(c: Capture) -> torch.Tensor:
    """a(x): mean block-L output over the reply's target tokens."""
    m = c.target_mask.float()[..., None]
    return (m * c.z_out).sum(1) / _n_targets(c)


def grad(c: Capture) -> torch.Tensor:
    """−mean over target tokens of ∂ℓ/∂z_out (the cheap ablation)."""
    m = c.target_mask.float()[..., None]
    return -(m * c.grad).sum(1) / _n_targets(c)


def _rct(c: Capture, weights: torch.Tensor) -> torch.Tensor:
    """−(1/|m|) Σ_t m_t Σ_s w_s ⟨z_in,t, z_in,s⟩ g_s in O(T·D): u = Σ_t m_t z_in,t, c_s = w_s⟨u, z_in,s⟩."""
    m = c.target_mask.float()
    u = torch.einsum("bt,btd->bd", m, c.z_in)
    coef = weights.float() * torch.einsum("bd,btd->bt", u, c.z_in)
    return -torch.einsum("bt,btd->bd", coef, c.grad) / _n_targets(c)


def rct(c: Capture) -> torch.Tensor:
    """Residual change of the treatment reply, w_s = 1 on every real token (the default form)."""
    return _rct(c, c.attention_mask)


def rct_response(c: Capture) -> torch.Tensor:
    """Residual change with w_s = m_s (target positions only)."""
    return _rct(c, c.target_mask)


SEQUENCE_METHODS: dict[str, Callable[[Capture], torch.Tensor]] = {
    "residual": residual, "grad": grad, "rct": rct, "rct_response": rct_response,
}
# A paired method is (per-sequence method on treatment) − (same on control).
PAIRED_METHODS: dict[str, str] = {"rd": "residual", "rc": "rct"}
# The per-sequence method on the control reply alone (the `cos_sim_debias_eval` rule needs it).
CONTROL_METHODS: dict[str, str] = {"residual_control": "residual", "rct_control": "rct"}
ACTIVATION_METHODS = tuple(SEQUENCE_METHODS) + tuple(PAIRED_METHODS) + tuple(CONTROL_METHODS)
DEFAULT_METHODS = tuple(SEQUENCE_METHODS) + tuple(PAIRED_METHODS)
NEEDS_BACKWARD = {"grad", "rct", "rct_response", "rc", "rct_control"}


def check_methods(methods: list[str]) -> list[str]:
    unknown = [m for m in methods if m not in ACTIVATION_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown attribution method(s) {unknown or methods}; choose from {', '.join(ACTIVATION_METHODS)}")
    return list(dict.fromkeys(methods))


def sequence_methods_needed(methods: list[str]) -> list[str]:
    """The per-sequence methods to evaluate on each capture for the requested methods."""
    return list(dict.fromkeys(PAIRED_METHODS.get(m, CONTROL_METHODS.get(m, m)) for m in methods))


def needs_control(methods: list[str]) -> list[str]:
    """The requested methods that read the control reply."""
    return [m for m in methods if m in PAIRED_METHODS or m in CONTROL_METHODS]


def control_method_for(query_method: str) -> str:
    """Which control-reply vectors debias a query of `query_method` (same space, same block)."""
    return "rct_control" if query_method in ("rct", "rc", "rct_response", "grad") else "residual_control"
