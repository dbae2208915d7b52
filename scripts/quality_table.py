"""Perplexity table, method x active fraction, in the torch reference, with both oracle ceilings next to each cell.

    .venv/bin/python scripts/quality_table.py MODEL --text EVAL.txt --calib CALIB.txt [--chunks 4]
        [--calib-samples 8 --calib-seqlen 512] [--rows cmoe,moefication:param:similarity,...] [--out DIR]

Each row is a method (``moefication:SPLIT:ROUTER``, ``finegrained:ROUTER``, ``slice`` for MLPMoE slicing with the
data-free slice router, ``slice:METHOD`` with METHOD's E/S/K). Suffixes: ``@stock`` writes the plan for stock
llama.cpp (``--runtime stock``; the cell adds how often its router agrees with the original); ``+lora`` adds the
``--finetune lora`` recovery with its defaults (the cell shows the fine-tuned model, the training-free ratio next to
it; ``+lora:kd:router=ste:steps=N``: see ``lora_options``); ``:E<n>`` sets E (e.g. ``finegrained:linear:E24``).
``tomoe`` trains ToMoE with --budget = the column's fraction
(``tomoe:tokens``: --budget-on tokens) and its default training options (the cell gives the training time and
the file's active fraction with padding). Each column is an active fraction (25/50/75%), mapped to
E/S/K for the model's d_ff as ``convert --active`` and ``bench`` do (``sizing.expert_layout``; on d_ff 1536:
cmoe/slice: S2A2E16, S4A4E16, S6A6E16; moefication: S0A4E16, ...; finegrained: S4A8E48, S8A16E48, S12A24E48).
A cell is ``ppl (ratio to dense)`` and, below it, the expert oracle (same experts, chosen per token by true output
norm) and the neuron oracle (same number of neurons chosen one by one). Results are appended to
``DIR/quality.jsonl`` (a cell already there with the same recipe is not recomputed) and the table is written to
``DIR/quality.md``.
"""
from __future__ import annotations

import argparse
import re
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_moeify.eval_cmd import evaluate_model  # noqa: E402
from gguf_moeify.finetune import LoRAOptions  # noqa: E402
from gguf_moeify.methods import FinegrainedOptions, MethodOptions, MoEficationOptions, ToMoEOptions  # noqa: E402
from gguf_moeify.sizing import expert_layout  # noqa: E402

DEFAULT_ROWS = ("slice,cmoe,moefication:param:similarity,moefication:param:mlp,moefication:coact:similarity,"
                "moefication:coact:mlp,finegrained:linear")


def row_options(row: str, fraction: float, args) -> tuple[str, MethodOptions]:
    runtime = "stock" if "@stock" in row else "patched"
    parts = row.split("+")[0].split("@")[0].split(":")
    name = parts[0]
    method = "mlpmoe" if name == "slice" else name
    # a trailing ``:E<n>`` sets the number of experts (e.g. finegrained:linear:E24: 64-neuron experts on SmolLM2)
    experts = int(parts.pop()[1:]) if len(parts) > 1 and re.fullmatch(r"[Ee]\d+", parts[-1]) else None
    if name == "tomoe":  # trained to the fraction (--budget), top-1 of E experts (default 8); tomoe:tokens: the
        # paper's per-token budget (--budget-on tokens); tomoe+lora and tomoe@stock reuse the tomoe row's training
        budget_on = parts[1] if len(parts) > 1 else "widest"
        state = Path(args.out) / f"{row.split('+')[0].split('@')[0]}-{fraction}.tomoe-state.pt"
        return method, MethodOptions(experts=experts or 8, shared=0, top_k=None, calib=args.calib, seed=args.seed,
                                     runtime=runtime, own=ToMoEOptions(budget=fraction, budget_on=budget_on,
                                                                       state=str(state)))
    # slice:METHOD takes METHOD's SxAyEz (e.g. slice:moefication: no shared slice), plain slice CMoE's
    e, s, k = expert_layout(parts[1] if name == "slice" and len(parts) > 1 else method, args.d_ff, fraction, experts)
    own = None
    if name == "moefication":
        own = MoEficationOptions(split=parts[1], router=parts[2])
    elif name == "finegrained":
        own = FinegrainedOptions(router=parts[1] if len(parts) > 1 else "linear")
    calib = None if method == "mlpmoe" else args.calib
    return method, MethodOptions(experts=e, shared=s, top_k=k, calib=calib, calib_samples=args.calib_samples,
                                 calib_seqlen=args.calib_seqlen, seed=args.seed, runtime=runtime, own=own)


