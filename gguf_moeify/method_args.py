"""The method flags of ``convert`` and ``eval`` (the main ones and the advanced groups, each with its default), and
the MethodOptions / LoRAOptions built from them, with the checks that need several flags at once."""
from __future__ import annotations

import argparse
from dataclasses import fields, replace

from .bundled import DEFAULT_CALIB
from .errors import UserError
from .methods import METHOD_NAMES, MethodOptions
from .methods.options import OWN_OPTIONS
from .plan import ROUTER_DTYPES
from .sizing import MAX_EXPERTS


def add_method_args(p: argparse.ArgumentParser, main: argparse._ArgumentGroup) -> None:
    """The method's options: the few most users need go into ``main``, the rest into advanced groups."""
    main.add_argument("--method", default="mlpmoe", choices=METHOD_NAMES,
                      help="mlpmoe: exact slicing, no data (every expert active, no speed-up); finegrained: the "
                           "recommended routed recipe (32-neuron experts, fitted router); cmoe, moefication: the "
                           "papers' recipes; tomoe: trained masks and router (slow) (default: %(default)s)")
    main.add_argument("--active", type=float, default=None, metavar="FRACTION",
                      help="fraction of the MLP's neurons used per token; picks --experts/--shared/--top-k for "
                           "the method from the model's intermediate size (finegrained at 0.5 on d_ff 1536: "
                           "S8A16E48, on d_ff 14336: S74A150E448); explicit -E/-S win (default: 0.5; mlpmoe: 1, "
                           "exact slicing; tomoe: its --budget)")
    main.add_argument("--calib", default=None, metavar="SOURCE[,SOURCE...]",
                      help="calibration text of cmoe, moefication, finegrained and tomoe: a UTF-8 file, a folder of "
                           ".txt files, 'generated' (text the model samples itself, cached per model), 'bundled' "
                           "(the packaged excerpt of Sense and Sensibility), 'bundled-docs' (the packaged excerpt "
                           "of the SQLite documentation) or 'wikitext2' (online, `datasets` "
                           "package); several joined by commas share the windows (default: "
                           f"{DEFAULT_CALIB}; mlpmoe: none)")
    g = p.add_argument_group("method details (advanced; --experts/--shared/--top-k default: from --active)")
    g.add_argument("--experts", "-E", type=int, default=None,
                   help="total experts per layer, shared ones included; must divide the MLP's intermediate size "
                        "(default: finegrained: experts of 32 neurons, E = d_ff/32, wider while E > "
                        f"{MAX_EXPERTS}; cmoe, "
                        "moefication: the divisor of d_ff nearest 16; mlpmoe: nearest 8; tomoe: 8, any E from 2 to "
                        f"{MAX_EXPERTS}, experts are trained masks)")
    g.add_argument("--shared", "-S", type=int, default=None,
                   help="experts merged into one always-on shared expert (default: from --active: finegrained a "
                        "third of the active experts, cmoe half, moefication and mlpmoe none)")
    g.add_argument("--top-k", "-K", type=int, default=None,
                   help="routed experts used per token (default: the rest of --active's share; mlpmoe: all "
                        "routed experts, fewer only with --variant slice, the naive routed baseline); not together "
                        "with --active")
    g.add_argument("--config", default=None, metavar="SxAyEz",
                   help="CMoE naming, e.g. S1A7E16: x shared, y routed active, z experts in all; sets --shared, "
                        "--top-k and --experts (default: not used)")
    g.add_argument("--layer-budget", default="uniform", choices=("uniform", "sensitivity"),
                   help="data-driven methods: same top-k in every layer, or per-layer top-k spread by measured "
                        "sensitivity with the same average (needs the patched runtime; default: %(default)s)")
    g.add_argument("--runtime", default="patched", choices=("patched", "stock"),
                   help="patched: the plan exactly, for llama.cpp built with patches/ (unit gates, any router, "
                        "per-layer budgets); stock: a file unmodified llama.cpp runs (deepseek / llama-Mixtral / "
                        "qwen3moe layout, softmax gating with unit weights folded in, linear router fitted to "
                        "non-linear ones; tomoe: shared expert folded into the experts, layers padded to the "
                        "widest; see README) (default: %(default)s)")
    g.add_argument("--shared-layout", default="experts", choices=("experts", "separate"),
                   help="patched runtime: write the shared expert as always-selected routed experts when its width "
                        "is a multiple of the expert width (one expert FFN per layer: faster decoding, slower "
                        "prompt processing with many small experts) or as a separate shared expert (default: "
                        "%(default)s)")
    g.add_argument("--router-dtype", default="f32", choices=ROUTER_DTYPES,
                   help="patched runtime: type of the router's matrices in the file. f16 halves their bytes (with "
                        "hundreds of small experts an f32 router is several %% of what each token reads) and the "
                        "torch reference rounds as llama.cpp's CPU backend does (default: %(default)s)")
    add_method_flags(p, METHOD_NAMES)
    c = p.add_argument_group("calibration (advanced; cmoe, moefication, finegrained, tomoe)")
    c.add_argument("--calib-samples", type=int, default=32,
                   help="calibration windows, drawn at random starts or generated (tomoe draws one window per "
                        "training step from them instead); more windows of the same tokens generalise better "
                        "(default: %(default)s)")
    c.add_argument("--calib-seqlen", type=int, default=512,
                   help="tokens per calibration window, capped at the model's context (tomoe: --seqlen) "
                        "(default: %(default)s)")
    c.add_argument("--seed", type=int, default=0,
                   help="seed for calibration windows, k-means initialisation and router training "
                        "(default: %(default)s)")
    f = p.add_argument_group("recovery fine-tuning (advanced, optional; CMoE's recipe)")
    f.add_argument("--finetune", default="none", choices=("none", "lora"),
                   help="after conversion, LoRA on every linear layer (attention and each expert) of the torch "
                        "model, trained on --finetune-loss (router frozen unless --finetune-router); merged into "
                        "the weights before writing (default: %(default)s)")
    f.add_argument("--finetune-data", default=None, metavar="FILE|DIR|wikitext2",
                   help="fine-tuning text (default: the --calib text; held-out windows from its last eighth)")
    f.add_argument("--finetune-samples", type=int, default=128,
                   help="windows drawn from the text, 1 in 8 held out for early stopping (default: %(default)s)")
    f.add_argument("--finetune-seqlen", type=int, default=512, help="tokens per window (default: %(default)s)")
    f.add_argument("--finetune-steps", type=int, default=None,
                   help="optimizer steps of one window each (default: one pass over the training windows)")
    f.add_argument("--finetune-rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    f.add_argument("--finetune-alpha", type=float, default=16.0,
                   help="LoRA scale alpha (update = alpha/r * B A) (default: %(default)s)")
    f.add_argument("--finetune-lr", type=float, default=1e-3,
                   help="AdamW learning rate, decayed linearly to 0 (default: %(default)s)")
    f.add_argument("--finetune-loss", default="lm", choices=("lm", "kd"),
                   help="lm: next-token cross-entropy on the text (CMoE's); kd: distil the dense model, KL(dense || "
                        "MoE) per token, the teacher being the converted model with every expert on and no update "
                        "(so no second copy; needs a plan that keeps every neuron once: cmoe, moefication, "
                        "finegrained, mlpmoe slice) (default: %(default)s)")
    f.add_argument("--finetune-router", default="frozen", choices=("frozen", "ste", "refit"),
                   help="frozen: the converted router as it is; ste: trained with the LoRA updates, through the "
                        "hard top-k by a straight-through estimator (the file keeps unit weights), linear and MLP "
                        "routers also regressing their experts' output norms (computes every expert for every "
                        "training token); refit: after training, each linear router fitted again (least squares, "
                        "layer by layer) to the fine-tuned experts' output norms (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="working precision for reading and computing (default: %(default)s)")


GROUP_TITLES = {"mlpmoe": "mlpmoe (advanced)", "cmoe": "cmoe (advanced)", "moefication": "moefication (advanced)",
                "finegrained": "finegrained (advanced)",
                "tomoe": "tomoe (advanced; trained masks and router; the model's weights stay frozen)"}


def _flag_fields(methods) -> dict[str, list]:
    """flag -> [(method, field)] over the methods' own options, in declaration order."""
    out: dict[str, list] = {}
    for method in methods:
        for f in fields(OWN_OPTIONS[method]):
            if f.metadata.get("flag"):
                out.setdefault(f.metadata["flag"], []).append((method, f))
    return out


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_method_flags(p: argparse.ArgumentParser, methods) -> None:
    """The flags of the methods' own options (methods/options.py), one group per method; a flag two methods share
    (--router) sits in the first one's group and its help names each method's choices and default. Every flag
    defaults to None here: a flag the chosen method does not take is an error, not silently ignored."""
    groups = {}
    for flag, owners in _flag_fields(methods).items():
        first_method, first = owners[0]
        if first_method not in groups:
            groups[first_method] = p.add_argument_group(GROUP_TITLES[first_method])
        parts = []
        for method, f in owners:
            default = f.metadata.get("default_text", f.default)
            parts.append(f"{method}: {f.metadata['help']} (default: {default})")
        kw = {k: first.metadata[k] for k in ("type", "metavar") if k in first.metadata}
        choices = [c for _, f in owners for c in f.metadata.get("choices", ())]
        if choices:
            kw["choices"] = tuple(dict.fromkeys(choices))
        groups[first_method].add_argument(flag, dest=_dest(flag), default=None,
                                          help="; ".join(parts).replace("%", "%%"), **kw)


def own_options_from_args(method: str, args, strict: bool = True):
    """The method's own options from the parsed flags (unset ones: the dataclass defaults). ``strict``: a flag
    set on the command line that the method does not take is an error (convert, eval); bench, whose runs mix
    methods, passes each method only its own."""
    cls = OWN_OPTIONS[method]
    own_flags = {f.metadata["flag"]: f for f in fields(cls) if f.metadata.get("flag")}
    if strict:
        for flag, owners in _flag_fields(METHOD_NAMES).items():
            if flag not in own_flags and getattr(args, _dest(flag), None) is not None:
                names = ", ".join(m for m, _ in owners)
                raise UserError(f"{flag} is an option of --method {names}, not {method}")
    values = {f.name: getattr(args, _dest(flag)) for flag, f in own_flags.items()
              if getattr(args, _dest(flag), None) is not None}
    return cls(**values)


def method_options(args) -> MethodOptions:
    experts, shared, top_k = args.experts, args.shared, args.top_k
    if args.config is not None:
        from .methods.cmoe import parse_config
        cs, ck, ce = parse_config(args.config)
        for flag, given, default, want in (("--shared", shared, None, cs), ("--top-k", top_k, None, ck),
                                           ("--experts", experts, None, ce)):
            if given != default and given != want:
                raise UserError(f"--config {args.config} sets {flag} {want}, but {flag} {given} was given")
        experts, shared, top_k = ce, cs, ck
    active = active_fraction(args, top_k)
    own = own_options_from_args(args.method, args)
    if args.method == "tomoe" and own.state is None and getattr(args, "out", None):
        own = replace(own, state=str(args.out) + ".tomoe-state.pt")
    if args.layer_budget != "uniform" and args.method == "mlpmoe":
        raise UserError("--layer-budget sensitivity needs a data-driven method (cmoe, moefication, finegrained)")
    if args.method == "mlpmoe" and args.calib is not None:
        raise UserError("--calib is for the data-driven methods (cmoe, moefication, finegrained, tomoe); mlpmoe "
                        "uses no data")
    calib = args.calib if args.calib is not None or args.method == "mlpmoe" else DEFAULT_CALIB
    return MethodOptions(experts=experts, shared=shared, top_k=top_k, calib=calib,
                         calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                         layer_budget=args.layer_budget, runtime=args.runtime, shared_layout=args.shared_layout,
                         router_dtype=args.router_dtype, active=active, own=own)


def active_fraction(args, top_k: int | None) -> float | None:
    """The active fraction that sizes E/S/K: --active, else the default (0.5; mlpmoe 1) unless a top-k is given
    (the older way: -E/-S/-K or --config say it all)."""
    from .sizing import DEFAULT_ACTIVE, check_fraction
    if args.active is None:
        if args.method == "tomoe" or top_k is not None:
            return None
        return 1.0 if args.method == "mlpmoe" else DEFAULT_ACTIVE
    check_fraction(args.active)
    if top_k is not None:
        raise UserError("--active and --top-k (or --config) both set the experts used per token; give one of them")
    if args.method == "tomoe" and args.budget is not None and args.budget != args.active:
        raise UserError(f"--active {args.active:g} and --budget {args.budget:g} disagree: for tomoe they are the "
                        f"same thing, give one")
    return args.active


def lora_options(args):
    """LoRAOptions from the command line, or None without --finetune lora."""
    if args.finetune == "none":
        return None
    from .finetune import LoRAOptions
    return LoRAOptions(rank=args.finetune_rank, alpha=args.finetune_alpha, lr=args.finetune_lr,
                       steps=args.finetune_steps, samples=args.finetune_samples, seqlen=args.finetune_seqlen,
                       data=args.finetune_data, seed=args.seed, loss=args.finetune_loss,
                       router=args.finetune_router)
