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

import argparse
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_moeify.bundled import DEFAULT_CALIB, EVAL_EXCERPT, NONFICTION_EXCERPT  # noqa: E402
from gguf_moeify.convert import make_plans, open_model  # noqa: E402
from gguf_moeify.eval_cmd import add_bos_of  # noqa: E402
from gguf_moeify.evaluate import perplexity, read_text, tokenize_for_ppl  # noqa: E402
from gguf_moeify.methods import MethodOptions  # noqa: E402
from gguf_moeify.moe_torch import MoEMLP  # noqa: E402
from gguf_moeify.reference import load_dense, logits_fn, moeify_  # noqa: E402
from gguf_moeify.sizing import expert_layout  # noqa: E402


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--ranks", default="32,64,128")
    p.add_argument("--texts", default=f"{EVAL_EXCERPT},{NONFICTION_EXCERPT}")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ckpt, adapter = open_model(args.model, "float32")
    model, tok = load_dense(ckpt)
    bos = tok.bos_token_id if add_bos_of(tok) else None
    texts = {Path(t).stem: tokenize_for_ppl(tok, read_text(t), bos is not None) for t in args.texts.split(",")}

    def ppl() -> dict[str, float]:
        return {name: perplexity(logits_fn(model), ids, args.ctx, args.chunks, bos, name).ppl
                for name, ids in texts.items()}
    dense = ppl()
    e, s, k = expert_layout("finegrained", ckpt.d_ff, args.fraction, None)
    opts = MethodOptions(experts=e, shared=s, top_k=k, calib=DEFAULT_CALIB, calib_samples=32, calib_seqlen=512,
                         seed=args.seed)
    moeify_(model, adapter, make_plans(ckpt, adapter, "finegrained", opts))
    mlps = [m for m in model.modules() if isinstance(m, MoEMLP)]
    width, d = mlps[0].gate_exps.shape[1:]
    active = 3 * d * (mlps[0].plan.shared_width + k * width)
    rows = {"dense": (dense, 0), f"linear router (S{s}A{k}E{e})": (ppl(), e * d)}
    linear = {m: m.scores for m in mlps}
    for rank in (int(r) for r in args.ranks.split(",")):
        for m in mlps:
            m.scores = types.MethodType(low_rank_scores(m, rank), m)
        rows[f"rank-{rank} gate/up router"] = (ppl(), 2 * rank * (d + e * width) + e * width)
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
