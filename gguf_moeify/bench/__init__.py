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
5. bandwidth limit: weight bytes read per decoded token (``weight_bytes.bytes_per_token``) and the decode speedup that
   bytes alone would allow vs the dense file of the same outtype;
6. results: ``results.jsonl`` (one object per model), ``results.md`` (table), ``plot.png`` (perplexity, or KLD with
   ``--plot-y kld``, against decode tokens/s; dense models as stars).

``--synthetic 1b|7b`` measures speed only, on SYNTHETIC random-weight files of real shapes (``synthetic.py``);
configurations are then ``moe:ACTIVE:OUTTYPE``.

Modules: ``configs`` (the configuration language), ``files`` (the model files, written or reused by their recorded
recipe), ``runs`` (llama-perplexity and llama-bench on them), ``report`` (results.jsonl, results.md, plot.png).

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
import tempfile
from pathlib import Path

from ..bundled import DEFAULT_CALIB
from ..cli_args import Parser, prog_name
from ..errors import UserError
from ..method_args import add_method_flags
from .configs import BENCH_OUTTYPES, REAL_METHODS, SYN_OUTTYPES, Config, parse_configs
from .files import MoEFiles, config_from_file, dense_gguf, synthetic_file
from .report import markdown_table, plot, write_results
from .runs import Progress, kld_base, measure_speed, model_rows

__all__ = ["BENCH_OUTTYPES", "REAL_METHODS", "SYN_OUTTYPES", "Config", "MoEFiles", "Progress", "config_from_file",
           "dense_gguf", "main", "markdown_table", "parse_configs", "plot", "synthetic_file"]


def _parser() -> argparse.ArgumentParser:
    from ..plan import ROUTER_DTYPES
    p = Parser(prog=f"{prog_name()} bench",
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
    p.add_argument("--calib", default=DEFAULT_CALIB, help="calibration text for cmoe/moefication/finegrained/tomoe, "
                                                          "as convert's --calib (default: %(default)s)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows, as convert's "
                                                                 "(default: %(default)s)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window "
                                                                 "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="conversion / synthetic weights seed (default: %(default)s)")
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
    add_method_flags(p, ("cmoe", "moefication", "finegrained"))   # each run takes its own method's
    return p


def _model_d_ff(model: str) -> int:
    from ..checkpoint import Checkpoint
    return Checkpoint(model).d_ff


def _check_args(args) -> None:
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


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from ..llama_cpp import _default_threads, find_llama_cpp
    from ..synthetic import SHAPES
    _check_args(args)
    synthetic = args.synthetic is not None
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
    base_measured_apart = not synthetic and args.kld_base not in outtypes
    prog = Progress(len(models) + base_measured_apart + len(models) * args.reps, args.quiet)
    protocol = {"ctx": args.ctx, "chunks": args.chunks, "text": None if synthetic else str(args.text),
                "scored_per_chunk": args.ctx // 2 - 1 if not synthetic else None, "kld_base": None,
                "llama_bench": {"n_prompt": args.n_prompt, "n_gen": args.n_gen, "threads": threads,
                                "reps": args.reps}}
    with tempfile.TemporaryDirectory(prefix="gguf_moeify_bench_") as tmpdir:
        base_logits = Path(tmpdir) / "base.kld"
        files = None if synthetic else MoEFiles(args.model, work, args)
        if not synthetic:
            protocol["kld_base"] = kld_base(args, work, tools, threads, base_logits, prog,
                                            in_models=not base_measured_apart)
        rows = model_rows(models, args, work, tools, threads, files, base_logits, protocol, prog)
        measure_speed(rows, tools, args, threads, prog)
    write_results(rows, args, threads, out_dir)
    return 0
