"""Can the router choose how many experts each token gets? Torch reference, finegrained (default calibration); a
measurement that compares selection rules at the same mean number of experts, not a conversion.

    .venv/bin/python scripts/router_count_study.py MODEL [--fraction 0.5] [--texts FILE,FILE] [--chunks 8]
        [--max-factor 2]

The file's linear router predicts *per-token standardised* log expert norms: it ranks a token's experts but says
nothing about how much the token's MLP output is worth next to another token's. Here each layer also gets a linear
router with a per-expert bias fitted to the *raw* log norms (least squares on the calibration inputs, captured from
the converted model), which can be compared across tokens. Rules, each scored by perplexity on each text, with the
mean number of routed experts per token it actually used there:

- ``fixed[:K]``: the file's router, top K per token (default top_k);
- ``raw-fixed``: the raw-norm router, top_k per token;
- ``raw-threshold[:M]``: the raw-norm router, every expert whose predicted log norm reaches the layer's threshold,
  at most ``max-factor * top_k``; the threshold set on the calibration inputs so their mean count is M (default
  top_k);
- ``expert-var``: the expert oracle with a per-token count (true norms; the ceiling of the threshold rule).
"""
from __future__ import annotations

import numpy as np
import torch

from router_fit_study import capture_inputs
from router_study_setup import convert_finegrained, load_study, study_parser

from gguf_moeify.calibration import calib_tokens
from gguf_moeify.evaluate import perplexity
from gguf_moeify.reference import logits_fn
from gguf_moeify.routers import count_threshold, fit_log_norm_router


def main() -> int:
    p = study_parser(__doc__)
    p.add_argument("--rules", default="fixed,raw-fixed,raw-threshold,expert-var", help="rules to score (see above)")
    p.add_argument("--max-factor", type=float, default=2.0, help="most experts a token may get, in top_k (default 2)")
    args = p.parse_args()
    ckpt, adapter, model, bos, texts = load_study(args)
    mlps, (e, s, k), opts = convert_finegrained(model, ckpt, adapter, args)
    calib = calib_tokens(ckpt, opts.calib, opts.calib_samples, opts.calib_seqlen, opts.seed)
    x_cal = capture_inputs(model, mlps, list(calib.split(4)))
    k_max = min(e, int(round(args.max_factor * k)))
    rules = args.rules.split(",")
    means = sorted({float(r.split(":")[1]) if ":" in r else float(k) for r in rules if r.startswith("raw-threshold")})
    raw, thresholds = [], {mean: [] for mean in means}
    with torch.no_grad():
        for i, m in enumerate(mlps):
            w, b = (torch.as_tensor(a).float() for a in fit_log_norm_router(x_cal[i], m._expert_norms(x_cal[i])))
            raw.append((w, b))
            for mean in means:
                thresholds[mean].append(count_threshold(x_cal[i].float() @ w.t() + b, mean, k_max))
    counts: list[list[float]] = [[] for _ in mlps]

    def rule(m, i, name):
        def select_weighted(x):
            if name.startswith("fixed"):
                kk = int(name.split(":")[1])
                idx = torch.topk(m.scores(x), kk, dim=1).indices
                counts[i].append(float(kk))
                return idx, None
            if name == "raw-fixed":
                idx = torch.topk(x @ raw[i][0].t() + raw[i][1], k, dim=1).indices
                counts[i].append(float(k))
                return idx, None
            tau = thresholds[float(name.split(":")[1]) if ":" in name else float(k)][i]
            sc = x @ raw[i][0].t() + raw[i][1]
            top = torch.topk(sc, k_max, dim=1)
            on = (top.values > tau).to(x.dtype)   # as the file: above the threshold
            counts[i].append(float(on.sum(1).mean()))
            return top.indices, on
        return select_weighted

    print(f"S{s}A{k}E{e}, at most {k_max} experts per token with a threshold")
    print("| rule | " + " | ".join(f"{t} ppl | {t} mean experts" for t in texts) + " |")
    print("|---|" + "---|---|" * len(texts))
    for name in rules:
        cells = []
        for t, ids in texts.items():
            for c in counts:
                c.clear()
            for i, m in enumerate(mlps):
                m.oracle = "expert-var" if name == "expert-var" else False
                if name.startswith("raw") or name.startswith("fixed:"):
                    m.select_weighted = rule(m, i, name)
                elif "select_weighted" in m.__dict__:
                    del m.select_weighted
            ppl = perplexity(logits_fn(model), ids, args.ctx, args.chunks, bos, t).ppl
            used = np.mean([np.mean(c) for c in counts]) if counts[0] else float(k)
            cells.append(f"{ppl:.2f} | {used:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
