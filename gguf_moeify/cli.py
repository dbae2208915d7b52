"""Command line: ``python -m gguf_moeify MODEL OUT.gguf [options]`` and the ``inspect``, ``eval``, ``demo-model``
sub-commands. Every user error ends as one line on stderr and exit code 2; no traceback, no output file."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from .cli_args import Parser, prog_name
from .errors import UserError
from .gguf_writer import OUTTYPES
from .method_args import add_method_args, lora_options, method_options

COMMANDS = ("convert", "inspect", "eval", "demo-model", "bench")

_EPILOG = """commands:
  MODEL OUT.gguf [options]   convert (the default command; same as `convert MODEL OUT.gguf`)
  inspect FILE.gguf          print a GGUF's MoE layout per layer
  eval MODEL --text FILE     perplexity of dense vs converted in the torch reference
  demo-model DIR             build the embedded SmolLM2-135M-Instruct as an HF folder (offline)
  bench ...                  perplexity, KL-divergence and speed of dense vs MoE GGUFs in llama.cpp
Run `python -m gguf_moeify COMMAND --help` for each command's options."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=prog_name(),
                                description="Turn a dense Hugging Face LLM into a mixture-of-experts GGUF for "
                                            "llama.cpp, without training.",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert MODEL to an MoE GGUF",
                       usage="%(prog)s MODEL OUT.gguf [--method M] [--active F] [--calib FILE] [--outtype T] "
                             "[advanced options]",
                       description="Convert a dense HF model to an MoE GGUF. Most users need only MODEL, OUT.gguf, "
                                   "--method, --active, --outtype and --calib; the groups marked advanced tune the "
                                   "method.")
    c.add_argument("model", metavar="MODEL", help="HF model folder (config.json + *.safetensors) or hub id (online)")
    c.add_argument("out", metavar="OUT.gguf", help="output file; written via a temporary file and renamed at the end")
    main = c.add_argument_group("main options")
    add_method_args(c, main)
    main.add_argument("--outtype", default="f16", choices=OUTTYPES,
                      help="tensor type: f32/f16/bf16, q8_0/q4_0 (gguf-py), k-quants via llama-quantize "
                           "(needs scripts/build_llama_cpp.sh) (default: %(default)s)")
    main.add_argument("--quiet", "-q", action="store_true", help="no progress bars (default: off)")

    i = sub.add_parser("inspect", help="print the MoE layout of a GGUF per layer")
    i.add_argument("file", metavar="FILE.gguf")
    i.add_argument("--check", action="store_true", help="check the file against the patched llama.cpp's contract "
                   "(patches/README.md): one line per problem, exit code 1 when there is one (default: off)")

    e = sub.add_parser("eval", help="perplexity of dense vs MoE in the torch reference (llama-perplexity protocol)",
                       usage="%(prog)s MODEL --text FILE [--method M] [--active F] [--calib FILE] [--chunks N] "
                             "[advanced options]")
    e.add_argument("model", metavar="MODEL")
    e.add_argument("--text", required=True, help="UTF-8 text file to score (required; the package bundles "
                                                 "gguf_moeify/data/pride_and_prejudice_excerpt.txt)")
    e.add_argument("--ctx", type=int, default=512, help="window length in tokens; the second half of each "
                                                        "window is scored (default: %(default)s)")
    e.add_argument("--chunks", type=int, default=None, help="at most this many windows (default: all)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table (default: off)")
    e.add_argument("--oracle", action="store_true",
                   help="also score two ceilings, torch reference only: the same experts chosen per token by a "
                        "ground-truth oracle (top-k by output norm: the bound for any router), and the same number "
                        "of neurons chosen one by one by |h|*||W_down column|| (the bound for any expert grouping); "
                        "and both with a per-token count: the same mean number per token in each window, given to "
                        "the (token, expert) or (token, neuron) pairs with the largest outputs (default: off)")
    add_method_args(e, e.add_argument_group("main options"))

    d = sub.add_parser("demo-model", help="write the embedded SmolLM2-135M-Instruct as an HF folder")
    d.add_argument("dir", metavar="DIR")
    return p


