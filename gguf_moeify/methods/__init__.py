"""Conversion methods. Each is one module with ``plan_layer(layer, gate, up, down, opts, stats) -> MoEPlan``
(or, for methods trained on the whole model such as ToMoE, ``plan_model(ckpt, adapter, opts, progress)`` returning
every layer's plan); this registry is the only place that lists them."""
from __future__ import annotations

from ..errors import UserError
from ..sizing import default_experts_for, default_shared_for, expert_layout
from .options import MethodOptions, check_common  # noqa: F401  (the package's public names)


def _registry():
    from . import cmoe, finegrained, mlpmoe, moefication, tomoe
    return {"mlpmoe": mlpmoe, "cmoe": cmoe, "moefication": moefication, "finegrained": finegrained, "tomoe": tomoe}


METHOD_NAMES = ("mlpmoe", "cmoe", "moefication", "finegrained", "tomoe")


def resolve_options(name: str, opts: MethodOptions, d_ff: int) -> MethodOptions:
    """Fill in experts/shared/top_k left as None: from ``opts.active`` and d_ff when it is set
    (``sizing.expert_layout``; shared and top-k given explicitly win, and a top-k then keeps the fraction), else
    with the method's defaults for this d_ff (8 experts, no shared expert, unless the method says otherwise)."""
    from dataclasses import replace
    get_method(name)
    if opts.active is not None:
        experts, shared, top_k = expert_layout(name, d_ff, opts.active, opts.experts)
        if name == "tomoe":   # the fraction is its trained budget; top-1 of E masks
            extra = {"budget": opts.active, **opts.extra}
            return replace(opts, experts=experts, shared=0 if opts.shared is None else opts.shared,
                           top_k=opts.top_k, extra=extra)
        if opts.shared is not None and opts.top_k is None:
            top_k = max(1, round(opts.active * experts) - opts.shared)
        return replace(opts, experts=experts, shared=shared if opts.shared is None else opts.shared,
                       top_k=top_k if opts.top_k is None else opts.top_k)
    experts = default_experts_for(name, d_ff) if opts.experts is None else opts.experts
    shared = default_shared_for(name, experts) if opts.shared is None else opts.shared
    return replace(opts, experts=experts, shared=shared)


def get_method(name: str):
    methods = _registry()
    if name not in methods:
        raise UserError(f"unknown --method {name!r}; available: {', '.join(methods)}")
    return methods[name]
