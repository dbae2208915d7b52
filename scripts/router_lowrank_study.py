"""Would a router that scores experts from a low-rank approximation of the gate and up projections (data-free, so
nothing to over-fit to the calibration text) come closer to the expert oracle than the least-squares router?
Torch reference only: a measurement, not a router kind the files can carry.

    .venv/bin/python scripts/router_lowrank_study.py MODEL [--fraction 0.5] [--ranks 32,64,128,576]
        [--texts FILE,FILE] [--chunks 8 --ctx 512]

For each MoE layer of a finegrained conversion (default calibration), gate and up are each replaced by their best
rank-r approximation (truncated SVD of the routed neurons' rows); a token's score for expert e is
sum over e's neurons of |act(g~_i . x) * (u~_i . x)| * ||W_down[:, i]||, and the top_k scores are chosen as the file's
router would. Printed per text: perplexity with the file's linear router, with each rank, and with the expert
oracle, and each router's multiply-adds per token next to the layer's active MLP.
"""
from __future__ import annotations

import types

import torch

from router_study_setup import convert_finegrained, load_study, study_parser

from gguf_moeify.evaluate import perplexity
from gguf_moeify.moe_torch import MoEMLP
from gguf_moeify.reference import logits_fn


def low_rank(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (n, r), B (r, d)) with A @ B the best rank-r approximation of w (n, d)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(w.dtype), vh[:rank].to(w.dtype)


def low_rank_scores(mlp: MoEMLP, rank: int):
    """A replacement for ``mlp.scores``: (T, E) expert scores from rank-``rank`` gate and up."""
    n_exp, width, d = mlp.gate_exps.shape
    gate_a, gate_b = low_rank(mlp.gate_exps.reshape(-1, d), rank)
    up_a, up_b = low_rank(mlp.up_exps.reshape(-1, d), rank)
    down_norm = mlp.down_exps.transpose(1, 2).reshape(-1, d).norm(dim=1)   # one per routed neuron

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act((x @ gate_b.t()) @ gate_a.t()) * ((x @ up_b.t()) @ up_a.t())
        return (h.abs() * down_norm).view(-1, n_exp, width).sum(-1)
    return scores


def main() -> int:
    p = study_parser(__doc__)
    p.add_argument("--ranks", default="32,64,128", help="ranks of the gate/up approximations (default 32,64,128)")
    args = p.parse_args()
    ckpt, adapter, model, bos, texts = load_study(args)

    def ppl() -> dict[str, float]:
        return {name: perplexity(logits_fn(model), ids, args.ctx, args.chunks, bos, name).ppl
                for name, ids in texts.items()}
    dense = ppl()
    mlps, (e, s, k), _ = convert_finegrained(model, ckpt, adapter, args)
    routed, width, d = mlps[0].gate_exps.shape
    active = 3 * d * (mlps[0].plan.shared_width + k * width)
    rows = {"dense": (dense, 0), f"linear router (S{s}A{k}E{e})": (ppl(), routed * d)}
    linear = {m: m.scores for m in mlps}
    for rank in (int(r) for r in args.ranks.split(",")):
        for m in mlps:
            m.scores = types.MethodType(low_rank_scores(m, rank), m)
        rows[f"rank-{rank} gate/up router"] = (ppl(), 2 * rank * (d + routed * width) + routed * width)
    for m in mlps:
        m.scores, m.oracle = linear[m], True
    rows["expert oracle"] = (ppl(), 0)
    print(f"| router | {' | '.join(texts)} | router multiply-adds / token (active MLP {active:,}) |")
    print("|---|" + "---|" * len(texts) + "---|")
    for name, (got, cost) in rows.items():
        cells = [f"{got[t]:.2f} ({got[t] / dense[t]:.2f}x)" for t in texts]
        print(f"| {name} | {' | '.join(cells)} | {cost:,} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