def lora_options(row: str, seed: int, data: str | None) -> LoRAOptions | None:
    """``+lora`` with its defaults; ``+lora:kd`` distils the dense model, ``:router=ste|refit`` (--finetune-router),
    ``:steps=N`` / ``:samples=N`` set the run's length, ``:lr=X`` / ``:rank=N`` the optimiser's step and LoRA's rank
    (e.g. ``finegrained:linear+lora:router=refit:steps=224``)."""
    if "+lora" not in row:
        return None
    opts = LoRAOptions(seed=seed, data=data)
    for part in row.split("+lora", 1)[1].split(":")[1:]:
        if part == "kd":
            opts.loss = "kd"
        elif part.startswith("router="):
            opts.router = part.split("=")[1]
        elif part.split("=")[0] in ("steps", "samples", "rank"):
            setattr(opts, part.split("=")[0], int(part.split("=")[1]))
        elif part.startswith("lr="):
            opts.lr = float(part.split("=")[1])
        else:
            raise SystemExit(f"unknown +lora option {part!r} in row {row!r}")
    return opts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--text", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=DEFAULT_ROWS)
    p.add_argument("--fractions", default="0.25,0.5,0.75")
    p.add_argument("--out", default="out/quality")
    p.add_argument("--report", action="store_true", help="only write the table from the cells already measured")
    args = p.parse_args()
    from gguf_moeify.checkpoint import Checkpoint
    args.d_ff = Checkpoint(args.model).d_ff   # fractions are sized for this model (sizing.expert_layout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "quality.jsonl"
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    fractions = [float(f) for f in args.fractions.split(",")]
    for row in rows:
        for f in fractions:
            method, opts = row_options(row, f, args)
            # data-free rows (slice) fine-tune on the --calib text too (slice+lora at 1.0: the dense model + LoRA)
            lora = lora_options(row, args.seed, None if opts.calib else args.calib)
            key = {"row": row, "f": f, "model": args.model, "text": args.text, "chunks": args.chunks,
                   "ctx": args.ctx, "opts": {k: v for k, v in opts.recorded().items()
                                             if k != "runtime" or v != "patched"}}
            if lora is not None:
                # the newer options only when set, so cells measured before they existed keep their keys
                key["lora"] = {k: v for k, v in lora.__dict__.items()
                               if (k, v) not in (("loss", "lm"), ("router", "frozen"))}
            key = json.dumps(key, sort_keys=True, default=str)
            if key in done or args.report:
                continue
            t0 = time.time()
            res = evaluate_model(args.model, args.text, method, opts, ctx=args.ctx, chunks=args.chunks, oracle=True,
                                 finetune=lora)
            rec = {"key": key, "row": row, "f": f, "seconds": round(time.time() - t0, 1),
                   "sae": f"S{opts.shared}A{opts.top_k}E{opts.experts}", **res}
            if method == "tomoe":  # what the file computes per token (padding included) and the training time
                train = res["plan"]["training"]
                rec["sae"] = (f"E{opts.experts} top-1, {res['active_fraction']:.0%} computed, trained "
                              f"{train['steps']} steps, cell {rec['seconds'] / 60:.1f} min")
            with log.open("a") as fh:
                fh.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
            done[key] = rec
            tuned = f"  after LoRA {res['finetuned_ratio']:.2f}x" if lora is not None else ""
            print(f"{row} {f:.0%}: ppl {res['moe']['ppl']:.2f} ({res['ratio']:.2f}x){tuned}  expert oracle "
                  f"{res['oracle_ratio']:.2f}x  neuron oracle {res['neuron_oracle_ratio']:.2f}x  "
                  f"[{rec['seconds']:.0f} s]", flush=True)
    table = markdown([r for r in done.values() if r["row"] in rows], rows, fractions)
    (out / "quality.md").write_text(table)
    print(table)
    return 0


def markdown(recs: list[dict], rows: list[str], fractions: list[float]) -> str:
    by = {(r["row"], r["f"]): r for r in recs}
    dense = next((r["dense"]["ppl"] for r in recs), float("nan"))
    head = "| method | " + " | ".join(f"{f:.0%} active" for f in fractions) + " |"
    lines = [f"dense perplexity {dense:.3f}; cell: ppl (x dense) [SxAyEz] / expert oracle / neuron oracle", "",
             head, "|---" * (len(fractions) + 1) + "|"]
    for row in rows:
        cells = []
        for f in fractions:
            r = by.get((row, f))
            if r is None:
                cells.append("")
            elif "finetuned" in r:  # a +lora row: the fine-tuned model, the training-free figure in brackets
                cells.append(f"{r['finetuned']['ppl']:.1f} ({r['finetuned_ratio']:.2f}x; before LoRA "
                             f"{r['ratio']:.2f}x) [{r['sae']}] / {r['oracle_ratio']:.2f}x / "
                             f"{r['neuron_oracle_ratio']:.2f}x")
            else:
                agree = f" {r['stock_router_agreement']:.0%} agree" if "stock_router_agreement" in r else ""
                cells.append(f"{r['moe']['ppl']:.1f} ({r['ratio']:.2f}x){agree} [{r['sae']}] / "
                             f"{r['oracle_ratio']:.2f}x / {r['neuron_oracle_ratio']:.2f}x")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
