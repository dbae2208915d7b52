"""Conversion methods. Each is one module that is a ``Method``; this registry is the only place that lists them."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..errors import UserError
from ..sizing import default_experts_for, default_shared_for, expert_layout
from .options import (CMoEOptions, FinegrainedOptions, MethodOptions, MLPMoEOptions, MoEficationOptions,  # noqa: F401
                      OWN_OPTIONS, ToMoEOptions, check_common, with_own)  # (the package's public names)


@runtime_checkable
class Method(Protocol):
    """What a method module provides. ``whole_model`` False: ``plan_layer(layer, gate, up, down, opts, stats) ->
    MoEPlan`` per decoder layer (``stats``: the layer's calibration inputs when ``needs_calibration``, from the
    layer-sequential pipeline of calibration.py); True (ToMoE, trained on the whole model at once):
    ``plan_model(ckpt, adapter, opts, progress) -> list[MoEPlan]``."""
    NAME: str
    OPTIONS: type                 # its own options (methods/options.py), ``opts.own``
    needs_calibration: bool
    whole_model: bool

    def validate(self, opts: MethodOptions, d_ff: int) -> None: ...


def _registry():
    from . import cmoe, finegrained, mlpmoe, moefication, tomoe
    return {"mlpmoe": mlpmoe, "cmoe": cmoe, "moefication": moefication, "finegrained": finegrained, "tomoe": tomoe}


METHOD_NAMES = ("mlpmoe", "cmoe", "moefication", "finegrained", "tomoe")


def resolve_options(name: str, opts: MethodOptions, d_ff: int) -> MethodOptions:
    """Fill in experts/shared/top_k left as None: from ``opts.active`` and d_ff when it is set
    (``sizing.expert_layout``; shared and top-k given explicitly win, and a top-k then keeps the fraction), else
    with the method's defaults for this d_ff (8 experts, no shared expert, unless the method says otherwise); the
    method's own options with their defaults when none were given (another method's are refused)."""
    from dataclasses import replace
    get_method(name)
    opts = with_own(opts, name)
    if name == "tomoe":   # the fraction is its trained budget (else 0.5); what it limits follows the runtime
        own = opts.own
        if own.budget is None and opts.active is not None:
            own = replace(own, budget=opts.active)
        opts = replace(opts, own=replace(own, budget=own.budget_or_default(),
                                         budget_on=own.budget_on_for(opts.runtime)))
    if opts.active is not None:
        experts, shared, top_k = expert_layout(name, d_ff, opts.active, opts.experts)
        if name == "tomoe":   # top-1 of E masks
            return replace(opts, experts=experts, shared=0 if opts.shared is None else opts.shared,
                           top_k=opts.top_k)
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
