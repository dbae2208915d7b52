"""``python -m gguf_moeify bench``: quality and speed of dense vs MoE GGUFs in the patched llama.cpp.

For one source model and a list of configurations ``METHOD:ACTIVE:OUTTYPE`` (comma-separated):

1. convert each (a file in ``--work-dir`` whose recorded recipe, the ``gguf_moeify.provenance`` key, matches is
   reused; configurations that differ only in outtype share one set of plans, so one calibration);
2. the dense reference at each outtype with llama.cpp's own converter (``convert_hf_to_gguf.py``; q4_0 and k-quants
   through ``llama-quantize``, embedding/output at q8_0 for q4_0 like our writer), recipe in a ``.recipe.json``
   sidecar; plus the dense model at ``--kld-base`` type (default f16) whose logits are the KL-divergence base;
3. quality: one ``llama-perplexity --kl-divergence`` run per model against the base logits (windows of ``--ctx``
   tokens, the first ``--chunks`` of them, second half of each window scored): perplexity, mean KLD, and top-1
   agreement ("Same top p");
4. speed: ``llama-bench`` (``-p``/``-n`` tokens, ``-t`` threads) in ``-r`` rounds, each round one repetition of
   every model in turn (so a change of load on a shared machine hits all models alike; llama-bench warms up before
   each), mean ± sample std over the rounds; peak memory = max RSS of the llama-bench process (weights are
   mmapped, so resident weights count; CPU repacking of q4_0/q8_0 weights adds a copy);
5. bandwidth limit: weight bytes read per decoded token (``synthetic.bytes_per_token``) and the decode speedup that
   bytes alone would allow vs the dense file of the same outtype;
6. results: ``results.jsonl`` (one object per model), ``results.md`` (table), ``plot.png`` (perplexity, or KLD with
   ``--plot-y kld``, against decode tokens/s; dense models as stars).

``--synthetic 1b|7b`` measures speed only, on SYNTHETIC random-weight files of real shapes (``synthetic.py``);
configurations are then ``moe:ACTIVE:OUTTYPE``.

ACTIVE: a fraction (``0.25``), a percentage (``25%``), or an explicit ``SxAyEz`` (x shared, y routed used, z experts).
A fraction is sized for the model's d_ff as ``convert --active`` does (``sizing.expert_layout``; ``--experts``
replaces the derived E), e.g. on d_ff 1536:
- ``finegrained``: 32-neuron experts, a third of the active ones shared (50% -> S8A16E48);
- ``cmoe``: E nearest 16, half the active experts shared (25% -> S2A2E16, 50% -> S4A4E16, 75% -> S6A6E16);
- ``mlpmoe`` at 1: all experts active (exact slicing, E nearest 8); below 1 the naive routed baseline (slices + a
  data-free similarity router) with CMoE's S and K;
- ``moefication``, ``moe`` (synthetic): no shared expert, K = n (25% -> S0A4E16);
- ``tomoe``: trained with ``--budget`` f (top-1 of E = ``--experts`` or 8 masks; its training state is kept in the
  work folder, so other outtypes and reruns reuse it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

REAL_METHODS = ("mlpmoe", "cmoe", "moefication", "finegrained", "tomoe")
BENCH_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
SYN_OUTTYPES = ("f16", "q8_0", "q4_0")


# ---------------------------------------------------------------- configurations
@dataclass
class Config:
    method: str            # mlpmoe | cmoe | moefication | moe (synthetic) | dense
    experts: int
    shared: int
    top_k: int
    outtype: str
    spec: str = ""         # as given
    budget: float | None = None   # tomoe: the trained active fraction (--budget); its experts are top-1 masks
    path: str | None = None       # an already-converted file (--moe), measured as it is

    @property
    def active_fraction(self) -> float:
        if self.budget is not None:
            return self.budget
        return 1.0 if self.method == "dense" else (self.shared + self.top_k) / self.experts

    @property
    def sae(self) -> str:
        return f"E{self.experts}p{self.budget:g}" if self.budget is not None else \
            f"S{self.shared}A{self.top_k}E{self.experts}"

    @property
    def label(self) -> str:
        if self.method == "dense":
            return f"dense {self.outtype}"
        return f"{self.method} {self.active_fraction:.0%} ({self.sae}) {self.outtype}"

    @property
    def slug(self) -> str:
        return "dense" if self.method == "dense" else f"{self.method}-{self.sae}"


def _fraction(text: str) -> float:
    t = text.strip()
    try:
        f = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UserError(f"active fraction {text!r}: expected e.g. 0.25, 25% or S2A2E16") from None
    if not 0 < f <= 1:
        raise UserError(f"active fraction {text!r} must be in (0, 1]")
    return f


def parse_configs(text: str, synthetic: bool, d_ff: int, experts: int | None = None) -> list[Config]:
    """Configurations from ``METHOD:ACTIVE:OUTTYPE,...``; fractions are sized for an MLP of ``d_ff`` neurons."""
    from .sizing import expert_layout
    methods = ("moe",) if synthetic else REAL_METHODS
    types = SYN_OUTTYPES if synthetic else BENCH_OUTTYPES
    out: list[Config] = []
    for spec in [s.strip() for s in text.split(",") if s.strip()]:
        parts = spec.split(":")
        if len(parts) != 3:
            raise UserError(f"configuration {spec!r}: expected METHOD:ACTIVE:OUTTYPE, e.g. cmoe:0.25:q4_0")
        method, active, outtype = (p.strip().lower() for p in parts)
        if method not in methods:
            raise UserError(f"configuration {spec!r}: method must be one of {', '.join(methods)}"
                            + (" (synthetic mode)" if synthetic else ""))
        if outtype not in types:
            raise UserError(f"configuration {spec!r}: outtype must be one of {', '.join(types)}")
        m = re.fullmatch(r"s(\d+)a(\d+)e(\d+)", active)
        if method == "tomoe":  # trained to the fraction: top-1 of E masks (default 8)
            if m:
                raise UserError(f"configuration {spec!r}: tomoe takes an active fraction (its --budget), not SxAyEz")
            f = _fraction(active)
            out.append(Config(method, expert_layout(method, d_ff, f, experts)[0], 0, 1, outtype, spec, budget=f))
            if any((c.slug, c.outtype) == (out[-1].slug, outtype) for c in out[:-1]):
                raise UserError(f"configuration {spec!r} is given twice")
            continue
        if m:
            s, k, e = (int(g) for g in m.groups())
            if not (0 <= s < e and 1 <= k <= e - s):
                raise UserError(f"configuration {spec!r}: {active} needs 0 <= S < E and 1 <= A <= E - S")
        else:
            e, s, k = expert_layout(method, d_ff, _fraction(active), experts)
        c = Config(method, e, s, k, outtype, spec)
        if any((c.slug, c.outtype) == (o.slug, o.outtype) for o in out):
            raise UserError(f"configuration {spec!r} is given twice")
        out.append(c)
    return out


def config_from_file(path: str) -> Config:
    """A Config for a file written by ``convert`` (--moe), from its recorded recipe (``gguf_moeify.provenance``)."""
    import gguf
    if not Path(path).is_file():
        raise UserError(f"--moe {path}: file not found")
    prov = _file_provenance(Path(path))
    if prov is None or "options" not in prov:
        raise UserError(f"--moe {path}: not an MoE file written by gguf_moeify (no readable provenance)")
    o, method, outtype = prov["options"], prov["method"], prov["outtype"]
    if method == "tomoe":
        return Config(method, o["experts"], 0, 1, outtype, path, budget=o["extra"].get("budget", 0.5), path=path)
    top_k = o.get("top_k")
    if top_k is None:   # left to the method's default: what the file's first layer uses
        top_k = json.loads(gguf.GGUFReader(path).fields["gguf_moeify.plan"].contents())[0]["top_k"]
    return Config(method, o["experts"], o["shared"], top_k, outtype, path, path=path)


# ---------------------------------------------------------------- progress
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


# ---------------------------------------------------------------- dense reference files
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".recipe.json")


def _dense_recipe(model: str, outtype: str) -> dict:
    from .llama_cpp_source import LLAMA_CPP_COMMIT
    return {"tool": "gguf_moeify bench", "kind": "dense reference", "converter": f"llama.cpp {LLAMA_CPP_COMMIT}",
            "source_model": str(Path(model).resolve()), "outtype": outtype,
            "quantize": outtype not in ("f32", "f16", "bf16", "q8_0"),
            "embedding_output": "q8_0" if outtype == "q4_0" else None}


def dense_gguf(model: str, outtype: str, work: Path, tools) -> tuple[Path, bool]:
    """The dense model at ``outtype``, written by llama.cpp's converter (+ llama-quantize). (path, reused)."""
    out = work / f"dense-{outtype}.gguf"
    recipe = _dense_recipe(model, outtype)
    if out.is_file() and _sidecar(out).is_file() and json.loads(_sidecar(out).read_text()) == recipe:
        return out, True
    from .llama_cpp_source import llama_cpp_source
    src = llama_cpp_source()
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    env.pop("NO_LOCAL_GGUF", None)
    direct = outtype in ("f32", "f16", "bf16", "q8_0")
    conv_out = work / (f".dense-{outtype}.tmp.gguf" if direct else ".dense-f32-for-quantize.tmp.gguf")
    try:
        proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype",
                               outtype if direct else "f32", "--outfile", str(conv_out)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not conv_out.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise UserError(f"llama.cpp's converter failed on {model}:\n{tail}")
        if direct:
            os.replace(conv_out, out)
        else:
            extra = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"] if outtype == "q4_0" else []
            tmp_q = work / f".dense-{outtype}.tmp.gguf"
            tools.quantize(conv_out, tmp_q, outtype.upper(), extra=extra)
            os.replace(tmp_q, out)
    finally:
        conv_out.unlink(missing_ok=True)
    _sidecar(out).write_text(json.dumps(recipe, sort_keys=True, indent=1) + "\n")
    return out, False


