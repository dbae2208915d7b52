"""MoEfication (Zhang et al., Findings of ACL 2022) for SwiGLU MLPs: split the d_ff neurons into equal experts,
route each token to the top-k of them with a similarity or a trained MLP router.

The paper works on ReLU FFNs; for SwiGLU we cluster on the gate projection's rows and use |h| with
h = silu(W_gate x) ⊙ (W_up x) as a neuron's activation. Calibration (``--calib``) is always used: the shared
expert, the co-activation split and the MLP router need it, and so does the layer-sequential propagation.

Splits (``--split``):
* ``param``: balanced k-means (squared L2, k-means++ seeded with ``--seed``) on the L2-normalised gate rows into
  E - S clusters of exactly d_ff / E neurons (exact balanced assignment at every step: _balanced.py).
* ``coact``: co-activation graph + spectral partition. A neuron is "active" on a token when it is among the token's
  top 10% by |h|; edge weight A_ij = number of tokens where i and j are both active (exact counts, held in
  float32: _spectral.py). The graph is embedded with the top E - S eigenvectors of D^-1/2 A D^-1/2 (a partial,
  seeded eigensolver: linalg.top_eigenvectors; rows normalised, as in Ng-Jordan-Weiss spectral clustering) and cut
  into E - S exactly equal parts by the same balanced k-means. (Not METIS: the paper's graph partitioner;
  spectral + exact balancing is the documented substitute.)

Shared expert (``--shared S``): the S * d_ff / E neurons with the largest mean |h| * ||W_down[:, i]|| on the
calibration tokens, taken out before the split.

Routers (``--router``):
* ``similarity``: expert centre = mean of its members' normalised gate rows; score = centre · x, written as a
  "linear" router with the centres as rows. The paper compares with the normalised x; for one token ||x|| scales
  every score alike, so the top-k is the same and the runtime needs no normalisation.
* ``mlp``: Linear(d -> E_r) -> tanh -> Linear(E_r -> E_r), trained with BCE-with-logits against each expert's
  share of the token's activation mass (Σ_{i in e} |h_i| / Σ_i |h_i| over the routed neurons); inputs
  standardised per feature for training (folded into the first layer afterwards, so the runtime takes raw x);
  Adam lr 0.01, batches of 256, at most 30 epochs, 10% held out, early stopping after 3 epochs without held-out
  improvement, best held-out state kept; every random choice from ``--seed``. Written as router kind "mlp".
* the ground-truth oracle (expert output norms) exists only in the torch reference (``MoEMLP.oracle``), as an
  upper bound for ``eval --oracle``; it cannot be written to a GGUF.

Default top-k when omitted: the number of routed experts that brings the active fraction nearest 50%.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..sizing import active_fraction_default
from ..plan import MoEPlan, Router
from ..timing import phase
from .options import MethodOptions, MoEficationOptions, check_common
from ._balanced import balanced_kmeans, groups
from ._spectral import coactivation_counts, spectral_embedding, top_marks
from ..routers import train_mlp_router

NAME = "moefication"
OPTIONS = MoEficationOptions
needs_calibration = True
whole_model = False
COACT_FRACTION = 0.10
CHUNK = 4096


def validate(opts: MethodOptions, d_ff: int) -> None:
    from ..calibration import check_calib_options
    check_common(opts, d_ff)
    check_calib_options(opts, NAME)
    opts.own_for(MoEficationOptions)   # another method's options are refused; choices checked by the dataclass


def default_top_k(opts: MethodOptions) -> int:
    return active_fraction_default(opts.experts, opts.shared)


@torch.no_grad()
def _abs_h(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act):
    """Chunks of |h| (rows of x, d_ff), float32."""
    g, u = gate.float(), up.float()
    for s in range(0, x.shape[0], CHUNK):
        xc = x[s:s + CHUNK].float()
        yield (act(xc @ g.t()) * (xc @ u.t())).abs()


def plan_layer(layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               opts: MethodOptions, stats=None) -> MoEPlan:
    if stats is None:
        raise UserError("moefication needs calibration data (--calib)")
    own = opts.own_for(MoEficationOptions)
    split, router_kind = own.split, own.router
    d_ff = gate.shape[0]
    m = d_ff // opts.experts
    k = opts.routed
    top_k = opts.top_k if opts.top_k is not None else default_top_k(opts)
    x = stats.x
    info: dict = {"split": split, "router": router_kind, "calib_tokens": int(x.shape[0])}

    with phase("statistics"):
        shared, rest = _shared_split(x, gate, up, down, opts.shared * m, stats.act)
        counts = _coact_counts(x, gate, up, rest, stats.act) if split == "coact" else None
    with phase("partition"):
        g_norm = F.normalize(gate.double(), dim=1).numpy()
        if split == "param":
            points = g_norm[rest]
        else:
            points = spectral_embedding(counts, k, seed=stats.seed)
            del counts
        experts = groups(balanced_kmeans(points, k, seed=stats.seed), rest, k)
    with phase("router"):
        if router_kind == "similarity":
            router = Router("linear", {"weight": np.stack([g_norm[e].mean(0) for e in experts])})
        else:
            router = _mlp_router(x, gate, up, experts, stats.seed, info, stats.act)
    return MoEPlan(layer=layer, d_ff=d_ff, experts=experts, top_k=top_k, router=router, shared=shared, info=info)


def _shared_split(x, gate, up, down, n_shared: int, act) -> tuple[np.ndarray, np.ndarray]:
    """(shared, rest) sorted neuron indices: the ``n_shared`` largest mean |h| * ||W_down[:, i]|| are shared."""
    d_ff = gate.shape[0]
    if not n_shared:
        return np.zeros(0, dtype=np.int64), np.arange(d_ff)
    mass = torch.zeros(d_ff, dtype=torch.float64)
    for h in _abs_h(x, gate, up, act):
        mass += h.sum(0, dtype=torch.float64)
    imp = (mass / x.shape[0] * down.double().norm(dim=0)).numpy()
    order = np.lexsort((np.arange(d_ff), -imp))
    return np.sort(order[:n_shared]), np.sort(order[n_shared:])


def _coact_counts(x, gate, up, idx: np.ndarray, act) -> torch.Tensor:
    """Co-activation counts among the neurons ``idx``: active = among a token's top COACT_FRACTION by |h|."""
    sub_g, sub_u = gate[torch.as_tensor(idx)], up[torch.as_tensor(idx)]
    top = max(1, int(round(COACT_FRACTION * len(idx))))
    return coactivation_counts(top_marks(h, top) for h in _abs_h(x, sub_g, sub_u, act))


def _mlp_router(x, gate, up, experts: np.ndarray, seed: int, info: dict, act) -> Router:
    """The trained MLP router: targets are each expert's share of the token's activation mass."""
    k, m = experts.shape
    target = torch.zeros(x.shape[0], k)
    ex = torch.as_tensor(experts.reshape(-1))
    s = 0
    for h in _abs_h(x, gate[ex], up[ex], act):
        per = h.reshape(h.shape[0], k, m).sum(2)
        target[s:s + h.shape[0]] = per / per.sum(1, keepdim=True).clamp_min(1e-12)
        s += h.shape[0]
    tensors, hist = train_mlp_router(x, target, seed=seed, return_history=True)
    info["router_heldout_bce"] = [round(hist[0], 6), round(min(hist), 6)]
    info["router_epochs"] = len(hist) - 1
    return Router("mlp", tensors)
