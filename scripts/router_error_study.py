"""Where does a per-token-count router lose against its oracle: in how many experts it gives a token, or in which?
Torch reference, finegrained with ``--expert-counts per-token`` (default calibration); a measurement, not a
conversion.

    .venv/bin/python scripts/router_error_study.py MODEL [--fraction 0.5] [--texts FILE,FILE] [--layers 0,5,...]
        [--powers 0.5,1] [--shared-features]

The MLP inputs of every MoE layer are captured (running the converted model) on the calibration windows and on each
text. Per layer, a linear router with a per-expert bias is fitted to the raw log expert norms on the calibration
inputs (``raw``: the file's fit; ``wP``: weighted least squares, each (token, expert) target weighted by its norm
to the power P, so the large outputs that decide a choice count more), its threshold set so that the calibration
tokens use top_k experts on average, as the converter does. Its error on a text, prediction minus log norm, splits
into a per-token common part (the mean over the token's experts: how much the token's MLP output matters, which
sets its count) and the rest (which of its experts matter). Printed, as means over the layers: the variance of each
part and of the true per-token mean log norm; the mean count the threshold gives on the text; the share of the
per-token oracle's routed output energy (the same total count spent on the (token, expert) pairs with the largest
norms) the router's choices carry; and that share again with the common part of the error removed (the router's
ranking with a perfect count predictor).

``--shared-features`` adds two routers that also see what every token computes anyway, the shared expert's
activations: ``x+h`` fitted on [x, h] with h = act(x G_s) * (x U_s) the shared expert's hidden values, ``x+a+h`` on
[x, act(x G_s), h] (every feature scaled to unit mean square on the calibration inputs before the ridge fit).
"""
from __future__ import annotations

import numpy as np
import torch

from router_fit_study import capture_inputs
from router_study_setup import convert_finegrained, load_study, study_parser

from gguf_moeify.calibration import calib_tokens
from gguf_moeify.evaluate import windows
from gguf_moeify.linalg import ridge_least_squares
from gguf_moeify.routers import count_threshold, fit_log_norm_router


def weighted_log_norm_router(x: torch.Tensor, norms: torch.Tensor, power: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) as fit_log_norm_router, each target weighted by norm ** power (one solve per expert)."""
    y = torch.log(norms.double().clamp_min(1e-12))
    xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    wt = norms.double() ** power
    wt = (wt / wt.mean(0, keepdim=True)).sqrt()
    w = np.concatenate([ridge_least_squares(xa * wt[:, j:j + 1], y[:, j:j + 1] * wt[:, j:j + 1])
                        for j in range(norms.shape[1])])
    return w[:, :-1], w[:, -1]


def shared_features(m, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The router's input: x, or x with the shared expert's activations (module docstring)."""
    x = x.float()
    if kind == "x":
        return x
    gate = m.act(x @ m.gate_shexp.t())
    h = gate * (x @ m.up_shexp.t())
    return torch.cat([x, h] if kind == "x+h" else [x, gate, h], 1)


def energy_share(scores: torch.Tensor, threshold: float, norms: torch.Tensor, k_max: int) -> tuple[float, float]:
    """(mean count, share of the per-token oracle's energy at the same total count) of the threshold rule."""
    top = torch.topk(scores, k_max, dim=1)
    on = top.values > threshold
    count = int(on.sum())
    energy = norms.double() ** 2
    chosen = float(energy.gather(1, top.indices)[on].sum())
    best = float(torch.topk(energy.reshape(-1), count).values.sum())
    return count / scores.shape[0], chosen / best


def main() -> int:
    p = study_parser(__doc__)
    p.add_argument("--layers", default=None, help="layers to score (default: every fifth)")
    p.add_argument("--powers", default="0.5,1", help="weighted fits to compare with the file's (default 0.5,1)")
    p.add_argument("--shared-features", action="store_true",
                   help="also fit routers on x and the shared expert's activations (x+h, x+a+h)")
    args = p.parse_args()
    ckpt, adapter, model, bos, texts = load_study(args)
    mlps, (e, s, k), opts = convert_finegrained(model, ckpt, adapter, args, expert_counts="per-token")
    calib = calib_tokens(ckpt, opts.calib, opts.calib_samples, opts.calib_seqlen, opts.seed)
    x_cal = capture_inputs(model, mlps, list(calib.split(4)))
    x_txt = {name: capture_inputs(model, mlps, [torch.tensor([w]) for w in windows(ids, args.ctx, args.chunks, bos)])
             for name, ids in texts.items()}
    layers = [int(v) for v in args.layers.split(",")] if args.layers else list(range(0, len(mlps), 5))
    k_max = mlps[0].top_k   # the plan's most experts a token may use
    fits = {"raw": ("x", fit_log_norm_router)} | {
        f"w{pw}": ("x", lambda x, n, pw=float(pw): weighted_log_norm_router(x, n, pw))
        for pw in args.powers.split(",") if pw}
    if args.shared_features:
        fits |= {kind: (kind, fit_log_norm_router) for kind in ("x+h", "x+a+h")}
    rows: dict[tuple[str, str], list] = {}
    with torch.no_grad():
        for i in layers:
            m = mlps[i]
            norms_cal = m._expert_norms(x_cal[i])
            for name, (kind, fit) in fits.items():
                f_cal = shared_features(m, x_cal[i], kind)
                scale = f_cal.pow(2).mean(0).sqrt().clamp_min(1e-6) if kind != "x" else torch.ones(f_cal.shape[1])
                w, b = (torch.as_tensor(a).float() for a in fit(f_cal / scale, norms_cal))
                threshold = count_threshold((f_cal / scale) @ w.t() + b, k, k_max)
                for t, xs in [("calibration", x_cal[i])] + [(n, x[i]) for n, x in x_txt.items()]:
                    norms = m._expert_norms(xs)
                    scores = (shared_features(m, xs, kind) / scale) @ w.t() + b
                    truth = torch.log(norms.clamp_min(1e-12))
                    common = (scores - truth).mean(1, keepdim=True)
                    count, share = energy_share(scores, threshold, norms, k_max)
                    fixed = scores - common     # the same ranking, the true per-token magnitude
                    _, share_fixed = energy_share(fixed, count_threshold(fixed, count, k_max), norms, k_max)
                    rows.setdefault((name, t), []).append(
                        (float(common.var()), float((scores - truth - common).var()), float(truth.mean(1).var()),
                         count, share, share_fixed))
            print(f"layer {i} done", flush=True)
    print(f"\nS{s}A{k}E{e}, at most {k_max} routed experts a token; mean over layers {layers}")
    print("| fit | text | var common error | var rest of error | var true token mean | mean count "
          "| oracle energy share | with true magnitude |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, t), r in rows.items():
        a = np.mean(r, 0)
        print(f"| {name} | {t} | {a[0]:.3f} | {a[1]:.3f} | {a[2]:.3f} | {a[3]:.2f} | {a[4]:.4f} | {a[5]:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
