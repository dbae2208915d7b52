"""Running llama.cpp on bench's files: the KL-divergence base, then per model its file (written or reused) and one
``llama-perplexity --kl-divergence`` run, then the speed rounds of ``llama-bench``; progress lines on stderr."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import UserError
from .configs import Config
from .files import MoEFiles, dense_gguf, synthetic_file


class Progress:
    """One line per step on stderr: [k/n] model: step (elapsed, time left estimated from the finished units: one
    conversion + quality run per model, then one llama-bench run per model and speed round)."""

    def __init__(self, n_models: int, quiet: bool = False):
        self.n, self.done, self.t0, self.quiet = n_models, 0, time.time(), quiet

    def step(self, i: int, label: str, what: str) -> None:
        if self.quiet:
            return
        el = time.time() - self.t0
        left = f", ~{_dur(el / self.done * (self.n - self.done))} left" if self.done else ""
        print(f"[{self.done + 1}/{self.n}] {label}: {what} ({_dur(el)} elapsed{left})", file=sys.stderr, flush=True)

    def finish_model(self) -> None:
        self.done += 1


def _dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def kld_base(args, work: Path, tools, threads: int, base_logits: Path, prog: Progress, in_models: bool) -> dict:
    """The dense model at ``--kld-base`` type, its logits saved to ``base_logits``; what the protocol records of it.
    ``in_models``: it is measured again as one of the models (so its progress unit finishes there)."""
    prog.step(1, f"dense {args.kld_base} (KLD base)", "converting with llama.cpp's converter")
    base_path, _ = dense_gguf(args.model, args.kld_base, work, tools)
    prog.step(1, f"dense {args.kld_base} (KLD base)",
              f"llama-perplexity, saving base logits ({args.chunks} x {args.ctx} tokens)")
    base = tools.perplexity(base_path, args.text, ctx=args.ctx, chunks=args.chunks, threads=threads,
                            save_logits=base_logits)
    if base.n_chunks < args.chunks:
        raise UserError(f"{args.text} holds only {base.n_chunks} windows of {args.ctx} tokens; "
                        f"lower --chunks or --ctx")
    if not in_models:
        prog.finish_model()
    return {"outtype": args.kld_base, "file": str(base_path), "ppl": base.ppl}


def model_rows(models: list[Config], args, work: Path, tools, threads: int, files: MoEFiles | None,
               base_logits: Path | None, protocol: dict, prog: Progress) -> list[dict]:
    """Per model: its file (written, or reused while the recipe matches; ``files`` converts MoE configurations),
    the bytes read per decoded token and, unless SYNTHETIC, perplexity, KLD and top-1 agreement against
    ``base_logits``."""
    from ..synthetic import SHAPES, has_per_token_counts, measured_active_fraction
    from ..weight_bytes import bytes_per_token
    synthetic = args.synthetic is not None
    rows: list[dict] = []
    for i, c in enumerate(models, start=1 if synthetic else 2):
        t0 = time.time()
        if synthetic:
            prog.step(i, f"SYNTHETIC {args.synthetic} {c.label}", "writing random-weight file")
            path, reused = synthetic_file(SHAPES[args.synthetic], c, work, args.seed, args.router_dtype)
        elif c.method == "dense":
            prog.step(i, c.label, "converting with llama.cpp's converter")
            path, reused = dense_gguf(args.model, c.outtype, work, tools)
        else:
            note = " (calibrating, unless the previous outtype's plans apply)" if c.method != "mlpmoe" else ""
            prog.step(i, c.label, f"the file {c.path}" if c.path else "converting" + note)
            path, reused = (Path(c.path), True) if c.path else files.get(c)
        convert_s = time.time() - t0
        label = (f"SYNTHETIC {args.synthetic} " if synthetic else "") + c.label
        row = {"model": f"SYNTHETIC-{args.synthetic}" if synthetic else str(args.model),
               "synthetic": synthetic, "label": label, "method": c.method, "config": c.spec,
               "experts": c.experts, "shared": c.shared, "top_k": c.top_k,
               "active_fraction": c.active_fraction, "outtype": c.outtype, "file": str(path),
               "reused": reused, "convert_s": round(convert_s, 2)}
        bpt = bytes_per_token(path)
        row.update(file_bytes=bpt["file_bytes"], bytes_per_token=bpt["total"], bytes_breakdown=bpt)
        if not synthetic:
            prog.step(i, c.label, "llama-perplexity --kl-divergence (perplexity, KLD, top-1)")
            per_token = has_per_token_counts(path)
            kl = tools.kl_divergence(path, base_logits, ctx=args.ctx, chunks=args.chunks, threads=threads,
                                     expert_stats=per_token)
            row.update(ppl=kl.ppl, kld=kl.mean_kld, kld_err=kl.mean_kld_err, top1=kl.same_top_p,
                       top1_err=kl.same_top_p_err)
            if per_token and kl.experts_used:   # what the text used, not the file's most per token
                measured = bytes_per_token(path, kl.experts_used)
                row.update(bytes_per_token_max=row["bytes_per_token"], bytes_per_token=measured["total"],
                           bytes_breakdown=measured, experts_used=kl.experts_used,
                           measured_active_fraction=measured_active_fraction(path, kl.experts_used))
        row["protocol"] = protocol
        rows.append(row)
        prog.finish_model()
        if not args.quiet and not synthetic:
            print(f"    {label}: PPL {row['ppl']:.3f}, KLD {row['kld']:.4f}, top-1 {row['top1']:.1%}",
                  file=sys.stderr, flush=True)
    return rows


def measure_speed(rows: list[dict], tools, args, threads: int, prog: Progress) -> None:
    """Speed: round-robin, one llama-bench repetition of every model per round (llama-bench warms up first), so that
    a change of load on a shared machine hits every model alike; mean ± sample std over the rounds, into each row
    with its speedups over the dense row of the same outtype (``speed_fields``)."""
    samples: list[dict] = [{"pp": [], "tg": [], "rss": []} for _ in rows]
    for rnd in range(args.reps):
        for j, row in enumerate(rows):
            prog.step(0, row["label"],
                      f"speed round {rnd + 1}/{args.reps}: llama-bench pp{args.n_prompt} tg{args.n_gen}, "
                      f"{threads} threads")
            b = tools.bench(Path(row["file"]), args.n_prompt, args.n_gen, threads, 1)
            prog.finish_model()
            samples[j]["pp"].append(b["pp_ts"])
            samples[j]["tg"].append(b["tg_ts"])
            samples[j]["rss"].append(b["peak_rss_mib"])
    dense_rows: dict[str, dict] = {}
    for row, smp in zip(rows, samples):
        for key in ("pp", "tg"):
            v = smp[key]
            m = sum(v) / len(v)
            row[f"{key}_ts"], row[f"{key}_samples"] = m, v
            row[f"{key}_ts_std"] = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
        row["peak_rss_mib"] = max(smp["rss"])
        if row["method"] == "dense":
            dense_rows[row["outtype"]] = row
    for row in rows:
        speed_fields(row, dense_rows)
        if not args.quiet:
            print(f"    {row['label']}: pp {row['pp_ts']:.1f} t/s, "
                  f"tg {row['tg_ts']:.2f} ± {row['tg_ts_std']:.2f} t/s, peak RSS {row['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)


def speed_fields(row: dict, dense_rows: dict) -> None:
    """A row's speedups over ``dense_rows[row's outtype]``: measured (tokens/s ratio), the bandwidth limit (ratio of
    bytes read per token) and the measured decode speedup as a fraction of that limit."""
    d = dense_rows.get(row["outtype"])
    row["tg_speedup"] = row["tg_ts"] / d["tg_ts"] if d and d.get("tg_ts") else None
    row["pp_speedup"] = row["pp_ts"] / d["pp_ts"] if d and d.get("pp_ts") else None
    row["bw_limit_speedup"] = d["bytes_per_token"] / row["bytes_per_token"] if d else None
    row["tg_vs_limit"] = (row["tg_speedup"] / row["bw_limit_speedup"]
                          if row["tg_speedup"] and row["bw_limit_speedup"] else None)