# ---------------------------------------------------------------- MoE files
def _opts_for(c: Config, args, work: Path | None = None):
    from .methods import MethodOptions
    if c.method == "tomoe":  # its training state in the work folder: every outtype (and a rerun) reuses it
        state = {"state": str(work / f"{c.slug}.tomoe-state.pt")} if work is not None else {}
        return MethodOptions(experts=c.experts, shared=0, top_k=None, calib=args.calib, seed=args.seed,
                             router_dtype=args.router_dtype, extra={"budget": c.budget, **state})
    extra = {}
    if c.method == "moefication":
        extra = {"split": args.split, "router": args.router or "similarity"}
    if c.method == "finegrained":
        extra = {"stat": "weighted", "router": args.router or "linear"}
    calib = None if c.method == "mlpmoe" else args.calib
    budget = "uniform" if c.method == "mlpmoe" else args.layer_budget
    return MethodOptions(experts=c.experts, shared=c.shared, top_k=c.top_k, calib=calib,
                         calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                         layer_budget=budget, router_dtype=args.router_dtype, extra=extra)


def _file_provenance(path: Path) -> dict | None:
    import gguf
    try:
        f = gguf.GGUFReader(path).fields.get("gguf_moeify.provenance")
        return json.loads(f.contents()) if f is not None else None
    except Exception:  # a truncated or foreign file is simply not reused
        return None


