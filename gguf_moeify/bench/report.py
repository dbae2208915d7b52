"""What bench writes: ``results.jsonl`` (one object per model), ``results.md`` (title and table; SYNTHETIC runs add
the bandwidth summary) and ``plot.png`` (perplexity, KLD or the SYNTHETIC decode speedup against decode tokens/s;
dense models as stars)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(v, spec: str, err=None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    s = format(v, spec)
    return s + (" ± " + format(err, spec) if err is not None else "")


def on_frontier(rows: list[dict], y: str = "ppl") -> list[bool]:
    """For each row: is it on the speed/quality frontier, i.e. does no other row decode at least as fast with at
    most its ``y`` (perplexity), better in one of the two? Rows without both figures are not."""
    def has(r):
        return r.get("tg_ts") is not None and r.get(y) is not None and math.isfinite(r[y])
    pts = [(r["tg_ts"], r[y]) if has(r) else None for r in rows]
    return [p is not None and not any(q is not None and q != p and q[0] >= p[0] and q[1] <= p[1] for q in pts)
            for p in pts]


def markdown_table(rows: list[dict]) -> str:
    synthetic = any(r.get("synthetic") for r in rows)
    if synthetic:
        head = ("| model (SYNTHETIC, random weights) | active | type | size MiB | pp t/s | tg t/s | tg vs dense "
                "| bytes/token MiB | bandwidth limit vs dense | tg ratio / limit | peak RSS MiB |")
        lines = [head, "|" + "---|" * 11]
        for r in rows:
            lines.append(
                f"| {r['label']} | {r['active_fraction']:.0%} | {r['outtype']} | {r['file_bytes'] / 2**20:.0f} "
                f"| {_fmt(r['pp_ts'], '.1f', r['pp_ts_std'])} | {_fmt(r['tg_ts'], '.2f', r['tg_ts_std'])} "
                f"| {_fmt(r['tg_speedup'], '.2f')}x | {r['bytes_per_token'] / 2**20:.1f} "
                f"| {_fmt(r['bw_limit_speedup'], '.2f')}x | {_fmt(r['tg_vs_limit'], '.2f')} "
                f"| {r['peak_rss_mib']:.0f} |")
        return "\n".join(lines) + "\n"
    head = ("| model | active | type | size MiB | PPL | KLD vs base | top-1 same | pp t/s | tg t/s | tg vs dense "
            "| bandwidth limit vs dense | peak RSS MiB | frontier |")
    lines = [head, "|" + "---|" * 13]
    for r, front in zip(rows, on_frontier(rows)):
        top1 = None if r.get("top1") is None else 100 * r["top1"]
        top1_err = None if r.get("top1_err") is None else 100 * r["top1_err"]
        lines.append(
            f"| {r['label']} | {_active(r)} | {r['outtype']} | {r['file_bytes'] / 2**20:.1f} "
            f"| {_fmt(r.get('ppl'), '.3f')} | {_fmt(r.get('kld'), '.4f', r.get('kld_err'))} "
            f"| {_fmt(top1, '.1f', top1_err)}% | {_fmt(r['pp_ts'], '.1f', r['pp_ts_std'])} "
            f"| {_fmt(r['tg_ts'], '.1f', r['tg_ts_std'])} | {_fmt(r['tg_speedup'], '.2f')}x "
            f"| {_fmt(r['bw_limit_speedup'], '.2f')}x | {r['peak_rss_mib']:.0f} | {'**yes**' if front else ''} |")
    note = ("\n\nactive: per-token expert counts show the share measured on the text (the calibrated one in "
            "brackets); the bandwidth limit counts the measured experts." if any("measured_active_fraction" in r
                                                                                 for r in rows) else "")
    return ("\n".join(lines) + "\n\nfrontier: no other model decodes at least as fast at no higher perplexity "
            "(better in one)." + note + "\n")


def _active(r: dict) -> str:
    """The active share of a row: per-token expert counts give the measured one, with the calibrated in brackets."""
    if "measured_active_fraction" in r:
        return f"{r['measured_active_fraction']:.1%} ({r['active_fraction']:.0%})"
    return f"{r['active_fraction']:.0%}"


_COLORS = {"dense": "black", "mlpmoe": "tab:blue", "cmoe": "tab:orange", "moefication": "tab:green",
           "moe": "tab:red", "finegrained": "tab:purple"}
_MARKERS = {"f32": "D", "f16": "P", "bf16": "p", "q8_0": "o", "q4_0": "s", "q4_k_m": "^", "q5_k_m": "v",
            "q6_k": "h"}


def plot(rows: list[dict], path: Path, y: str, title: str) -> int:
    """Scatter of ``y`` (ppl, kld, or for synthetic runs the tg speedup) against decode tokens/s; dense models are
    stars. Returns the number of points; the PNG's text chunk "gguf_moeify.points" records it too."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    synthetic = any(r.get("synthetic") for r in rows)
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
    n = 0
    seen = set()
    for r in rows:
        yv = r.get(y)
        if r.get("tg_ts") is None or yv is None:
            continue
        dense = r["method"] == "dense"
        key = (r["method"], r["outtype"])
        color = ("black" if r["outtype"] != "q4_0" else "dimgray") if dense else _COLORS.get(r["method"], "gray")
        ax.scatter([r["tg_ts"]], [yv], s=160 if dense else 55, c=color,
                   marker="*" if dense else _MARKERS.get(r["outtype"], "o"), edgecolors="k", linewidths=0.5,
                   label=f"{r['method']} {r['outtype']}" if key not in seen else None, zorder=3)
        seen.add(key)
        ax.annotate(f"dense {r['outtype']}" if dense else f"{r['active_fraction']:.0%}", (r["tg_ts"], yv),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
        n += 1
    if synthetic:
        lim = [(r["tg_ts"], r["bw_limit_speedup"]) for r in rows if r.get("bw_limit_speedup") is not None]
        if lim:
            ax.scatter(*zip(*lim), marker="_", s=300, c="gray", label="bandwidth limit", zorder=2)
    ylabel = {"ppl": "perplexity (lower is better)", "kld": "mean KL divergence vs base (lower is better)",
              "tg_speedup": "decode speedup vs dense (x)"}.get(y, y)
    if y in ("ppl", "kld") and n:
        ax.set_yscale("log")
    ax.set_xlabel("decode tokens/s (llama-bench tg, higher is better)")
    ax.set_ylabel(ylabel)
    import textwrap
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"gguf_moeify.points": str(n), "Title": title})
    plt.close(fig)
    return n


