"""The options of the methods: those every method takes (``MethodOptions``), one typed dataclass per method for its
own (``CMoEOptions``, ...), each field declaring its command-line flag next to it, and the checks they share.

``cli``, ``bench`` and ``scripts/quality_table.py`` build their flags and options from these declarations
(``method_args.add_method_flags`` / ``own_options_from_args``), so a method option is written down once."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import UserError


def option(default: Any, flag: str | None, help: str, recorded: bool = True, **argparse_kw) -> Any:
    """A method option: a dataclass field with its flag (None: API only), the help text without the default (added
    from ``default``, or from ``argparse_kw["default_text"]``), and argparse's ``type``/``choices``/``metavar``.
    ``recorded=False`` leaves it out of the file's provenance (where a run keeps its state, not what the file is)."""
    return field(default=default, metadata={"flag": flag, "help": help, "recorded": recorded, **argparse_kw})


class _Checked:
    """Values outside a field's ``choices`` are refused with the flag's name, for the API as for the CLI."""

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value is not None and value not in choices:
                flag = f.metadata.get("flag") or f.name
                raise UserError(f"{flag} {value!r} is not available for {self.method}; choose one of "
                                f"{', '.join(choices)}")


@dataclass(frozen=True)
class MLPMoEOptions(_Checked):
    method = "mlpmoe"
    variant: str = option("slice", "--variant", "exact slicing, or a parameter-reducing variant",
                          choices=("slice", "fractal-fade", "compensated-pruning"))
    keep: float | None = option(None, "--keep", "fraction of the MLP's neurons the variants keep", type=float,
                                default_text="0.8 for the variants")


@dataclass(frozen=True)
class CMoEOptions(_Checked):
    method = "cmoe"
    ka: int = option(10, "--ka", "neurons marked active per token when profiling activation rates (K_a)", type=int)


@dataclass(frozen=True)
class MoEficationOptions(_Checked):
    method = "moefication"
    split: str = option("param", "--split", "experts by balanced k-means on normalised gate rows (param) or by a "
                        "spectral partition of the co-activation graph (coact)", choices=("param", "coact"))
    router: str = option("similarity", "--router", "expert-centre similarity router or a trained 2-layer MLP "
                         "router", choices=("similarity", "mlp"))


@dataclass(frozen=True)
class FinegrainedOptions(_Checked):
    method = "finegrained"
    stat: str = option("weighted", "--stat", "neuron importance |h|*||W_down column|| (weighted) or |h| alone "
                       "(activation, the papers' statistic)", choices=("weighted", "activation"))
    router: str = option("linear", "--router", "least-squares linear router predicting each expert's output norm, "
                         "or a 2-layer MLP router regressing the same targets", choices=("linear", "mlp"))
    router_hidden: int = option(256, "--router-hidden", "width of the MLP router's tanh layer (--router mlp)",
                                type=int)
    router_loss: str = option("mse", None, "MLP router: regress the norms (mse) or the oracle's top-k choices (bce)",
                              choices=("mse", "bce"))
    expert_counts: str = option(
        "fixed", "--expert-counts", "experts per token: the same top-k for every token (fixed), or per token "
        "(per-token: the linear router predicts each expert's output norm, and a token uses the experts above a "
        "threshold set per layer so the calibration tokens use top-k on average, through the layers as a q8_0/q4_0 "
        "file stores them; patched runtime only)",
        choices=("fixed", "per-token"))
    max_experts: float = option(2.0, "--max-experts", "--expert-counts per-token: the most routed experts a token "
                                "may use, as a multiple of the mean (top-k)", type=float, metavar="FACTOR")


@dataclass(frozen=True)
class ToMoEOptions(_Checked):
    method = "tomoe"
    budget: float | None = option(None, "--budget", "target fraction of MLP neurons active per token", type=float,
                                  metavar="P", default_text="--active, else 0.5")
    budget_on: str | None = option(
        None, "--budget-on", "what --budget limits: widest = per layer the widest expert, i.e. what the file "
        "computes per token (every expert of a layer is padded to its widest), averaged over layers; layer = the "
        "same in every layer on its own (one width for the whole file: use it with --runtime stock, whose files "
        "pad every layer to the widest); tokens = the paper's mean size of the expert each token chooses (experts "
        "may then differ widely in size and the file computes the widest)", choices=("widest", "layer", "tokens"),
        default_text="widest; layer with --runtime stock")
    train_steps: int = option(400, "--train-steps", "optimizer steps, one window of --seqlen calibration tokens "
                              "each", type=int)
    lr: float = option(5e-3, "--lr", "AdamW learning rate", type=float)
    seqlen: int = option(256, "--seqlen", "tokens per training window, capped at the model's context", type=int)
    state: str | None = option(None, "--train-state", "training checkpoint, saved every 10 steps; an interrupted "
                               "run given the same file and options resumes from it, a finished one is reused",
                               recorded=False, metavar="FILE",
                               default_text="OUT.gguf + '.tomoe-state.pt' for convert, none for eval")

    def budget_or_default(self) -> float:
        return 0.5 if self.budget is None else self.budget

    def budget_on_for(self, runtime: str) -> str:
        """A stock file has one expert width (every layer padded to the widest), so with ``--runtime stock`` the
        budget holds in every layer unless ``--budget-on`` says otherwise."""
        if self.budget_on is not None:
            return self.budget_on
        return "layer" if runtime == "stock" else "widest"


