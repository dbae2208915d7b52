"""Can a cheap correction add back what the left-out experts would have given? Torch reference, finegrained
(default calibration); a measurement, not a conversion.

    .venv/bin/python scripts/mlp_correction_study.py MODEL [--fraction 0.5] [--expert-counts per-token]
        [--texts FILE,FILE] [--chunks 8] [--ridge 1e-3]

Per MoE layer, on the calibration windows (inputs captured from the converted model, as the router study does),
the residual r = dense MLP(x) - MoE MLP(x) (the sum of the routed experts a token did not use) is fitted by

- ``mean``: a constant vector (the residual's mean over the calibration tokens: a bias after the MLP);
- ``linear``: a least-squares linear map of [x, 1] (d x d multiply-adds a token: about 25% of the active MLP of a
  50% SmolLM2 file).

Each is scored by the share of the residual's energy it removes on each text's own inputs (captured the same way)
and by perplexity with every layer corrected.
"""
from __future__ import annotations

import torch

from router_fit_study import capture_inputs
from router_study_setup import load_study, study_parser

from gguf_moeify.bundled import DEFAULT_CALIB
from gguf_moeify.calibration import calib_tokens
from gguf_moeify.convert import make_plans
from gguf_moeify.evaluate import perplexity, windows
from gguf_moeify.linalg import ridge_least_squares
from gguf_moeify.methods import FinegrainedOptions, MethodOptions
from gguf_moeify.moe_torch import MoEMLP
from gguf_moeify.reference import logits_fn, moeify_
from gguf_moeify.sizing import expert_layout


@torch.no_grad()
def residual(m: MoEMLP, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(T, d) dense MLP output minus the MoE MLP's, for rows of x."""
    out = []
    for s in range(0, x.shape[0], chunk):
        xc = x[s:s + chunk]
        m.teacher = True
        dense = m(xc)
        m.teacher = False
        out.append(dense - m(xc))
    return torch.cat(out)


def main() -> int:
    p = study_parser(__doc__)
    p.add_argument("--expert-counts", default="per-token", choices=["fixed", "per-token"])
    p.add_argument("--ridge", type=float, default=1e-3)
    args = p.parse_args()
    ckpt, adapter, model, bos, texts = load_study(args)
    e, s, k = expert_layout("finegrained", ckpt.d_ff, args.fraction, None)
    opts = MethodOptions(experts=e, shared=s, top_k=k, calib=DEFAULT_CALIB, seed=args.seed,
                         own=FinegrainedOptions(expert_counts=args.expert_counts))
    moeify_(model, adapter, make_plans(ckpt, adapter, "finegrained", opts))
    mlps = [m for m in model.modules() if isinstance(m, MoEMLP)]
    calib = calib_tokens(ckpt, opts.calib, opts.calib_samples, opts.calib_seqlen, opts.seed)
    x_cal = capture_inputs(model, mlps, list(calib.split(4)))
    x_txt = {name: capture_inputs(model, mlps, [torch.tensor([w]) for w in windows(ids, args.ctx, args.chunks, bos)])
             for name, ids in texts.items()}
    fits = {"mean": [], "linear": []}
    removed = {(v, t): [] for v in fits for t in texts}
    for i, m in enumerate(mlps):
        r = residual(m, x_cal[i])
        fits["mean"].append(lambda x, b=r.mean(0): b.expand(x.shape[0], -1))
        w = torch.as_tensor(ridge_least_squares(torch.cat([x_cal[i], torch.ones(len(r), 1)], 1), r, args.ridge))
        fits["linear"].append(lambda x, w=w: x @ w[:, :-1].t() + w[:, -1])
        for t, xs in x_txt.items():
            rt = residual(m, xs[i])
            for v in fits:
                removed[v, t].append(1 - float((rt - fits[v][i](xs[i])).pow(2).sum() / rt.pow(2).sum()))
        del r
        print(f"layer {i} done", flush=True)
    print(f"\nS{s}A{k}E{e} {args.expert_counts}: share of the residual's energy removed, mean over layers "
          f"(min, max)")
    for (v, t), got in removed.items():
        print(f"{v} {t}: {sum(got) / len(got):.3f} ({min(got):.3f}, {max(got):.3f})")
    print("\n| correction | " + " | ".join(texts) + " |")
    print("|---|" + "---|" * len(texts))
    for v in ("none", *fits):
        hooks = [] if v == "none" else [
            m.register_forward_hook(lambda mod, a, out, f=fits[v][i]: out + f(a[0].reshape(-1, a[0].shape[-1]))
                                    .reshape(out.shape)) for i, m in enumerate(mlps)]
        got = {t: perplexity(logits_fn(model), ids, args.ctx, args.chunks, bos, t).ppl for t, ids in texts.items()}
        for h in hooks:
            h.remove()
        print(f"| {v} | " + " | ".join(f"{got[t]:.2f}" for t in texts) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
