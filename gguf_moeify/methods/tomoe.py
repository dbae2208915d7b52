"""ToMoE (Gao et al. 2025, arXiv 2501.15316): dynamic structural pruning into experts with a trained router; the
model's weights stay frozen.

Per layer, E expert masks over the d_ff neurons (from a hypernetwork shared by all layers) and a linear router that
picks one expert per token are trained on calibration text against the dense model as teacher, with a penalty that
pulls the mean fraction of neurons active per token to ``--budget`` p (training: ``tomoe_train.py``). Options:
``--experts`` E (default 8), ``--budget`` p (default 0.5), ``--train-steps``, ``--lr``, ``--seqlen``, ``--seed``,
``--train-state`` (checkpoint/resume). Top-1 routing, no separate shared expert to ask for.

Export to a MoEPlan (exactly the inference-time ToMoE model: hard masks ``logit > 0``, argmax routing, unit gate):
- neurons no expert keeps are dropped (no expert lists them);
- neurons every expert keeps are computed for every token either way; whole blocks of PAD of them become the
  always-on shared expert (a multiple of 32, so its down projection quantizes; the same width in every layer, as
  llama.cpp reads one), the rest stay in each expert;
- experts overlap freely: each expert is its own slice of neuron indices, so a neuron kept by several experts is
  duplicated in each of them;
- experts of unequal size are padded with zero neurons (index -1) to the largest one of their layer, rounded up to
  a multiple of PAD (32: the q4_0/q8_0 block, so ffn_down_exps quantizes); the width differs per layer (the
  budget is global: training spends more of it on some layers), written as a per-layer
  ``expert_feed_forward_length`` array that the patched runtime reads. Padding is chosen over splitting because a
  split expert would need top-k > 1 for some tokens and not others, which the file format cannot say; its cost is
  in the plan: ``active_fraction()`` counts padding (what the runtime computes) and ``info["active_ratio"]`` is
  ToMoE's own measure (neurons of the chosen expert per token, on one fixed calibration window).
- the router is the trained linear router (``linear``: argmax of x W^T; top-1 of it is the same choice).
- ``--runtime stock`` (``stock_plans``): the shared neurons folded into every expert and every layer padded to the
  widest, for llama.cpp's Mixtral-path llama / qwen3moe graphs; the same computation, more padding.
"""
from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import replace

import numpy as np
import torch

from ..errors import UserError
from ..sizing import MAX_EXPERTS
from ..plan import MoEPlan, Router
from .options import MethodOptions, ToMoEOptions

NAME = "tomoe"
OPTIONS = ToMoEOptions
needs_calibration = True
whole_model = True   # plan_model: masks and routers trained on the whole model at once
PAD = 32


def validate(opts: MethodOptions, d_ff: int) -> None:
    from ..calibration import check_calib_options
    check_calib_options(opts, NAME)
    if not 2 <= opts.experts <= MAX_EXPERTS:
        raise UserError(f"--experts for tomoe must be between 2 and {MAX_EXPERTS}, got {opts.experts}")
    if opts.shared:
        raise UserError("tomoe has no --shared option: neurons every expert keeps become the shared expert on export")
    if opts.top_k not in (None, 1):
        raise UserError(f"tomoe routes each token to one expert (top-1); --top-k {opts.top_k} is not available")
    if opts.layer_budget != "uniform":
        raise UserError("--layer-budget sensitivity does not apply to tomoe (its budget is trained: --budget)")
    own = opts.own_for(ToMoEOptions)
    if not 0 < own.budget_or_default() <= 1:
        raise UserError(f"--budget must be in (0, 1], got {own.budget}")
    if own.train_steps < 1:
        raise UserError(f"--train-steps must be >= 1, got {own.train_steps}")
    if not (own.lr > 0 and math.isfinite(own.lr)):
        raise UserError(f"--lr must be a positive number, got {own.lr}")
    if own.seqlen < 2:
        raise UserError(f"--seqlen must be >= 2, got {own.seqlen}")


def train_options(opts: MethodOptions, window):
    """``window``: the checkpoint's context cap, ``Checkpoint.window``."""
    from ..tomoe_train import TrainOptions
    own = opts.own_for(ToMoEOptions)
    seqlen = window(own.seqlen)
    return TrainOptions(experts=opts.experts, budget=float(own.budget_or_default()),
                        budget_on=own.budget_on_for(opts.runtime), steps=own.train_steps, lr=float(own.lr),
                        seqlen=seqlen, seed=opts.seed, state=own.state)