def bandwidth_summary(rows: list[dict]) -> str:
    lines = ["", "Bandwidth limit (weight bytes read per decoded token; SYNTHETIC files):"]
    for r in rows:
        b = r["bytes_breakdown"]
        ffn = b["dense_ffn"] + b["experts_active"] + b["shared_expert"]
        lines.append(f"- {r['label']}: {r['bytes_per_token'] / 2**20:.1f} MiB/token = FFN {ffn / 2**20:.1f} "
                     f"+ attention {b['attention'] / 2**20:.1f} + router {b['router'] / 2**20:.2f} "
                     f"+ output {b['output'] / 2**20:.1f} + embedding row/norms "
                     f"{(b['embedding_row'] + b['norms']) / 2**20:.2f}; "
                     f"limit {r['bw_limit_speedup']:.2f}x dense, measured {r['tg_speedup']:.2f}x "
                     f"({r['tg_vs_limit']:.0%} of the limit); effective bandwidth "
                     f"{r['bytes_per_token'] * r['tg_ts'] / 1e9:.1f} GB/s")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], args, threads: int, out_dir: Path) -> None:
    """Write results.jsonl, results.md and plot.png to ``out_dir``; print the table and what was written."""
    jl = out_dir / "results.jsonl"
    jl.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    md = markdown_table(rows)
    if args.synthetic is not None:
        from ..synthetic import SHAPES
        s = SHAPES[args.synthetic]
        title = (f"SYNTHETIC {args.synthetic} (random weights: n_embd {s.n_embd}, n_ff {s.n_ff}, {s.n_layer} layers)"
                 f": decode speedup vs bandwidth limit, {threads} threads")
        y = "tg_speedup"
        md += bandwidth_summary(rows)
    else:
        title = (f"{Path(args.model).name}: {args.plot_y.upper()} vs decode speed "
                 f"({args.chunks} x {args.ctx} tokens of {Path(args.text).name}; {threads} threads)")
        y = args.plot_y
    md = f"{title}\n\n{md}"
    (out_dir / "results.md").write_text(md)
    n = plot(rows, out_dir / "plot.png", y, title)
    print(md)
    print(f"wrote {jl}, {out_dir / 'results.md'}, {out_dir / 'plot.png'} ({n} points)")
