"""The torch MoE MLP built from a MoEPlan: exactly the math the patched llama.cpp graph computes.

scores = router(x) (+ the plan's selection bias); the top_k experts by score are chosen; their SwiGLU outputs are
summed with weight 1; the shared expert (if any) is always added with weight 1. With per-token counts a chosen
expert whose biased score is not above 0 is left out (weight 0), so a token uses anything from 0 to top_k.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .plan import MoEPlan, expert_tensors
from .routers import log_norm_targets, router_scores


class MoEMLP(nn.Module):
    def __init__(self, plan: MoEPlan, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act,
                 oracle: bool | str = False):
        super().__init__()
        self.plan = plan   # replaced, never changed, when fine-tuning trains or refits the router
        # oracle (torch reference only, an upper bound; not expressible in a GGUF), ignoring the router:
        # True / "expert": per token, the top_k experts whose outputs have the largest L2 norm;
        # "neuron": per token, the same number of neurons (shared + top_k * width) with the largest
        # |h_i| * ||W_down[:, i]||, over all of the plan's neurons: the ceiling of any expert grouping;
        # "expert-var" / "neuron-var": the same mean number per token, spent where it matters most: over all the
        # tokens of a forward call (one window), the T * top_k (token, expert) pairs (or T * n (token, neuron)
        # pairs) with the largest norms, so a token gets anything from none to all of them
        self.oracle = oracle
        self.act = act   # the model's MLP activation (Adapter.act)
        self.top_k = plan.top_k
        self.router_kind, self.router_dtype = plan.router.kind, plan.router.dtype
        for name, w in expert_tensors(plan, gate, up, down).items():
            self.register_buffer(name, w, persistent=False)
        self.router = {k: torch.as_tensor(v, dtype=gate.dtype) for k, v in plan.router.tensors.items()}
        self.has_shared = plan.shared_width > 0
        # trainable low-rank updates of expert tensors (finetune.py; empty otherwise): name -> module whose call
        # returns a tensor shaped like the buffer it is added to
        self.deltas = nn.ModuleDict()
        # fine-tuning mode (finetune.py): every expert, without updates, unit weights (the dense MLP when the plan
        # keeps each neuron once)
        self.teacher = False
        self.router_fit_loss: torch.Tensor | None = None   # set by each straight-through forward (see there)
        # per-token counts: routed experts used and rows routed since construction (``experts_used_by_layer``)
        self.experts_used, self.rows_routed = 0.0, 0

    def weight(self, name: str) -> torch.Tensor:
        """An expert tensor as the forward pass uses it: the buffer plus its fine-tuning update, if any."""
        w = getattr(self, name)
        return w + self.deltas[name]().to(w.dtype) if name in self.deltas else w

    def _expert(self, e: int, x: torch.Tensor, w: dict | None = None) -> torch.Tensor:
        w = w or {n: getattr(self, n) for n in ("gate_exps", "up_exps", "down_exps")}
        h = self.act(x @ w["gate_exps"][e].t()) * (x @ w["up_exps"][e].t())
        return h @ w["down_exps"][e].t()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The router's scores (T, E) for rows of x, as the file computes them."""
        return router_scores(self.router_kind, self.router, x, self.act, self.router_dtype)

    def trainable_router(self) -> list[nn.Parameter]:
        """Make the router's tensors parameters (trained through the top-k by a straight-through estimator)."""
        self.router = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in self.router.items()})
        return list(self.router.values())

    @property
    def router_trainable(self) -> bool:
        return isinstance(self.router, nn.ParameterDict)

    @torch.no_grad()
    def freeze_router(self) -> None:
        """Back to plain router tensors; the trained values go into a new plan (``self.plan``), which
        ``layer_plans`` hands to the writer."""
        if not self.router_trainable:
            return
        dtype = next(iter(self.router.values())).dtype
        self.set_router({k: v.detach().float().numpy() for k, v in self.router.items()}, dtype)

    def set_router(self, tensors: dict, dtype: torch.dtype | None = None) -> None:
        """Use new router tensors: a new plan with them (rounded to the plan's router dtype), and the module's own
        copies as stored."""
        dtype = dtype or self.gate_exps.dtype
        self.plan = replace(self.plan, router=self.plan.router.with_tensors(tensors))
        if hasattr(self, "router"):
            del self.router
        self.router = {k: torch.as_tensor(v, dtype=dtype) for k, v in self.plan.router.tensors.items()}  # as stored

    def _all_experts(self, x: torch.Tensor, w: dict) -> torch.Tensor:
        """(T, E, d): every routed expert's output for every row of x."""
        n_exp, width, d = w["gate_exps"].shape
        h = self.act(x @ w["gate_exps"].reshape(-1, d).t()) * (x @ w["up_exps"].reshape(-1, d).t())
        return torch.einsum("tef,edf->ted", h.view(-1, n_exp, width), w["down_exps"])

    def _straight_through(self, x: torch.Tensor, w: dict) -> torch.Tensor:
        """Unit-gate forward with a gradient for the router: the value is the hard top-k sum (the file's
        semantics), the backward pass sees each expert weighted by sigmoid((score - threshold) / spread), the
        threshold halfway between the k-th and (k+1)-th score, so unchosen experts get a gradient too."""
        scores = self.scores(x)
        k, n_exp = self.top_k, scores.shape[-1]
        top = torch.topk(scores.detach(), min(k + 1, n_exp), dim=-1)
        thr = top.values[:, k - 1:k] if k == n_exp else (top.values[:, k - 1:k] + top.values[:, k:k + 1]) / 2
        spread = scores.detach().std(dim=-1, keepdim=True).clamp(min=1e-6)
        soft = torch.sigmoid((scores - thr) / spread)
        hard = torch.zeros_like(scores).scatter_(1, top.indices[:, :k], 1.0)
        gates = hard + (soft - soft.detach())
        y = self._all_experts(x, w)
        if self.router_kind in ("linear", "mlp"):
            # and keep predicting what the oracle ranks by, each expert's output norm, as the experts change
            # (the finegrained router's own target; the input detached so only the router fits it)
            target = log_norm_targets(y.detach().norm(dim=-1)).to(scores.dtype)
            pred = self.scores(x.detach())
            self.router_fit_loss = F.mse_loss(pred, target)
        return torch.einsum("te,ted->td", gates.to(x.dtype), y)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(T, top_k) indices of the chosen experts for each row of x."""
        return self.select_weighted(x)[0]

    def select_weighted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(chosen expert indices (T, top_k), their weights (T, top_k), or None for unit weights)."""
        if self.oracle:  # unit weights (a stock plan's folded expert scale undone)
            chosen = torch.topk(self._expert_norms(x), self._oracle_k(), dim=-1).indices
            unfold = 1.0 / self.plan.expert_scale
            return chosen, None if unfold == 1.0 else torch.full(chosen.shape, unfold, dtype=x.dtype)
        scores = self.scores(x)
        if self.plan.selection_bias is not None:   # the file's exp_probs_b, added before the top-k
            scores = scores + torch.as_tensor(self.plan.selection_bias, dtype=scores.dtype)
        if self.plan.per_token_count:   # the chosen experts scoring above 0, with weight 1; the others weight 0
            top = torch.topk(scores, self.top_k, dim=-1)
            used = top.values > 0
            self.experts_used += float(used.sum())
            self.rows_routed += x.shape[0]
            return top.indices, used.to(x.dtype)
        if self.plan.gating == "unit":
            return torch.topk(scores, self.top_k, dim=-1).indices, None
        # stock llama.cpp: the top-k of the float32 softmax over all experts, weighted by it (renormalised)
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.topk(probs, self.top_k, dim=-1).indices
        w = probs.gather(1, chosen)
        if self.plan.norm_weights:
            w = w / w.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
        return chosen, w.to(x.dtype)

    def _oracle_k(self) -> int:
        """Experts per token the oracles choose: the plan's (mean) count."""
        return max(1, int(round(self.plan.mean_experts)))

    def _expert_norms(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E) the L2 norm of every routed expert's output for every row of x: what the oracles rank by."""
        return torch.stack([self._expert(e, x).norm(dim=-1) for e in range(self.gate_exps.shape[0])], -1)

    def _variable_oracle(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E) bool: the T * top_k largest expert output norms of the call, wherever they fall."""
        norms = self._expert_norms(x)
        keep = torch.topk(norms.reshape(-1), int(round(x.shape[0] * self.plan.mean_experts))).indices
        return torch.zeros(norms.numel(), dtype=torch.bool, device=x.device).scatter_(0, keep, True).view_as(norms)

    def _neuron_oracle(self, x: torch.Tensor, variable: bool = False) -> torch.Tensor:
        d = x.shape[-1]
        # each of the plan's neurons once: padding (-1) and copies of a neuron in several experts (ToMoE) left out
        _, first = np.unique(self.plan.experts.reshape(-1), return_index=True)
        rows = torch.as_tensor(np.sort(first[self.plan.experts.reshape(-1)[first] >= 0]))
        gate, up = self.gate_exps.reshape(-1, d)[rows], self.up_exps.reshape(-1, d)[rows]
        down = (self.down_exps.transpose(1, 2).reshape(-1, d) / self.plan.expert_scale)[rows]  # one row per neuron
        if self.has_shared:
            gate, up = torch.cat([self.gate_shexp, gate]), torch.cat([self.up_shexp, up])
            down = torch.cat([self.down_shexp.t(), down])
        n_active = min(self.plan.shared_width + self._oracle_k() * self.plan.expert_width, gate.shape[0])
        h = self.act(x @ gate.t()) * (x @ up.t())
        importance = h.abs() * down.norm(dim=1)
        if variable:
            keep = torch.topk(importance.reshape(-1), n_active * x.shape[0]).indices
            mask = torch.zeros(h.numel(), dtype=h.dtype, device=h.device).scatter_(0, keep, 1.0).view_as(h)
        else:
            mask = torch.zeros_like(h).scatter_(1, torch.topk(importance, n_active, dim=-1).indices, 1.0)
        return (h * mask) @ down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.oracle in ("neuron", "neuron-var"):
            return self._neuron_oracle(x, self.oracle == "neuron-var").reshape(shape)
        # the teacher reads the stored weights; otherwise each tensor with its fine-tuning update, if any
        names = ("gate_exps", "up_exps", "down_exps") + (("gate_shexp", "up_shexp", "down_shexp")
                                                         if self.has_shared else ())
        w = {n: getattr(self, n) if self.teacher else self.weight(n) for n in names}
        n_exp = self.gate_exps.shape[0]
        if self.teacher:  # every expert with weight 1 (a stock plan's folded expert scale undone)
            out = self._all_experts(x, w).sum(1) / self.plan.expert_scale
        elif self.router_trainable and self.plan.gating == "unit" and torch.is_grad_enabled():
            out = self._straight_through(x, w)
        elif self.top_k == n_exp and self.plan.gating == "unit" and not self.plan.per_token_count:
            out = torch.zeros_like(x)
            for e in range(n_exp):
                out += self._expert(e, x, w)
        else:
            out = torch.zeros_like(x)
            if self.oracle == "expert-var":   # unit weights (a stock plan's folded expert scale undone)
                chosen = self._variable_oracle(x)
                weights = None if self.plan.expert_scale == 1.0 else 1.0 / self.plan.expert_scale
                gates = chosen.to(x.dtype) * (weights or 1.0)
            else:
                idx, weights = self.select_weighted(x)
                gates = torch.zeros(x.shape[0], n_exp, dtype=x.dtype, device=x.device)
                gates.scatter_(1, idx, 1.0 if weights is None else weights)
                chosen = gates != 0   # (per-token counts: the experts left out are not computed)
            for e in range(n_exp):
                rows = chosen[:, e].nonzero().squeeze(-1)
                if rows.numel():
                    y = self._expert(e, x[rows], w)
                    out.index_add_(0, rows, y if weights is None else y * gates[rows, e].unsqueeze(-1))
        if self.has_shared:
            out = out + (self.act(x @ w["gate_shexp"].t()) * (x @ w["up_shexp"].t())) @ w["down_shexp"].t()
        return out.reshape(shape)


def experts_used_by_layer(model) -> list[float] | None:
    """Routed experts a token used in each per-token-count layer, on average over everything the layer routed
    since it was built (None without such layers): the measured counts, next to the file's maximum."""
    moes = sorted((m for m in model.modules() if isinstance(m, MoEMLP) and m.plan.per_token_count),
                  key=lambda m: m.plan.layer)
    return [m.experts_used / max(1, m.rows_routed) for m in moes] or None


def layer_plans(model) -> list[MoEPlan]:
    """The plans of a torch reference model's MoE layers, in layer order: after fine-tuning, with the routers it
    trained or refitted."""
    return sorted((m.plan for m in model.modules() if isinstance(m, MoEMLP)), key=lambda p: p.layer)
