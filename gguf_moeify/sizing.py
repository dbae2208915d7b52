"""Expert counts from the model and the requested active fraction: the one place that turns ``--active f`` (or a
bench/quality-table fraction) into E experts, S shared and K routed experts per token, for every command.

A fraction f of the MLP's d_ff neurons per token is n = round(f * E) experts' worth, E from d_ff:
- ``finegrained``: experts of 32 neurons (``fine_experts``: E = d_ff / 32, wider while E > 512),
  S = n // 3 shared, K = n - S (SmolLM2, d_ff 1536, 50%: S8A16E48; Llama-3-8B, d_ff 14336, 50%: S74A150E448);
- ``cmoe`` and ``mlpmoe`` below 1 (the naive routed slicing baseline): E = the divisor of d_ff nearest 16,
  S = max(1, n // 2), K = n - S (CMoE's SxAxE pattern: 25% -> S2A2E16, 50% -> S4A4E16);
- ``moefication``: E nearest 16, no shared expert, K = n;
- ``mlpmoe`` at f = 1: E nearest 8, every expert active (exact slicing);
- ``tomoe``: trained to the fraction (its budget), top-1 of E = 8 masks.
An explicit E (``--experts``) replaces the derived one; shared and top-k given explicitly win over S and K.
"""
from __future__ import annotations

import math

from .errors import UserError

DEFAULT_ACTIVE = 0.5            # routed methods, when neither --active nor -S/-K says otherwise
COARSE_EXPERTS = 16             # cmoe / moefication / routed slicing: CMoE's and MoEfication's expert counts
SLICE_EXPERTS = 8               # mlpmoe at f = 1
TOMOE_EXPERTS = 8               # tomoe: E trained masks, top-1
MAX_EXPERTS = 512               # finegrained's default E stays within older llama.cpp builds' LLAMA_MAX_EXPERTS
                                # (the pinned commit allows 1024: plan.LLAMA_MAX_EXPERTS); tomoe's limit too


def nearest_divisor(d_ff: int, want: int) -> int:
    """The divisor of d_ff nearest ``want`` (the larger one on a tie), so experts split d_ff exactly."""
    return min((e for e in range(1, d_ff + 1) if d_ff % e == 0), key=lambda e: (abs(e - want), -e))


def check_fraction(f: float, what: str = "--active") -> float:
    if not 0 < f <= 1:
        raise UserError(f"{what} {f:g} must be in (0, 1] (a fraction of the MLP's neurons used per token)")
    return f


def fine_experts(d_ff: int) -> int:
    """Experts of 32 neurons (the q4_0/q8_0 block, so ffn_down_exps quantizes), widened by multiples of 32 while
    E would exceed 512 (so older llama.cpp builds load the file too); d_ff not a multiple of 32: the largest
    divisor of d_ff up to 512 with width >= 32 (its down tensors then fall back to f16)."""
    for width in range(32, d_ff + 1, 32):
        if d_ff % width == 0 and d_ff // width <= MAX_EXPERTS:
            return d_ff // width
    return max(e for e in range(1, min(MAX_EXPERTS, d_ff // 32 or 1) + 1) if d_ff % e == 0)


def fine_shared(experts: int) -> int:
    """One sixth of the experts (measured on SmolLM2 at 50% active, E=48: S=8 beat S=0, 4 and 16)."""
    return max(1, round(experts / 6)) if experts >= 3 else 0


def default_experts_for(method: str, d_ff: int) -> int:
    """E when neither --experts nor --active says otherwise."""
    return fine_experts(d_ff) if method == "finegrained" else 8


def default_shared_for(method: str, experts: int) -> int:
    """S when neither --shared nor --active says otherwise."""
    return fine_shared(experts) if method == "finegrained" else 0


def active_fraction_default(experts: int, shared: int, target: float = 0.5) -> int:
    """top-k routed experts so that (shared + k) / experts is nearest to ``target`` (at least 1)."""
    return max(1, min(experts - shared, int(math.floor(target * experts - shared + 0.5))))


def default_experts(method: str, d_ff: int, active: float) -> int:
    if method == "finegrained":
        return fine_experts(d_ff)
    if method == "tomoe":
        return TOMOE_EXPERTS
    if method == "mlpmoe" and abs(active - 1) < 1e-9:
        return nearest_divisor(d_ff, SLICE_EXPERTS)
    return nearest_divisor(d_ff, COARSE_EXPERTS)


def expert_layout(method: str, d_ff: int, active: float, experts: int | None = None) -> tuple[int, int, int]:
    """(E, S, K) for ``method`` on an MLP of ``d_ff`` neurons at active fraction ``active`` (module docstring).
    For tomoe, K is 1 and S 0 (the budget is trained, not counted in experts)."""
    check_fraction(active)
    e = experts or default_experts(method, d_ff, active)
    if method == "tomoe":
        return e, 0, 1
    if method == "mlpmoe" and abs(active - 1) < 1e-9:
        return e, 0, e
    n = round(active * e)
    if n < 1:
        raise UserError(f"{method}: active fraction {active:g} of {e} experts is less than one expert; "
                        f"raise --active or --experts")
    if method == "finegrained":
        s = n // 3 if n >= 3 else 0
        return e, s, n - s
    if method in ("cmoe", "mlpmoe"):
        s = min(max(1, n // 2), e - 1) if n >= 2 else 0
        return e, s, max(1, n - s)
    return e, 0, n
