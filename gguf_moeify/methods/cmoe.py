"""CMoE (Pei et al., 2025): experts carved from the dense MLP by activation profiling, with an analytic router.
Training-free; SxAyEz = S shared experts, y routed active per token, z experts in all (``--config S1A7E16``).

Per layer, on the calibration MLP inputs x (T tokens, layer-sequential: the converted earlier layers produce them):

1. Profiling (as the reference code): h = silu(x̂ Ĝᵀ) ⊙ (x̂ Ûᵀ) with x and the gate/up weight rows L2-normalised;
   for each token the K_a neurons with the largest |h| are marked (binary matrix A, T x d_ff; K_a = 10 by default,
   ``--ka``); activation rate μ_i = mean of column i.
2. Shared expert: the S * m neurons with the highest μ (m = d_ff / z; ties broken by neuron index).
3. Routed experts: among the rest, the z - S highest-μ neurons give the initial centroids (their columns of A);
   every remaining neuron is assigned to a centroid by an exact balanced linear assignment on the L1 distance
   between its column and the centroid (each centroid gets m neurons; _balanced.py's transportation solver, the
   same optimum as scipy's linear_sum_assignment on the cost replicated m times). One refinement pass: centroids become the mean columns of their clusters, and the neurons
   are reassigned the same way. For a binary column a and a centroid c in [0,1]^T, |a - c|_1 = Σa + Σc - 2 a·c,
   which is how the distances are computed (counts in float64).
4. Router: per routed expert its representative neuron (the member closest in L1 to the final cluster mean; ties by
   index); the score s_j = |(û_j · x) * silu(ĝ_j · x)| with the representative's L2-normalised up/gate rows
   (router kind "cmoe"); the top y experts are used. The runtime scores the un-normalised x (it has no way to
   normalise it, and the reference's router does not normalise either): scaling x by c > 0 multiplies every
   |û·x| by c and changes only the silu factor non-linearly, so the ranking can differ from a normalised-x ranking
   only through silu's curvature; the profiling in step 1 keeps the reference's normalisation.
5. Gates: exactly 1 (the reference's learnable scale starts at 0, i.e. weight 1, and is only trained by the
   optional fine-tune).

Default top-k when omitted: the number of routed experts that brings the active fraction (S + k) / z nearest 50%.
Deviation: the reference iterates assignment until the cost stops improving (up to 10 passes); the paper's text
and this implementation do one refinement pass.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..sizing import active_fraction_default
from ..plan import MoEPlan, Router
from ..timing import phase
from .options import CMoEOptions, MethodOptions, check_common
from ._balanced import balanced_assign, groups

NAME = "cmoe"
OPTIONS = CMoEOptions
needs_calibration = True
whole_model = False
CHUNK = 4096


def parse_config(text: str) -> tuple[int, int, int]:
    """'S2A2E16' -> (shared=2, top_k=2, experts=16)."""
    m = re.fullmatch(r"[sS](\d+)[aA](\d+)[eE](\d+)", text.strip())
    if not m:
        raise UserError(f"--config {text!r}: expected SxAyEz, e.g. S1A7E16 (x shared, y routed active, z experts)")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def default_top_k(opts: MethodOptions) -> int:
    return active_fraction_default(opts.experts, opts.shared)


def validate(opts: MethodOptions, d_ff: int) -> None:
    from ..calibration import check_calib_options
    check_common(opts, d_ff)
    check_calib_options(opts, NAME)
    ka = opts.own_for(CMoEOptions).ka
    if not 1 <= ka <= d_ff:
        raise UserError(f"--ka must be between 1 and the intermediate size {d_ff}, got {ka}")


@torch.no_grad()
def activation_markers(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, ka: int, act) -> torch.Tensor:
    """(T, d_ff) bool: the top-``ka`` neurons by |h| of each token, h from normalised x and weight rows."""
    g = F.normalize(gate.float(), dim=1)
    u = F.normalize(up.float(), dim=1)
    out = torch.zeros(x.shape[0], gate.shape[0], dtype=torch.bool)
    for s in range(0, x.shape[0], CHUNK):
        xn = F.normalize(x[s:s + CHUNK].float(), dim=1)
        h = act(xn @ g.t()) * (xn @ u.t())
        out[s:s + CHUNK].scatter_(1, torch.topk(h.abs(), ka, dim=1).indices, True)
    return out


def _l1_cost(markers: torch.Tensor, cols: np.ndarray, centroids: torch.Tensor) -> np.ndarray:
    """L1 distance between binary columns ``markers[:, cols]`` and real centroids (T, k) in [0, 1]."""
    a = markers[:, torch.as_tensor(cols)]
    dot = torch.zeros(len(cols), centroids.shape[1], dtype=torch.float64)
    for s in range(0, a.shape[0], CHUNK):
        dot += (a[s:s + CHUNK].double().t() @ centroids[s:s + CHUNK])
    return (a.sum(0).double()[:, None] + centroids.sum(0)[None, :] - 2 * dot).numpy()


def build_experts(markers: torch.Tensor, n_experts: int, n_shared: int):
    """Steps 2-4 on a (T, d_ff) binary marker matrix -> (shared (S*m,), experts (z-S, m), representatives (z-S,),
    rates (d_ff,))."""
    T, d_ff = markers.shape
    m = d_ff // n_experts
    k = n_experts - n_shared
    rates = markers.sum(0).double().numpy() / T
    order = np.lexsort((np.arange(d_ff), -rates))          # highest rate first, ties by index
    shared = np.sort(order[:n_shared * m])
    rest = np.sort(order[n_shared * m:])
    rest_order = order[n_shared * m:]                      # remaining neurons, highest rate first
    cent_idx = rest_order[:k]
    centroids = markers[:, torch.as_tensor(cent_idx)].double()
    labels = balanced_assign(_l1_cost(markers, rest, centroids))
    # one refinement pass: centroids = cluster means, reassign
    centroids = torch.stack([markers[:, torch.as_tensor(rest[labels == j])].double().mean(1) for j in range(k)], 1)
    labels = balanced_assign(_l1_cost(markers, rest, centroids))
    experts = groups(labels, rest, k)
    reps = []
    for j in range(k):
        members = experts[j]
        c = markers[:, torch.as_tensor(members)].double().mean(1, keepdim=True)
        dist = _l1_cost(markers, members, c)[:, 0]
        reps.append(int(members[np.lexsort((members, dist))[0]]))
    return shared, experts, np.array(reps, dtype=np.int64), rates


def plan_layer(layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               opts: MethodOptions, stats=None) -> MoEPlan:
    if stats is None:
        raise UserError("cmoe needs calibration data (--calib)")
    d_ff = gate.shape[0]
    ka = opts.own_for(CMoEOptions).ka
    top_k = opts.top_k if opts.top_k is not None else default_top_k(opts)
    with phase("statistics"):
        markers = activation_markers(stats.x, gate, up, ka, stats.act)
    with phase("partition"):
        shared, experts, reps, rates = build_experts(markers, opts.experts, opts.shared)
    rep_t = torch.as_tensor(reps)
    router = Router("cmoe", {"gate": F.normalize(gate.float()[rep_t], dim=1).numpy(),
                             "up": F.normalize(up.float()[rep_t], dim=1).numpy()})
    info = {"ka": ka, "representatives": reps.tolist(),
            "shared_rate_mean": round(float(rates[shared].mean()), 6) if shared.size else 0.0,
            "calib_tokens": int(stats.x.shape[0])}
    return MoEPlan(layer=layer, d_ff=d_ff, experts=experts, top_k=top_k, router=router, shared=shared, info=info)
