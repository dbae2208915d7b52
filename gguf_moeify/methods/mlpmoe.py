"""MLPMoE (Novikov, 2025): a data-free restructuring of the MLP into a static MoE.

``slice`` cuts d_ff into E contiguous blocks (the tensor-parallel split); every token uses every block and the
outputs are summed, so the function is the dense one up to float rounding. With ``--shared S`` the S most
important blocks form the shared expert (still exact). With ``--top-k K`` below the routed count, slicing becomes
the naive routed baseline the data-driven methods are compared with: a data-free linear router scores each slice
by its mean L2-normalised gate row (MoEfication's similarity router, on contiguous slices).

The paper gives two parameter-reducing variants by definition only; our designs (deterministic, data-free):

* neuron score s_i = ||W_gate[i]||_2 * ||W_up[i]||_2 * max_j |W_down[j, i]|: the output scale of neuron i for an
  isotropic input, measured by its largest output weight. The max (not the L2 norm) of the down column protects
  the few neurons that write outlier ("super weight") channels: on SmolLM2, 80% kept, the L2 form gave 4-13x the
  dense perplexity and the max form 2.7-3x. A block's importance is the sum of its neurons' scores.
* ``fractal-fade``: differential sparsity at every scale. The E blocks, ordered by importance, keep fractions
  that fade linearly from hi to lo with mean ``keep`` (hi = min(1, keep*(1+a)), lo = 2*keep - hi, a = 0.5).
  Inside each block the same fade is applied to its two halves (more important half keeps more), recursively,
  down to runs of 32 neurons, where the lowest-score neurons are dropped. Same pattern at every scale: fractal.
* ``compensated-pruning``: the MLP is cut into branches of 32 contiguous neurons; the branches with the least
  energy (sum of s_i^2) are removed, and the kept down-projection columns are scaled by
  sqrt(total energy / kept energy), so the output variance of the MLP (uncorrelated-branch model) is preserved.

In both variants the kept neurons (in their original order) are repacked into E equal experts. All experts stay
active, so the grouping does not change the function; only the dropped neurons do. The expert width is
round(keep * d_ff / E), rounded to a multiple of 32 when d_ff / E is one (so quantized expert tensors stay
quantizable); the achieved fraction is recorded in the plan.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..plan import MoEPlan, Router
from .options import MethodOptions, MLPMoEOptions, check_common

FADE_STRENGTH = 0.5
LEAF = 32

NAME = "mlpmoe"
OPTIONS = MLPMoEOptions
needs_calibration = False
whole_model = False


def neuron_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> np.ndarray:
    s = gate.double().norm(dim=1) * up.double().norm(dim=1) * down.double().abs().amax(dim=0)
    return s.numpy()


def _allocate(sizes: list[int], importance: np.ndarray, total: int) -> list[int]:
    """Split ``total`` kept neurons over children of ``sizes``: keep rates fade linearly with importance rank."""
    n = sum(sizes)
    k = total / n
    hi = min(1.0, k * (1 + FADE_STRENGTH))
    lo = 2 * k - hi
    m = len(sizes)
    rank = np.empty(m)
    rank[np.argsort(-importance, kind="stable")] = np.arange(m)
    rates = hi - (hi - lo) * (rank / max(m - 1, 1))
    want = np.minimum(rates * np.asarray(sizes), sizes)
    counts = np.floor(want).astype(int)
    # largest remainder, then spill over to children with room, most important first
    order = list(np.lexsort((rank, -(want - counts))))
    while counts.sum() < total:
        for j in order:
            if counts.sum() >= total:
                break
            if counts[j] < sizes[j]:
                counts[j] += 1
    return counts.tolist()


def _fractal_keep(idx: np.ndarray, score: np.ndarray, count: int) -> np.ndarray:
    if count >= len(idx):
        return idx
    if count <= 0:
        return idx[:0]
    if len(idx) <= LEAF:
        best = np.sort(np.argsort(-score[idx], kind="stable")[:count])
        return idx[best]
    halves = np.array_split(idx, 2)
    counts = _allocate([len(h) for h in halves], np.array([score[h].sum() for h in halves]), count)
    return np.concatenate([_fractal_keep(h, score, c) for h, c in zip(halves, counts)])


def _target_width(d_ff: int, experts: int, keep: float) -> int:
    dense_width = d_ff // experts
    width = max(1, round(keep * dense_width))
    if dense_width % 32 == 0:
        width = max(32, int(round(width / 32)) * 32)
    return min(width, dense_width)


def _repack(kept: np.ndarray, experts: int, width: int) -> np.ndarray:
    out = np.full((experts, width), -1, dtype=np.int64)
    for e, part in enumerate(np.array_split(np.sort(kept), experts)):
        out[e, :len(part)] = part
    return out


def validate(opts: MethodOptions, d_ff: int) -> None:
    check_common(opts, d_ff)
    own = opts.own_for(MLPMoEOptions)
    if opts.top_k is not None and opts.top_k != opts.routed and own.variant != "slice":
        raise UserError(f"mlpmoe {own.variant} keeps every expert active, so --top-k must be {opts.routed} "
                        f"(or omitted); routed top-k works with --variant slice (the naive baseline)")
    if own.variant == "slice" and own.keep not in (None, 1.0):
        raise UserError("--keep applies to the mlpmoe variants fractal-fade and compensated-pruning, not to slice")
    if own.keep is not None and not 0.0 < own.keep <= 1.0:
        raise UserError(f"--keep must be in (0, 1], got {own.keep}")
    if own.variant != "slice" and opts.shared:
        raise UserError("--shared is only supported with --variant slice for mlpmoe")


def plan_layer(layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               opts: MethodOptions, stats=None) -> MoEPlan:
    d_ff, d = gate.shape
    E = opts.experts
    blocks = np.arange(d_ff).reshape(E, d_ff // E)
    score = neuron_scores(gate, up, down)
    own = opts.own_for(MLPMoEOptions)
    info: dict = {"variant": own.variant}
    scale = None
    if own.variant == "slice":
        shared_blocks = np.sort(np.argsort(-score[blocks].sum(1), kind="stable")[:opts.shared])
        shared = blocks[shared_blocks].reshape(-1)
        experts = np.delete(blocks, shared_blocks, axis=0)
    else:
        keep = 0.8 if own.keep is None else own.keep
        width = _target_width(d_ff, E, keep)
        total = width * E
        if own.variant == "fractal-fade":
            counts = _allocate([blocks.shape[1]] * E, score[blocks].sum(1), total)
            kept = np.concatenate([_fractal_keep(b, score, c) for b, c in zip(blocks, counts)])
        else:
            branch = min(LEAF, d_ff // E)
            branches = np.arange(d_ff - d_ff % branch).reshape(-1, branch)
            energy = (score[branches] ** 2).sum(1)
            n_keep = -(-total // branch)
            keep_b = np.sort(np.argsort(-energy, kind="stable")[:n_keep])
            kept = branches[keep_b].reshape(-1)[:total]
            scale = np.zeros(d_ff)
            scale[kept] = np.sqrt((score ** 2).sum() / (score[kept] ** 2).sum())
            info["compensation"] = round(float(scale[kept][0]), 6)
        shared = np.zeros(0, dtype=np.int64)
        experts = _repack(kept, E, width)
        info["kept_fraction"] = round(len(kept) / d_ff, 6)
    routed = experts.shape[0]
    top_k = routed if opts.top_k is None else opts.top_k
    if top_k == routed:
        router = Router("linear", {"weight": np.zeros((routed, d), dtype=np.float32)})  # every expert chosen
    else:  # the naive routed baseline: slices scored by their mean normalised gate row (data-free)
        g_norm = torch.nn.functional.normalize(gate.double(), dim=1).numpy()
        router = Router("linear", {"weight": np.stack([g_norm[e].mean(0) for e in experts])})
        info["router"] = "slice-similarity"
    return MoEPlan(layer=layer, d_ff=d_ff, experts=experts, top_k=top_k, router=router, shared=shared,
                   neuron_scale=scale, info=info)