def plans_from_masks(masks: torch.Tensor, routers: list[torch.Tensor], info: list[dict] | None = None
                     ) -> list[MoEPlan]:
    """Hard masks (n_layers, E, d_ff) bool and router weights (E, d) per layer -> one MoEPlan per layer. The experts
    of a layer are as wide as its largest (rounded up to PAD); layers differ (ToMoE's budget is global, so it
    spends more neurons on some layers), which the patched runtime reads as a per-layer array. llama.cpp reads one
    shared width per file: the shared expert is as wide as the fewest whole PAD-blocks of every-expert neurons
    any layer has."""
    masks = masks.numpy().astype(bool)
    in_all = [np.flatnonzero(m.all(0)) for m in masks]
    n_shared = min(len(x) for x in in_all) // PAD * PAD
    routed = []
    for m, common in zip(masks, in_all):
        r = m.copy()
        r[:, common[:n_shared]] = False
        routed.append([np.flatnonzero(row) for row in r])
    plans = []
    for i, (m, common, lists, w) in enumerate(zip(masks, in_all, routed, routers)):
        width = max(PAD, -(-max(len(x) for x in lists) // PAD) * PAD)
        experts = np.full((len(lists), width), -1, dtype=np.int64)
        for e, idx in enumerate(lists):
            experts[e, :len(idx)] = idx
        layer_info = {"expert_sizes": [int(len(x)) for x in lists], "shared_from_overlap": n_shared,
                      "dropped_neurons": int(m.shape[1] - m.any(0).sum()), **(info[i] if info else {})}
        plans.append(MoEPlan(layer=i, d_ff=m.shape[1], experts=experts, top_k=1, shared=common[:n_shared],
                             router=Router("linear", {"weight": w.float().numpy()}), info=layer_info))
    return plans


def plan_model(ckpt, adapter, opts: MethodOptions, progress: bool = True) -> list[MoEPlan]:
    """Train ToMoE on the calibration text with the whole (frozen) model in memory, then export the plans."""
    from ..calibration import corpus_tokens
    from ..reference import load_dense
    from ..tomoe_train import ToMoEModel, fingerprint, step_window, train
    ids = corpus_tokens(ckpt, opts.calib, opts.calib_samples, ckpt.window(opts.calib_seqlen), opts.seed)
    topts = train_options(opts, ckpt.window)
    model, _ = load_dense(ckpt, tokenizer=False)
    tm = ToMoEModel(model, adapter, ckpt.n_layers, topts)
    # the run is identified by the model, the calibration tokens and the options
    source = hashlib.sha256(repr(sorted(ckpt.config.items())).encode() + ids.numpy().tobytes()).hexdigest()
    run = train(tm, ids, fingerprint(str(ckpt.path), source, topts), progress)
    if topts.state:
        print(f"ToMoE training state: {topts.state} (a rerun with the same options reuses it; delete it to retrain)",
              file=sys.stderr)
    # ToMoE's own active ratio (no padding), per layer, on one fixed calibration window
    tm.logits(step_window(ids, topts.seqlen, topts.seed + 1, -1))
    info = [{"active_ratio": round(float(m.record["active"]), 6)} for m in tm.layers]
    # the file records what was trained, not how long it took or whether it resumed: same options, same bytes
    print(f"ToMoE training: {run['steps']} steps, {run['seconds']:.0f} s", file=sys.stderr)
    info[0]["training"] = {k: v for k, v in run.items() if k not in ("seconds", "resumed_at")}
    plans = plans_from_masks(tm.hard_masks(), tm.router_weights(), info)
    del tm, model
    return stock_plans(plans, adapter.name) if opts.runtime == "stock" else plans


def stock_plans(plans: list[MoEPlan], adapter_name: str) -> list[MoEPlan]:
    """The exported plans as unmodified llama.cpp runs them (``--runtime stock``). Its graphs for MoE files without a
    shared expert (llama's Mixtral path, qwen3moe) read one expert width per file, and a shared expert would need
    deepseek, whose shared width is a multiple of the expert width and whose gates are not renormalised. So the shared
    neurons are folded into every expert and every layer's experts are padded with zero neurons to the widest layer;
    top-1 of a softmax renormalised over the chosen expert weighs it exactly 1. The file computes what the unit-gate
    plans compute, plus the padding (``active_fraction()`` counts it)."""
    from ..stock import stock_form
    width = max(p.shared_width + p.expert_width for p in plans)
    out = []
    for p in plans:
        experts = np.full((p.n_experts, width), -1, dtype=np.int64)
        experts[:, :p.shared_width] = p.shared
        experts[:, p.shared_width:p.shared_width + p.expert_width] = p.experts
        folded = replace(p, experts=experts, shared=np.zeros(0, dtype=np.int64),
                         info={**p.info, "stock_folded_shared": p.shared_width})
        out.append(stock_form(folded, adapter_name, None))
    return out