OWN_OPTIONS = {c.method: c for c in (MLPMoEOptions, CMoEOptions, MoEficationOptions, FinegrainedOptions,
                                     ToMoEOptions)}


@dataclass(frozen=True)
class MethodOptions:
    experts: int | None = 8     # E: total experts, shared ones included (CMoE's z); None = the method's default
    shared: int | None = 0      # S: experts merged into the always-on shared expert (CMoE's x); None = default
    top_k: int | None = None    # routed experts per token (CMoE's y); None = the method's default
    calib: str | None = None    # data-driven methods: text file, folder of .txt, or "wikitext2"
    calib_samples: int = 32     # calibration windows
    calib_seqlen: int = 512     # tokens per window (capped at the model's context)
    seed: int = 0               # calibration windows, k-means initialisation, router training
    calib_outtype: str | None = None   # q8_0/q4_0: calibration propagates through the weights as a file of this type
                                       # stores them (calibration.py); None: the source weights
    layer_budget: str = "uniform"   # "sensitivity": per-layer top-k from measured error curves (same average)
    runtime: str = "patched"        # "stock": plans expressed for unmodified llama.cpp (stock.py)
    shared_layout: str = "experts"  # patched runtime: shared expert as always-selected experts, or "separate"
    router_dtype: str = "f32"       # "f16": router matrices stored (and computed) in f16 (plan.ROUTER_DTYPES)
    active: float | None = None     # fraction of MLP neurons per token: E/S/K (experts/shared/top_k left None) from
                                    # d_ff and this fraction (sizing.expert_layout); None: the methods' own defaults
    own: Any = None             # the method's own options (OWN_OPTIONS); None: its defaults

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    def own_for(self, cls):
        """The method's own options as ``cls``: the defaults when none were given; another method's are refused."""
        if self.own is None:
            return cls()
        if not isinstance(self.own, cls):
            flags = [f.metadata["flag"] for f in fields(self.own) if f.metadata.get("flag")
                     and getattr(self.own, f.name) != f.default]
            what = f"{', '.join(flags)} {'belongs' if len(flags) == 1 else 'belong'}" if flags else "the options given"
            raise UserError(f"{what} to --method {self.own.method}, not {cls.method}")
        return self.own

    def recorded(self) -> dict:
        """What the file's provenance records: every option, the method's own ones with their defaults filled in
        (a state path is left out: it says where a run kept its work, not what the file is)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "own"}
        if self.own is not None:
            out["own"] = {f.name: getattr(self.own, f.name) for f in fields(self.own) if f.metadata["recorded"]}
        return out


def with_own(opts: MethodOptions, method: str) -> MethodOptions:
    """``opts`` with ``own`` filled in with the method's defaults when it is None (checked against the method)."""
    cls = OWN_OPTIONS[method]
    return replace(opts, own=opts.own_for(cls))


def check_common(opts: MethodOptions, d_ff: int) -> None:
    """Checks every method shares: expert counts, shared experts, top-k, divisibility of d_ff."""
    if opts.experts < 1:
        raise UserError(f"--experts must be >= 1, got {opts.experts}")
    if opts.shared < 0 or opts.shared >= opts.experts:
        raise UserError(f"--shared {opts.shared} must be >= 0 and < --experts {opts.experts} "
                        f"(at least one routed expert is needed)")
    if d_ff % opts.experts:
        near = sorted({e for e in range(1, min(d_ff, 4 * opts.experts) + 1) if d_ff % e == 0},
                      key=lambda e: abs(e - opts.experts))[:4]
        raise UserError(f"--experts {opts.experts} does not divide the intermediate size {d_ff}; "
                        f"try one of {', '.join(map(str, sorted(near)))}")
    if opts.top_k is not None and not 1 <= opts.top_k <= opts.routed:
        raise UserError(f"--top-k {opts.top_k} must be between 1 and the number of routed experts {opts.routed} "
                        f"(= --experts {opts.experts} - --shared {opts.shared})")
