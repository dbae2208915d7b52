"""The method flags of ``convert`` and ``eval`` (the main ones and the advanced groups, each with its default), and
the MethodOptions / LoRAOptions built from them, with the checks that need several flags at once."""
from __future__ import annotations

import argparse

from .errors import UserError
from .methods import METHOD_NAMES, MethodOptions
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
    main.add_argument("--calib", default=None, metavar="FILE|DIR|wikitext2",
                      help="calibration text: a UTF-8 file, a folder of .txt files, or wikitext2 (WikiText-2 train "
                           "via the `datasets` package, online only); required by cmoe, moefication, finegrained "
                           "and tomoe; the package bundles an excerpt of Sense and Sensibility in "
                           "gguf_moeify/data/ (default: none)")
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
    g.add_argument("--variant", default="slice", choices=("slice", "fractal-fade", "compensated-pruning"),
                   help="mlpmoe: exact slicing, or a parameter-reducing variant (default: %(default)s)")
    g.add_argument("--keep", type=float, default=None,
                   help="mlpmoe variants: fraction of MLP neurons kept (default: 0.8 for the variants)")
    g.add_argument("--ka", type=int, default=None,
                   help="cmoe: neurons marked active per token when profiling activation rates (K_a) (default: 10)")
    g.add_argument("--split", default="param", choices=("param", "coact"),
                   help="moefication: experts by balanced k-means on normalised gate rows (param) or by a "
                        "spectral partition of the co-activation graph (coact) (default: %(default)s)")
    g.add_argument("--router", default=None, choices=("similarity", "mlp", "linear"),
                   help="moefication: expert-centre similarity router or a trained 2-layer MLP router (default: "
                        "similarity); finegrained: least-squares linear router predicting each expert's output "
                        "norm, or a 2-layer MLP router regressing the same targets (default: linear)")
    g.add_argument("--router-hidden", type=int, default=None,
                   help="finegrained --router mlp: width of the MLP router's tanh layer (default: 256)")
    g.add_argument("--stat", default="weighted", choices=("weighted", "activation"),
                   help="finegrained: neuron importance |h|*||W_down column|| (weighted) or |h| alone "
                        "(activation, the papers' statistic) (default: %(default)s)")
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
    t = p.add_argument_group("tomoe (advanced; trained masks and router; the model's weights stay frozen)")
    t.add_argument("--budget", type=float, default=None, metavar="P",
                   help="tomoe: target fraction of MLP neurons active per token (default: 0.5)")
    t.add_argument("--budget-on", default=None, choices=("widest", "layer", "tokens"),
                   help="tomoe: what --budget limits: widest = per layer the widest expert, i.e. what the file "
                        "computes per token (every expert of a layer is padded to its widest), averaged over layers; "
                        "layer = the same in every layer on its own (one width for the whole file: use it with "
                        "--runtime stock, whose files pad every layer to the widest); tokens = the paper's "
                        "mean size of the expert each token chooses (experts may then differ widely in size and the "
                        "file computes the widest) (default: widest; layer with --runtime stock)")
    t.add_argument("--train-steps", type=int, default=None,
                   help="tomoe: optimizer steps, one window of --seqlen calibration tokens each (default: 400)")
    t.add_argument("--lr", type=float, default=None, help="tomoe: AdamW learning rate (default: 5e-3)")
    t.add_argument("--seqlen", type=int, default=None,
                   help="tomoe: tokens per training window, capped at the model's context (default: 256)")
    t.add_argument("--train-state", default=None, metavar="FILE",
                   help="tomoe: training checkpoint, saved every 10 steps; an interrupted run given the same "
                        "file and options resumes from it, a finished one is reused (default: OUT.gguf + "
                        "'.tomoe-state.pt' for convert, none for eval)")
    c = p.add_argument_group("calibration (advanced; cmoe, moefication, finegrained, tomoe)")
    c.add_argument("--calib-samples", type=int, default=8,
                   help="calibration windows, drawn at random starts (tomoe draws one window per training step "
                        "instead) (default: %(default)s)")
    c.add_argument("--calib-seqlen", type=int, default=2048,
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
    extra = {}
    if args.method == "cmoe" and args.ka is not None:
        extra["ka"] = args.ka
    if args.method == "moefication":
        extra.update(split=args.split, router=args.router or "similarity")
    if args.method == "finegrained":
        extra.update(stat=args.stat, router=args.router or "linear")
        if args.router_hidden is not None:
            extra["router_hidden"] = args.router_hidden
    tomoe_flags = {"budget": args.budget, "budget_on": args.budget_on, "train_steps": args.train_steps,
                   "lr": args.lr, "seqlen": args.seqlen, "state": args.train_state}
    if args.method == "tomoe":
        extra.update({k: v for k, v in tomoe_flags.items() if v is not None})
        if "state" not in extra and getattr(args, "out", None):
            extra["state"] = str(args.out) + ".tomoe-state.pt"
    elif any(v is not None for v in tomoe_flags.values()):
        raise UserError("--budget, --budget-on, --train-steps, --lr, --seqlen and --train-state are options of "
                        "--method tomoe only")
    if args.layer_budget != "uniform" and args.method == "mlpmoe":
        raise UserError("--layer-budget sensitivity needs a data-driven method (cmoe, moefication, finegrained)")
    if args.method == "mlpmoe" and args.calib is not None:
        raise UserError("--calib is for the data-driven methods (cmoe, moefication, finegrained, tomoe); mlpmoe "
                        "uses no data")
    return MethodOptions(experts=experts, shared=shared, top_k=top_k, variant=args.variant, keep=args.keep,
                         calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                         seed=args.seed, layer_budget=args.layer_budget, runtime=args.runtime,
                         shared_layout=args.shared_layout, router_dtype=args.router_dtype, active=active,
                         extra=extra)


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
