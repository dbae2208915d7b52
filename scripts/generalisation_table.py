"""Does what calibration teaches carry to other kinds of text? Perplexity ratio to dense per calibration source,
active fraction and evaluation text, in the torch reference.

    .venv/bin/python scripts/generalisation_table.py MODEL [--method finegrained] [--router linear]
        [--calibs 'generated;FILE;generated,bundled'] [--texts FILE,FILE] [--fractions 0.25,0.5,0.75]
        [--chunks 8 --ctx 512] [--calib-samples 8 --calib-seqlen 512] [--finetune lm|kd]
        [--expert-counts fixed|per-token] [--out out/generalisation]

Each (calibration source, fraction) is converted once (E/S/K from ``--active``'s sizing for the model's d_ff) and
scored on every text; the dense perplexity of each text is computed once. With ``--expert-counts per-token`` each
cell also gives the active fraction measured on that text (the calibrated one is the column's). Results are appended to
``OUT/generalisation.jsonl`` (cells already there are skipped) and the table goes to ``OUT/generalisation.md``.
Defaults: calibration ``generated``, the bundled *Sense and Sensibility* excerpt, and both (half the windows
each); evaluation on the bundled
*Pride and Prejudice* excerpt (same author) and the Python tutorial excerpt (non-fiction).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_moeify.bundled import CALIB_EXCERPT, EVAL_EXCERPT, NONFICTION_EXCERPT  # noqa: E402
from gguf_moeify.convert import make_plans, open_model  # noqa: E402
from gguf_moeify.eval_cmd import add_bos_of  # noqa: E402
from gguf_moeify.evaluate import perplexity, read_text, tokenize_for_ppl  # noqa: E402
from gguf_moeify.finetune import LoRAOptions, finetune_lora  # noqa: E402
from gguf_moeify.methods import FinegrainedOptions, MethodOptions  # noqa: E402
from gguf_moeify.moe_torch import MoEMLP, experts_used_by_layer  # noqa: E402
from gguf_moeify.reference import load_dense, logits_fn, moeify_  # noqa: E402
from gguf_moeify.sizing import expert_layout  # noqa: E402


def label(source: str) -> str:
    return "+".join(Path(part).stem.replace("_excerpt", "") for part in source.split(","))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--method", default="finegrained")
    p.add_argument("--router", default="linear", help="finegrained's --router (linear or mlp)")
    p.add_argument("--finetune", default=None, choices=("lm", "kd"),
                   help="then LoRA recovery with that loss (convert's --finetune lora defaults) on the calibration "
                        "source, scored on every text again")
    p.add_argument("--calibs", default=f"generated;{CALIB_EXCERPT};generated,bundled",
                   help="calibration sources separated by ';' (one source may join several with ',')")
    p.add_argument("--texts", default=f"{EVAL_EXCERPT},{NONFICTION_EXCERPT}")
    p.add_argument("--fractions", default="0.25,0.5,0.75")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert-counts", default="fixed", choices=("fixed", "per-token"), help="finegrained's")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="--finetune: training steps (default: one pass over the training windows)")
    p.add_argument("--shared-share", type=float, default=None,
                   help="share of the active experts that are shared (default: the converter's, a third)")
    p.add_argument("--out", default="out/generalisation")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "generalisation.jsonl"
    done = {json.loads(line)["key"]: json.loads(line) for line in log.read_text().splitlines()} if log.is_file() else {}
    ckpt, adapter = open_model(args.model, "float32")
    texts = args.texts.split(",")
    model, tok = load_dense(ckpt)
    bos = tok.bos_token_id if add_bos_of(tok) else None
    tokens = {t: tokenize_for_ppl(tok, read_text(t), bos is not None) for t in texts}
    dense = {}
    for calib in args.calibs.split(";"):
        for f in (float(x) for x in args.fractions.split(",")):
            e, s, k = expert_layout(args.method, ckpt.d_ff, f, None)
            if args.shared_share is not None:
                s, k = round(args.shared_share * (s + k)), s + k - round(args.shared_share * (s + k))
            own = FinegrainedOptions(router=args.router, expert_counts=args.expert_counts) \
                if args.method == "finegrained" else None
            data = None if args.method == "mlpmoe" else calib   # mlpmoe (all active: the dense MLP) uses none
            opts = MethodOptions(experts=e, shared=s, top_k=k, calib=data, calib_samples=args.calib_samples,
                                 calib_seqlen=args.calib_seqlen, seed=args.seed, own=own)
            key = json.dumps({"model": args.model, "method": args.method, "calib": label(calib), "f": f,
                              **({"finetune": args.finetune} if args.finetune else {}),
                              **({"finetune_steps": args.finetune_steps} if args.finetune_steps else {}),
                              "texts": [label(t) for t in texts], "chunks": args.chunks, "ctx": args.ctx,
                              "opts": opts.recorded()}, sort_keys=True, default=str)
            if key in done:
                continue
            t0 = time.time()
            for t in texts:
                if t not in dense:
                    dense[t] = perplexity(logits_fn(model), tokens[t], args.ctx, args.chunks, bos, "dense").ppl
            plans = make_plans(ckpt, adapter, args.method, opts)
            moeify_(model, adapter, plans)
            name = label(calib) + (" per-token" if args.expert_counts == "per-token" else "")
            rec = {"key": key, "calib": name, "f": f, "sae": f"S{s}A{k}E{e}", "ppl": {}, "dense": {}, "active": {}}
            for t in texts:
                moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
                for m in moes:   # count each text's experts apart
                    m.experts_used, m.rows_routed = 0.0, 0
                rec["ppl"][label(t)] = perplexity(logits_fn(model), tokens[t], args.ctx, args.chunks, bos,
                                                  label(t)).ppl
                rec["dense"][label(t)] = dense[t]
                used = experts_used_by_layer(model)
                if used is not None:
                    rec["active"][label(t)] = sum(p.active_fraction(u) for p, u in zip(plans, used)) / len(plans)
            if args.finetune:
                lora = LoRAOptions(seed=args.seed, loss=args.finetune, steps=args.finetune_steps)
                rec["finetune"] = {k: v for k, v in finetune_lora(model, ckpt, adapter, calib, lora).items()
                                   if isinstance(v, (int, float, str))}
                rec["tuned"] = {label(t): perplexity(logits_fn(model), tokens[t], args.ctx, args.chunks, bos,
                                                     label(t)).ppl for t in texts}
            rec["seconds"] = round(time.time() - t0, 1)
            model, _ = load_dense(ckpt, tokenizer=False)     # a fresh dense model for the next plan
            with log.open("a") as fh:
                fh.write(json.dumps(rec, sort_keys=True) + "\n")
            done[key] = rec
            print(rec["calib"], f, {t: f"{rec['ppl'][t]:.2f} ({rec['ppl'][t] / rec['dense'][t]:.2f}x)"
                                    for t in rec["ppl"]}, {t: f"{a:.1%} active" for t, a in rec["active"].items()},
                  f"[{rec['seconds']:.0f} s]", flush=True)
            if "tuned" in rec:
                print("  after LoRA", {t: f"{v:.2f} ({v / rec['dense'][t]:.2f}x)" for t, v in rec["tuned"].items()},
                      flush=True)
    (out / "generalisation.md").write_text(markdown(list(done.values())))
    print(markdown(list(done.values())))
    return 0


def markdown(recs: list[dict]) -> str:
    """One row per calibration source (and, after LoRA, ``source + LoRA kd|lm``) and text; a cell per fraction."""
    texts = sorted({t for r in recs for t in r["ppl"]})
    fractions = sorted({r["f"] for r in recs})
    lines = ["dense: " + ", ".join(f"{t} {recs[0]['dense'][t]:.3f}" for t in texts if t in recs[0]["dense"]), "",
             "| calibration | text | " + " | ".join(f"{f:.0%} active" for f in fractions) + " |",
             "|---|---|" + "---|" * len(fractions)]
    by, active = {}, {}
    for r in recs:
        by[r["calib"], r["f"]] = r["ppl"], r["dense"]
        active[r["calib"], r["f"]] = r.get("active", {})
        if "tuned" in r:
            by[f"{r['calib']} + LoRA {r['finetune']['loss']}", r["f"]] = r["tuned"], r["dense"]
    for row in dict.fromkeys(name for name, _ in by):
        for t in texts:
            cells = [f"{by[row, f][0][t]:.2f} ({by[row, f][0][t] / by[row, f][1][t]:.2f}x"
                     + (f", {active[row, f][t]:.1%} active)" if t in active.get((row, f), {}) else ")")
                     if (row, f) in by and t in by[row, f][0] else "" for f in fractions]
            lines.append(f"| {row} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