def _run(args) -> int:
    if args.command == "convert":
        from .convert import convert
        out = convert(args.model, args.out, args.method, method_options(args), args.outtype, args.dtype,
                      progress=not args.quiet, finetune=lora_options(args))
        print(f"wrote {out}")
    elif args.command == "inspect":
        from .inspect_gguf import inspect_command
        return inspect_command(args.file, check=args.check)
    elif args.command == "eval":
        from .eval_cmd import evaluate_model
        res = evaluate_model(args.model, args.text, args.method, method_options(args), args.dtype, args.ctx, args.chunks,
                             oracle=args.oracle, finetune=lora_options(args))
        if args.json:
            print(json.dumps(res, sort_keys=True))
        else:
            print(f"dense ppl {res['dense']['ppl']:.4f}   {args.method} ppl {res['moe']['ppl']:.4f}   "
                  f"ratio {res['ratio']:.5f}   active fraction {res['active_fraction']:.3f}   "
                  f"({res['moe']['n_chunks']} windows of {args.ctx}, {res['moe']['n_scored']} tokens scored)")
            if "measured_active_fraction" in res:
                print(f"per-token expert counts: {res['measured_active_fraction']:.3f} of the MLP active on this "
                      f"text (calibrated to {res['active_fraction']:.3f})")
            if "stock_router_agreement" in res:
                print(f"stock runtime: the stock router picks the original router's experts "
                      f"{res['stock_router_agreement']:.1%} of the time (held-out calibration tokens)")
            if "finetuned" in res:
                ft = res["finetune"]
                print(f"after LoRA ppl {res['finetuned']['ppl']:.4f}   ratio {res['finetuned_ratio']:.5f}   "
                      f"({ft['steps']} steps, held-out loss {ft['held_out_loss_start']:.4f} -> "
                      f"{ft['held_out_loss_best']:.4f})")
            if "oracle" in res:
                print(f"oracle router ppl {res['oracle']['ppl']:.4f}   ratio {res['oracle_ratio']:.5f}   "
                      f"(same experts, chosen per token by true output norm)")
                print(f"neuron oracle ppl {res['neuron_oracle']['ppl']:.4f}   ratio "
                      f"{res['neuron_oracle_ratio']:.5f}   (same number of neurons, chosen one by one)")
                for key, what in (("oracle_var", "experts"), ("neuron_oracle_var", "neurons")):
                    print(f"{key.replace('_', ' ')} ppl {res[key]['ppl']:.4f}   ratio {res[key + '_ratio']:.5f}   "
                          f"(the same mean number of {what} per token, where the outputs are largest)")
    elif args.command == "demo-model":
        from .demo_model import build_smollm2_folder
        print(f"wrote {build_smollm2_folder(args.dir)}")
    return 0


def _interrupt_on_signal(signum, frame):
    """SIGTERM / SIGHUP end a run like Ctrl-C: the KeyboardInterrupt unwinds through every ``finally`` that
    removes a temporary file."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _os_error_line(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                previous[sig] = signal.signal(sig, _interrupt_on_signal)
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str]) -> int:
    try:
        if argv and argv[0] == "bench":  # its own parser (gguf_moeify/bench/)
            from .bench import main as bench_main
            return bench_main(argv[1:])
        if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
            argv.insert(0, "convert")
        args = build_parser().parse_args(argv)
        return _run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # disk full, permission, a file that vanished: the system's words, one line
        print(f"error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM/SIGHUP through _interrupt_on_signal
        name = str(exc)
        print(f"error: interrupted{f' ({name})' if name else ''}", file=sys.stderr)
        return 128 + (signal.Signals[name].value if name in signal.Signals.__members__ else signal.SIGINT)