class MoEFiles:
    """Converts configurations, reusing files with the same recorded recipe and plans across outtypes."""

    def __init__(self, model: str, work: Path, args):
        from .convert import open_model
        self.ckpt, self.adapter = open_model(model, "float32")
        self.work, self.args = work, args
        self._plans: dict[str, list] = {}

    def get(self, c: Config) -> tuple[Path, bool]:
        from .convert import make_plans, provenance, write_model_file
        from .methods import get_method
        opts = _opts_for(c, self.args, self.work)
        if c.method != "mlpmoe" and not opts.calib:
            raise UserError(f"{c.method} needs calibration text: --calib FILE")
        get_method(c.method).validate(opts, self.ckpt.d_ff)
        prov = provenance(self.ckpt, c.method, opts, c.outtype, "float32")
        out = self.work / f"{c.slug}-{c.outtype}.gguf"
        if out.is_file() and _file_provenance(out) == json.loads(json.dumps(prov, sort_keys=True)):
            return out, True
        key = json.dumps({"method": c.method, "opts": asdict(opts)}, sort_keys=True)
        if key not in self._plans:
            self._plans = {key: make_plans(self.ckpt, self.adapter, c.method, opts, progress=False)}
        write_model_file(self.ckpt, self.adapter, self._plans[key], out, c.outtype, prov, progress=False)
        return out, False


