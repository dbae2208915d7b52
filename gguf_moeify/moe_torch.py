"""The torch MoE MLP built from a MoEPlan: exactly the math the patched llama.cpp graph computes.

scores = router(x); the top_k experts by score are chosen; their SwiGLU outputs are summed with weight 1;
the shared expert (if any) is always added with weight 1.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .plan import MoEPlan, expert_tensors

ACTIVATIONS = {"silu": F.silu}


def router_scores(kind: str, t: dict[str, torch.Tensor], x: torch.Tensor, act=F.silu) -> torch.Tensor:
    if kind == "linear":
        return x @ t["weight"].t()
    if kind == "cmoe":
        return ((x @ t["up"].t()) * act(x @ t["gate"].t())).abs()
    if kind == "mlp":
        return torch.tanh(x @ t["w1"].t() + t["b1"]) @ t["w2"].t() + t["b2"]
    raise ValueError(kind)


class MoEMLP(nn.Module):
    def __init__(self, plan: MoEPlan, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: str = "silu",
                 oracle: bool | str = False):
        super().__init__()
        self.plan = plan
        # oracle (torch reference only, an upper bound; not expressible in a GGUF), ignoring the router:
        # True / "expert": per token, the top_k experts whose outputs have the largest L2 norm;
        # "neuron": per token, the same number of neurons (shared + top_k * width) with the largest
        # |h_i| * ||W_down[:, i]||, over all of the plan's neurons: the ceiling of any expert grouping
        self.oracle = oracle
        self.act = ACTIVATIONS[act]
        self.top_k = plan.top_k
        self.router_kind = plan.router.kind
        for name, w in expert_tensors(plan, gate, up, down).items():
            self.register_buffer(name, w, persistent=False)
        self.router = {k: torch.as_tensor(v, dtype=gate.dtype) for k, v in plan.router.tensors.items()}
        self.has_shared = plan.shared_width > 0
        # trainable low-rank updates of expert tensors (finetune.py; empty otherwise): name -> module whose call
        # returns a tensor shaped like the buffer it is added to
        self.deltas = nn.ModuleDict()

    def weight(self, name: str) -> torch.Tensor:
        """An expert tensor as the forward pass uses it: the buffer plus its fine-tuning update, if any."""
        w = getattr(self, name)
        return w + self.deltas[name]().to(w.dtype) if name in self.deltas else w

    def _expert(self, e: int, x: torch.Tensor, w: dict | None = None) -> torch.Tensor:
        w = w or {n: getattr(self, n) for n in ("gate_exps", "up_exps", "down_exps")}
        h = self.act(x @ w["gate_exps"][e].t()) * (x @ w["up_exps"][e].t())
        return h @ w["down_exps"][e].t()

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(T, top_k) indices of the chosen experts for each row of x."""
        return self.select_weighted(x)[0]

    def select_weighted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(chosen expert indices (T, top_k), their weights (T, top_k), or None for unit weights)."""
        if self.oracle:  # unit weights (a stock plan's folded expert scale undone)
            scores = torch.stack([self._expert(e, x).norm(dim=-1) for e in range(self.gate_exps.shape[0])], -1)
            chosen = torch.topk(scores, self.top_k, dim=-1).indices
            unfold = 1.0 / self.plan.expert_scale
            return chosen, None if unfold == 1.0 else torch.full(chosen.shape, unfold, dtype=x.dtype)
        scores = router_scores(self.router_kind, self.router, x, self.act)
        if self.plan.gating == "unit":
            return torch.topk(scores, self.top_k, dim=-1).indices, None
        # stock llama.cpp: the top-k of the float32 softmax over all experts, weighted by it (renormalised)
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.topk(probs, self.top_k, dim=-1).indices
        w = probs.gather(1, chosen)
        if self.plan.norm_weights:
            w = w / w.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
        return chosen, w.to(x.dtype)

    def _neuron_oracle(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        # each of the plan's neurons once: padding (-1) and copies of a neuron in several experts (ToMoE) left out
        _, first = np.unique(self.plan.experts.reshape(-1), return_index=True)
        rows = torch.as_tensor(np.sort(first[self.plan.experts.reshape(-1)[first] >= 0]))
        gate, up = self.gate_exps.reshape(-1, d)[rows], self.up_exps.reshape(-1, d)[rows]
        down = (self.down_exps.transpose(1, 2).reshape(-1, d) / self.plan.expert_scale)[rows]  # one row per neuron
        if self.has_shared:
            gate, up = torch.cat([self.gate_shexp, gate]), torch.cat([self.up_shexp, up])
            down = torch.cat([self.down_shexp.t(), down])
        n_active = min(self.plan.shared_width + self.top_k * self.plan.expert_width, gate.shape[0])
        h = self.act(x @ gate.t()) * (x @ up.t())
        keep = torch.topk(h.abs() * down.norm(dim=1), n_active, dim=-1).indices
        mask = torch.zeros_like(h).scatter_(1, keep, 1.0)
        return (h * mask) @ down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.oracle == "neuron":
            return self._neuron_oracle(x).reshape(shape)
        w = {n: self.weight(n) for n in ("gate_exps", "up_exps", "down_exps")}
        out = torch.zeros_like(x)
        n_exp = self.gate_exps.shape[0]
        if self.top_k == n_exp and self.plan.gating == "unit":
            for e in range(n_exp):
                out += self._expert(e, x, w)
        else:
            idx, weights = self.select_weighted(x)
            gates = torch.zeros(x.shape[0], n_exp, dtype=x.dtype, device=x.device)
            gates.scatter_(1, idx, 1.0 if weights is None else weights)
            chosen = torch.zeros(x.shape[0], n_exp, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
            for e in range(n_exp):
                rows = chosen[:, e].nonzero().squeeze(-1)
                if rows.numel():
                    y = self._expert(e, x[rows], w)
                    out.index_add_(0, rows, y if weights is None else y * gates[rows, e].unsqueeze(-1))
        if self.has_shared:
            gate, up, down = (self.weight(n) for n in ("gate_shexp", "up_shexp", "down_shexp"))
            out += (self.act(x @ gate.t()) * (x @ up.t())) @ down.t()
        return out.reshape(shape)
