"""How should the linear router be fitted so that it carries to text unlike the calibration text? Torch reference,
finegrained (default calibration); a measurement that compares fits, not a conversion.

    .venv/bin/python scripts/router_fit_study.py MODEL [--fraction 0.5] [--texts FILE,FILE] [--chunks 8 --ctx 512]
        [--layers 0,5,10,...] [--ppl VARIANT,VARIANT]

The MLP inputs x of every MoE layer are captured (forward pre-hooks) on the calibration windows and on each
evaluation text, running the converted model itself, so each layer sees what its router sees in the file. Per
layer, each variant is fitted on the calibration inputs and scored on each text's inputs against the expert oracle
(the top_k experts by true output norm): recall@k (share of the oracle's experts chosen) and the share of the
oracle's routed output energy (sum of squared norms) the chosen experts carry. Variants:

- ``ls``: the file's router (ridge 1e-3 on per-token standardised log norms, raw x);
- ``ridge=R``: the same with ridge factor R;
- ``unit-x``: fitted on x / ||x|| (the ranking of a token's scores does not change with the scale of x, so the file
  can use the result as is; the fit stops weighting large-norm tokens more);
- ``bias``: with a per-expert bias (the file's selection bias, ``exp_probs_b``, adds one before the top-k);
- ``in-domain``: fitted on the first half of the text's own inputs, scored on the second half (a linear router
  that saw that kind of text, from as many tokens as the text's windows give).

``--ppl`` then sets every layer's router to the named variants in turn and prints the perplexity of each text.
"""
from __future__ import annotations

import numpy as np
import torch

from router_study_setup import convert_finegrained, load_study, study_parser

from gguf_moeify.calibration import calib_tokens
from gguf_moeify.evaluate import perplexity, windows
from gguf_moeify.linalg import ridge_least_squares
from gguf_moeify.methods.finegrained import recall_at_k
from gguf_moeify.moe_torch import MoEMLP
from gguf_moeify.reference import logits_fn
from gguf_moeify.routers import fit_linear_router, log_norm_targets


def capture_inputs(model, mlps: list[MoEMLP], batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """(T, d) MLP inputs of every MoE layer over all ``batches`` of token windows."""
    got: list[list[torch.Tensor]] = [[] for _ in mlps]
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: got[i].append(args[0].reshape(-1, args[0].shape[-1])))
             for i, m in enumerate(mlps)]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(g) for g in got]


def fit(variant: str, x: torch.Tensor, norms: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight (E, d), bias (E,) or None) of a linear router fitted on (x, norms) as ``variant`` says."""
    if variant in ("ls", "in-domain"):
        return fit_linear_router(x, norms), None
    y = log_norm_targets(norms)
    if variant.startswith("ridge="):
        return ridge_least_squares(x, y, float(variant.split("=")[1])), None
    if variant == "unit-x":
        return ridge_least_squares(x / x.norm(dim=1, keepdim=True).clamp_min(1e-12), y), None
    if variant == "bias":
        w = ridge_least_squares(torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1), y)
        return w[:, :-1], w[:, -1]
    raise ValueError(variant)


def chosen_scores(w: np.ndarray, b: np.ndarray | None, x: torch.Tensor) -> torch.Tensor:
    s = x.float() @ torch.as_tensor(w).t()
    return s if b is None else s + torch.as_tensor(b)


def agreement(scores: torch.Tensor, norms: torch.Tensor, k: int) -> tuple[float, float]:
    """(recall@k against the oracle, share of the oracle's routed energy the chosen experts carry)."""
    pick = torch.topk(scores, k, dim=1).indices
    best = torch.topk(norms, k, dim=1).indices
    energy = norms.double() ** 2
    return recall_at_k(scores, norms, k), float(energy.gather(1, pick).sum() / energy.gather(1, best).sum())


def main() -> int:
    p = study_parser(__doc__)
    p.add_argument("--variants", default="ls,ridge=0.01,ridge=0.1,unit-x,bias,in-domain",
                   help="fits to compare (see above; default all)")
    p.add_argument("--layers", default=None, help="layers to score (default: every third)")
    p.add_argument("--ppl", default="", help="variants to score by perplexity with every layer's router replaced")
    args = p.parse_args()
    ckpt, adapter, model, bos, texts = load_study(args)
    mlps, (e, s, k), opts = convert_finegrained(model, ckpt, adapter, args)
    layers = [int(v) for v in args.layers.split(",")] if args.layers else list(range(0, len(mlps), 3))
    calib = calib_tokens(ckpt, opts.calib, opts.calib_samples, opts.calib_seqlen, opts.seed)
    x_cal = capture_inputs(model, mlps, list(calib.split(4)))
    x_txt = {name: capture_inputs(model, mlps, [torch.tensor([w]) for w in windows(ids, args.ctx, args.chunks, bos)])
             for name, ids in texts.items()}
    variants = args.variants.split(",")
    wanted = set(variants) | set(filter(None, args.ppl.split(",")))
    table = {(v, t): [] for v in variants for t in texts}
    fitted: dict[str, list] = {v: [] for v in wanted}
    with torch.no_grad():
        for i, m in enumerate(mlps):
            norms_cal = m._expert_norms(x_cal[i])
            for v in wanted - {"in-domain"}:
                fitted[v].append(fit(v, x_cal[i], norms_cal))
            if i not in layers:
                continue
            for t, xs in x_txt.items():
                norms = m._expert_norms(xs[i])
                for v in variants:
                    if v == "in-domain":
                        half = xs[i].shape[0] // 2
                        w, b = fit(v, xs[i][:half], norms[:half])
                        table[v, t].append(agreement(chosen_scores(w, b, xs[i][half:]), norms[half:], m.top_k))
                    else:
                        w, b = fitted[v][i]
                        table[v, t].append(agreement(chosen_scores(w, b, xs[i]), norms, m.top_k))
            print(f"layer {i} done", flush=True)
    print(f"\nlayers {layers}, S{s}A{k}E{e}; mean over layers: recall@k / share of the oracle's routed energy")
    print("| fit | " + " | ".join(texts) + " |")
    print("|---|" + "---|" * len(texts))
    for v in variants:
        cells = [f"{np.mean([r for r, _ in table[v, t]]):.3f} / {np.mean([en for _, en in table[v, t]]):.3f}"
                 for t in texts]
        print(f"| {v} | " + " | ".join(cells) + " |", flush=True)
    if args.ppl:
        linear = {m: m.scores for m in mlps}
        print("\n| router | " + " | ".join(texts) + " |")
        print("|---|" + "---|" * len(texts))
        for v in args.ppl.split(","):
            for m, (w, b) in zip(mlps, fitted[v]):
                m.scores = (lambda x, w=torch.as_tensor(w), b=None if b is None else torch.as_tensor(b):
                            x @ w.t() if b is None else x @ w.t() + b)
            got = {t: perplexity(logits_fn(model), ids, args.ctx, args.chunks, bos, t).ppl
                   for t, ids in texts.items()}
            print(f"| {v} | " + " | ".join(f"{got[t]:.2f}" for t in texts) + " |", flush=True)
        for m in mlps:
            m.scores = linear[m]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