# ---------------------------------------------------------------- synthetic files
def synthetic_file(shape, c: Config, work: Path, seed: int, router_dtype: str = "f32") -> tuple[Path, bool]:
    import gguf
    from .synthetic import synthetic_recipe, write_synthetic
    experts, top_k = (0, 0) if c.method == "dense" else (c.experts, c.top_k)
    if c.shared:
        raise UserError("synthetic MoE files have no shared expert: use S0 (e.g. moe:S0A4E16:q4_0)")
    router_dtype = router_dtype if experts else "f32"
    tag = "" if router_dtype == "f32" else f"-router_{router_dtype}"
    out = work / f"SYNTHETIC-{shape.name}-{c.slug}{tag}-{c.outtype}.gguf"
    want = synthetic_recipe(shape, c.outtype, experts, top_k, seed, router_dtype)
    if out.is_file():
        try:
            f = gguf.GGUFReader(out).fields.get("gguf_moeify.synthetic_recipe")
            if f is not None and json.loads(f.contents()) == want:
                return out, True
        except Exception:
            pass
    return write_synthetic(out, shape, c.outtype, experts, top_k, seed, router_dtype=router_dtype), False


# ---------------------------------------------------------------- outputs
def _fmt(v, spec: str, err=None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    s = format(v, spec)
    return s + (" ± " + format(err, spec) if err is not None else "")


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
            "| bandwidth limit vs dense | peak RSS MiB |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        top1 = None if r.get("top1") is None else 100 * r["top1"]
        top1_err = None if r.get("top1_err") is None else 100 * r["top1_err"]
        lines.append(
            f"| {r['label']} | {r['active_fraction']:.0%} | {r['outtype']} | {r['file_bytes'] / 2**20:.1f} "
            f"| {_fmt(r.get('ppl'), '.3f')} | {_fmt(r.get('kld'), '.4f', r.get('kld_err'))} "
            f"| {_fmt(top1, '.1f', top1_err)}% | {_fmt(r['pp_ts'], '.1f', r['pp_ts_std'])} "
            f"| {_fmt(r['tg_ts'], '.1f', r['tg_ts_std'])} | {_fmt(r['tg_speedup'], '.2f')}x "
            f"| {_fmt(r['bw_limit_speedup'], '.2f')}x | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


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


# ---------------------------------------------------------------- the run
def _parser() -> argparse.ArgumentParser:
    from .cli import _Parser, prog_name
    from .plan import ROUTER_DTYPES
    p = _Parser(prog=f"{prog_name()} bench",
                description="Perplexity, KL-divergence, top-1 agreement, speed and peak memory of dense vs MoE "
                            "GGUFs in the patched llama.cpp; writes results.jsonl, results.md and plot.png.",
                epilog="ACTIVE:" + __doc__.split("\nACTIVE:", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="HF model folder (not with --synthetic)")
    p.add_argument("--moe", default=None, metavar="FILE[,FILE...]",
                   help="MoE files already written by `convert` from MODEL, measured as they are (method, experts "
                        "and outtype read from each file); the dense model at each of their outtypes is added "
                        "(default: none)")
    p.add_argument("--configs", default="",
                   help="comma-separated METHOD:ACTIVE:OUTTYPE, e.g. 'mlpmoe:1:q8_0,cmoe:0.25:q4_0,"
                        "moefication:50%%:q4_0'; METHOD is one of mlpmoe, cmoe, moefication, finegrained, tomoe "
                        "(tomoe: ACTIVE is its trained --budget, top-1 of --experts or 8 masks; about 15 min of "
                        "training on a 135M model, kept in the work folder) (synthetic: 'moe:0.25:q4_0'); the dense "
                        "model at each outtype is added as the reference (default: none; --configs or --moe is "
                        "needed)")
    p.add_argument("--synthetic", choices=("1b", "7b", "tiny"), default=None,
                   help="SYNTHETIC random-weight models of a real shape, speed only: 1b = n_embd 2048, n_ff 8192, "
                        "16 layers, 16 heads; 7b = 4096/11008/32 layers/32 heads (tiny: tests) (default: none, "
                        "MODEL is converted)")
    p.add_argument("--experts", "-E", type=int, default=None,
                   help="E for fractions (default: from the model's d_ff, as convert --active: finegrained "
                        "d_ff/32, cmoe/moefication nearest 16, mlpmoe nearest 8)")
    p.add_argument("--text", default=None, help="evaluation text (UTF-8), needs >= 2*ctx tokens; required "
                                                "unless --synthetic (default: none)")
    p.add_argument("--ctx", type=int, default=512, help="perplexity window in tokens (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=10, help="windows scored (default: %(default)s)")
    p.add_argument("--kld-base", default="f16", help="outtype of the dense model whose logits are the "
                                                     "KL-divergence base (default: %(default)s)")
    p.add_argument("--threads", "-t", type=int, default=None, help="threads for every llama.cpp tool "
                                                                   "(default: all cores)")
    p.add_argument("--reps", "-r", type=int, default=3, help="llama-bench repetitions, >= 3 (default: %(default)s)")
    p.add_argument("--n-prompt", "-p", type=int, default=128, help="llama-bench prompt tokens (default: %(default)s)")
    p.add_argument("--n-gen", "-n", type=int, default=32, help="llama-bench generated tokens (default: %(default)s)")
    p.add_argument("--calib", default=None, help="calibration text for cmoe/moefication/finegrained/tomoe "
                                                 "(FILE|DIR|wikitext2) (default: none)")
    p.add_argument("--calib-samples", type=int, default=4, help="calibration windows (default: %(default)s)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window "
                                                                 "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="conversion / synthetic weights seed (default: %(default)s)")
    p.add_argument("--split", default="param", choices=("param", "coact"), help="moefication split "
                                                                                 "(default: %(default)s)")
    p.add_argument("--router", default=None, choices=("similarity", "mlp", "linear"),
                   help="moefication router (default: similarity); finegrained router (default: linear)")
    p.add_argument("--layer-budget", default="uniform", choices=("uniform", "sensitivity"),
                   help="data-driven methods: per-layer top-k (see convert --help) (default: %(default)s)")
    p.add_argument("--router-dtype", default="f32", choices=ROUTER_DTYPES,
                   help="type of the MoE files' router matrices (see convert --help) (default: %(default)s)")
    p.add_argument("--work-dir", default=None, help="where model files are written and reused "
                                                    "(default: OUT_DIR/models)")
    p.add_argument("--out-dir", "-o", default="out/bench", help="results folder (default: %(default)s)")
    p.add_argument("--plot-y", default="ppl", choices=("ppl", "kld"), help="y axis of the plot "
                                                                           "(default: %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines (default: off)")
    return p


def _speed_fields(row: dict, dense_rows: dict) -> None:
    d = dense_rows.get(row["outtype"])
    row["tg_speedup"] = row["tg_ts"] / d["tg_ts"] if d and d.get("tg_ts") else None
    row["pp_speedup"] = row["pp_ts"] / d["pp_ts"] if d and d.get("pp_ts") else None
    row["bw_limit_speedup"] = d["bytes_per_token"] / row["bytes_per_token"] if d else None
    row["tg_vs_limit"] = (row["tg_speedup"] / row["bw_limit_speedup"]
                          if row["tg_speedup"] and row["bw_limit_speedup"] else None)


def _model_d_ff(model: str) -> int:
    from .checkpoint import Checkpoint
    return Checkpoint(model).d_ff


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from .llama_cpp import find_llama_cpp, _default_threads
    from .synthetic import SHAPES, bytes_per_token
    synthetic = args.synthetic is not None
    if synthetic and args.model:
        raise UserError("give either MODEL or --synthetic, not both")
    if not synthetic:
        if not args.model:
            raise UserError("MODEL is required (or --synthetic 1b|7b)")
        if not Path(args.model).is_dir():
            raise UserError(f"model folder {args.model} not found")
        if not args.text or not Path(args.text).is_file():
            raise UserError(f"--text: evaluation text {args.text} not found")
    if args.reps < 3:
        raise UserError(f"--reps must be >= 3 for a mean ± std, got {args.reps}")
    if args.ctx < 16 or args.chunks < 1:
        raise UserError("--ctx must be >= 16 and --chunks >= 1")
    if not synthetic and args.chunks * (args.ctx // 2 - 1) < 100:
        # llama-perplexity prints no KL-divergence statistics for fewer than 100 scored tokens
        raise UserError(f"--chunks {args.chunks} x --ctx {args.ctx} scores {args.chunks * (args.ctx // 2 - 1)} "
                        f"tokens; the KL-divergence statistics need >= 100")
    d_ff = SHAPES[args.synthetic].n_ff if synthetic else _model_d_ff(args.model)
    if args.moe and synthetic:
        raise UserError("--moe takes files converted from MODEL, not --synthetic")
    if not args.configs.strip() and not args.moe:
        raise UserError("nothing to measure: give --configs METHOD:ACTIVE:OUTTYPE,... or --moe FILE")
    configs = parse_configs(args.configs, synthetic, d_ff, args.experts) if args.configs.strip() else []
    configs += [config_from_file(f.strip()) for f in (args.moe or "").split(",") if f.strip()]
    tools = find_llama_cpp("patched")
    threads = args.threads or _default_threads()
    out_dir = Path(args.out_dir)
    work = Path(args.work_dir) if args.work_dir else out_dir / "models"
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    outtypes = sorted({c.outtype for c in configs}, key=[c.outtype for c in configs].index)
    dense = [Config("dense", 0, 0, 0, t, f"dense:1:{t}") for t in outtypes]
    models = dense + configs
    if not synthetic and args.kld_base not in outtypes:
        n_models = len(models) + 1
    else:
        n_models = len(models)
    prog = Progress(n_models + len(models) * args.reps, args.quiet)
    protocol = {"ctx": args.ctx, "chunks": args.chunks, "text": None if synthetic else str(args.text),
                "scored_per_chunk": args.ctx // 2 - 1 if not synthetic else None, "kld_base": None,
                "llama_bench": {"n_prompt": args.n_prompt, "n_gen": args.n_gen, "threads": threads,
                                "reps": args.reps}}
    rows: list[dict] = []
    i = 0
    with tempfile.TemporaryDirectory(prefix="gguf_moeify_bench_") as tmpdir:
        base_logits = Path(tmpdir) / "base.kld"
        files = None if synthetic else MoEFiles(args.model, work, args)
        if not synthetic:
            i += 1
            prog.step(i, f"dense {args.kld_base} (KLD base)", "converting with llama.cpp's converter")
            base_path, _ = dense_gguf(args.model, args.kld_base, work, tools)
            prog.step(i, f"dense {args.kld_base} (KLD base)",
                      f"llama-perplexity, saving base logits ({args.chunks} x {args.ctx} tokens)")
            base = tools.perplexity(base_path, args.text, ctx=args.ctx, chunks=args.chunks, threads=threads,
                                    save_logits=base_logits)
            if base.n_chunks < args.chunks:
                raise UserError(f"{args.text} holds only {base.n_chunks} windows of {args.ctx} tokens; "
                                f"lower --chunks or --ctx")
            protocol["kld_base"] = {"outtype": args.kld_base, "file": str(base_path), "ppl": base.ppl}
            if args.kld_base not in outtypes:
                prog.finish_model()
        for c in models:
            i += 1
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
                kl = tools.kl_divergence(path, base_logits, ctx=args.ctx, chunks=args.chunks, threads=threads)
                row.update(ppl=kl.ppl, kld=kl.mean_kld, kld_err=kl.mean_kld_err, top1=kl.same_top_p,
                           top1_err=kl.same_top_p_err)
            row["protocol"] = protocol
            rows.append(row)
            prog.finish_model()
            if not args.quiet and not synthetic:
                print(f"    {label}: PPL {row['ppl']:.3f}, KLD {row['kld']:.4f}, top-1 {row['top1']:.1%}",
                      file=sys.stderr, flush=True)

        # Speed: round-robin, one llama-bench repetition of every model per round (llama-bench warms up first),
        # so that a change of load on a shared machine hits every model alike; mean ± sample std over the rounds.
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
            _speed_fields(row, dense_rows)
            if not args.quiet:
                print(f"    {row['label']}: pp {row['pp_ts']:.1f} t/s, "
                      f"tg {row['tg_ts']:.2f} ± {row['tg_ts_std']:.2f} t/s, peak RSS {row['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)

    jl = out_dir / "results.jsonl"
    jl.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    md = markdown_table(rows)
    if synthetic:
        s = SHAPES[args.synthetic]
        title = (f"SYNTHETIC {args.synthetic} (random weights: n_embd {s.n_embd}, n_ff {s.n_ff}, {s.n_layer} layers)"
                 f": decode speedup vs bandwidth limit, {threads} threads")
        y = "tg_speedup"
        md += _bandwidth_summary(rows)
    else:
        title = (f"{Path(args.model).name}: {args.plot_y.upper()} vs decode speed "
                 f"({args.chunks} x {args.ctx} tokens of {Path(args.text).name}; {threads} threads)")
        y = args.plot_y
    md = f"{title}\n\n{md}"
    (out_dir / "results.md").write_text(md)
    n = plot(rows, out_dir / "plot.png", y, title)
    print(md)
    print(f"wrote {jl}, {out_dir / 'results.md'}, {out_dir / 'plot.png'} ({n} points)")
    return 0


def _bandwidth_summary(rows: list[dict]) -> str:
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
