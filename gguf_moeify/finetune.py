"""``--finetune lora``: CMoE's optional recovery step on the torch reference, merged back before export.

Recipe (CMoE, METHODS.md): LoRA of rank r on every linear layer of the converted model (attention q/k/v/o and every
expert's gate/up/down, the shared expert's too; one low-rank pair per routed expert), next-token cross-entropy on
calibration-style text, AdamW, one pass over the training windows by default. Everything else is frozen: embeddings,
norms, output head and, by default, the router (CMoE's load-balancing bias only matters for the trainable gate
scale, which the unit-gate file format does not have).

Two options of ours. ``loss="kd"`` distils the dense model instead (per-token KL(dense || MoE)): when the plan keeps
every neuron exactly once, the converted model with every expert on and the LoRA updates off *is* the dense model,
so the teacher costs a forward pass and no second copy. ``router="ste"`` makes the router's tensors trainable
through the hard top-k with a straight-through estimator (``MoEMLP._straight_through``): the forward value stays
the file's unit-weight top-k sum, the gradient reaches every expert's score. ``router="refit"`` fits each linear
router again after training, to the fine-tuned experts' output norms (``refit_routers``).

The windows come from ``--finetune-data`` (default: the calibration text), drawn with seed+1 so they are not the
calibration windows; 1 in 8 (at least one) is held out, drawn from the last eighth of the text that training never
sees; the held-out loss (cross-entropy, whatever the training loss) is measured every fifth of the run and the
state with the lowest held-out loss is the one merged (early stopping). After merging, W <- W + (alpha/r) B A
in place, the model holds the fine-tuned weights once and they are handed to the GGUF writer as overrides; a
trained router goes into the plans, which the writer reads.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .errors import UserError
from .moe_torch import MoEMLP

LOSSES = ("lm", "kd")
ROUTER_MODES = ("frozen", "ste", "refit")
REFIT_WINDOWS = 8   # training windows the refitted routers are fitted on
EXPERT_KEYS = ("gate_exps", "up_exps", "down_exps", "gate_shexp", "up_shexp", "down_shexp")


@dataclass
class LoRAOptions:
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3              # recovers more than 2e-4 in the same steps (SmolLM2 50%: 1.52x vs 1.69x)
    steps: int | None = None      # None: one pass over the training windows
    samples: int = 128            # windows drawn from the fine-tuning text (1 in 8 held out)
    seqlen: int = 512
    data: str | None = None       # None: the calibration text
    seed: int = 0
    loss: str = "lm"              # "lm": next-token cross-entropy; "kd": KL(dense || MoE), the teacher being the
    #                               same model with every expert on and no update (needs a plan keeping each neuron)
    router: str = "frozen"        # "ste": trained through the hard top-k (straight-through); "refit": after
    #                               training, each linear router re-fitted to its tuned experts' output norms

    def check(self, calib: str | None) -> None:
        """Cheap checks before any work (``calib``: the --calib text, the default fine-tuning text)."""
        if not (self.data or calib):
            raise UserError("--finetune lora needs text: give --finetune-data FILE|DIR|wikitext2 (or --calib)")
        for flag, value, low in (("--finetune-rank", self.rank, 1), ("--finetune-samples", self.samples, 2),
                                 ("--finetune-seqlen", self.seqlen, 2)):
            if value < low:
                raise UserError(f"{flag} must be >= {low}, got {value}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--finetune-steps must be >= 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--finetune-lr must be a positive number, got {self.lr}")
        if self.router not in ROUTER_MODES:
            raise UserError(f"--finetune-router must be one of {', '.join(ROUTER_MODES)}, got {self.router!r}")
        if self.loss not in LOSSES:
            raise UserError(f"--finetune-loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.alpha > 0:
            raise UserError(f"--finetune-alpha must be > 0, got {self.alpha}")
        if self.data is not None:
            from .calibration import check_text_source
            check_text_source(self.data, "--finetune-data")


class LowRankDelta(nn.Module):
    """(alpha/r) B @ A for a weight of shape (*batch, out, in): one independent pair per batch index (expert).
    B starts at zero, so training starts from the converted model exactly."""

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        *batch, n_out, n_in = shape
        self.A = nn.Parameter(torch.randn(*batch, rank, n_in, generator=gen) / math.sqrt(n_in))
        self.B = nn.Parameter(torch.zeros(*batch, n_out, rank))
        self.scale = alpha / rank

    def forward(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale


class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank update; ``merged()`` returns the plain layer with the update folded in."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.base = base
        self.delta = LowRankDelta(tuple(base.weight.shape), rank, alpha, gen)
        self.enabled = True   # off while the model serves as its own distillation teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        d = self.delta
        return self.base(x) + ((x.to(d.A.dtype) @ d.A.t()) @ d.B.t() * d.scale).to(x.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += self.delta().to(self.base.weight.dtype)
        return self.base


def attach_lora(model, layer_modules: list[nn.Module], opts: LoRAOptions) -> list[nn.Parameter]:
    """Freeze the model; add LoRA to every nn.Linear and every MoEMLP expert tensor inside the decoder layers
    (and make the routers trainable with ``router="ste"``). Returns the trainable parameters."""
    gen = torch.Generator().manual_seed(opts.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layer_modules:
        linears = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        for name, lin in linears:
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr,
                    LoRALinear(lin, opts.rank, opts.alpha, gen))
        for moe in (m for m in layer.modules() if isinstance(m, MoEMLP)):
            for key in EXPERT_KEYS:
                if hasattr(moe, key):
                    moe.deltas[key] = LowRankDelta(tuple(getattr(moe, key).shape), opts.rank, opts.alpha, gen)
            if opts.router == "ste":
                moe.trainable_router()
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def merge_lora(layer_modules: list[nn.Module]) -> None:
    """Fold every update into its weight, in place, and remove the LoRA modules."""
    for layer in layer_modules:
        wrapped = [(n, m) for n, m in layer.named_modules() if isinstance(m, LoRALinear)]
        for name, mod in wrapped:
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, mod.merged())
        for moe in (m for m in layer.modules() if isinstance(m, MoEMLP)):
            for key in list(moe.deltas):
                getattr(moe, key).add_(moe.deltas[key]().to(getattr(moe, key).dtype))
                del moe.deltas[key]
            moe.freeze_router()


def keeps_every_neuron_once(plan) -> bool:
    """True when all experts on with weight 1 is the dense MLP: each neuron in exactly one expert (or the shared
    one), unscaled. Distillation (``--finetune-loss kd``) takes its teacher from such a plan."""
    used = np.concatenate([plan.shared, plan.experts[plan.experts >= 0]])
    return plan.neuron_scale is None and used.size == plan.d_ff and np.unique(used).size == plan.d_ff


@contextmanager
def as_teacher(model):
    """The model with every expert on and no LoRA update: the dense model, for plans that keep every neuron."""
    moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in moes:
        m.teacher = True
    for m in loras:
        m.enabled = False
    try:
        yield model
    finally:
        for m in moes:
            m.teacher = False
        for m in loras:
            m.enabled = True


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return logits.reshape(-1, logits.shape[-1])


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(_logits(model, ids), ids[:, 1:].reshape(-1))


def _kd_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || model), the teacher being the dense model inside the MoE one."""
    with torch.no_grad(), as_teacher(model):
        teacher = nn.functional.log_softmax(_logits(model, ids), dim=-1)
    student = nn.functional.log_softmax(_logits(model, ids), dim=-1)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def train_lora(model, layer_modules: list[nn.Module], train: torch.Tensor, held: torch.Tensor, opts: LoRAOptions,
               progress: bool = True) -> dict:
    """Fine-tune LoRA updates on the ``train`` windows (N, L) and merge the state with the lowest loss on the
    ``held`` windows into the model. Returns the figures of the run (losses, steps, trainable parameter count)."""
    moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
    if opts.loss == "kd":
        bad = [m.plan.layer for m in moes if not keeps_every_neuron_once(m.plan)]
        if bad:
            raise UserError(f"--finetune-loss kd needs plans that keep every dense neuron exactly once (layer "
                            f"{bad[0]} drops, duplicates or rescales neurons); use --finetune-loss lm")
    if opts.router == "refit" and any(m.router_kind != "linear" for m in moes):
        raise UserError("--finetune-router refit re-fits linear routers only (finegrained's default); this plan's "
                        "router is not linear")
    if opts.router != "frozen" and any(m.plan.per_token_count for m in moes):
        raise UserError(f"--finetune-router {opts.router} does not train or refit per-token expert counts' "
                        "thresholds; use --finetune-router frozen with --expert-counts per-token")
    train_loss = _kd_loss if opts.loss == "kd" else _loss
    params = attach_lora(model, layer_modules, opts)
    initial = [p.detach().clone() for p in params]
    steps = opts.steps or len(train)
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 - s / steps)  # linear decay to 0
    order = torch.Generator().manual_seed(opts.seed)

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(sum(_loss(model, held[i:i + 1]).item() for i in range(len(held))) / len(held))

    start = best = held_loss()
    best_state, best_step = None, 0
    every = max(1, steps // 5)
    perm = torch.randperm(len(train), generator=order)
    bar = tqdm(range(steps), desc="fine-tuning LoRA", unit="step", disable=not progress)
    train_losses = []
    for step in bar:
        if step and step % len(train) == 0:
            perm = torch.randperm(len(train), generator=order)
        model.train()
        loss = task = train_loss(model, train[perm[step % len(train)]].unsqueeze(0))
        fits = [m.router_fit_loss for m in moes if m.router_fit_loss is not None]
        if fits:  # trained routers also keep predicting their experts' output norms (mean over layers)
            loss = loss + sum(fits) / len(fits)
            for m in moes:
                m.router_fit_loss = None
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        train_losses.append(task.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            h = held_loss()
            if h < best:
                best, best_step = h, step + 1
                best_state = [p.detach().clone() for p in params]
            bar.set_postfix(train=f"{sum(train_losses[-every:]) / len(train_losses[-every:]):.3f}",
                            held_out=f"{h:.3f}")
    bar.close()
    with torch.no_grad():  # never better than the start: back to the start (B = 0, the original routers)
        for p, v in zip(params, best_state or initial):
            p.copy_(v)
    merge_lora(layer_modules)
    model.eval()
    refit = {}
    if opts.router == "refit":
        refit["held_out_loss_refit"] = refit_routers(model, moes, train[perm[:REFIT_WINDOWS]], held_loss)
    return {"held_out_loss_start": start, "held_out_loss_best": best, "best_step": best_step, "steps": steps,
            "train_windows": len(train), "held_out_windows": len(held), "seqlen": int(train.shape[1]),
            "trainable_params": sum(p.numel() for p in params), "rank": opts.rank, "alpha": opts.alpha,
            "lr": opts.lr, "loss": opts.loss, "router": opts.router, **refit}


class _Captured(Exception):
    """Stops a forward pass once the layer being refitted has seen its input."""


@torch.no_grad()
def refit_routers(model, moes: list[MoEMLP], windows: torch.Tensor, held_loss) -> float:
    """Re-fit each linear router, in layer order, to predict its fine-tuned experts' output norms on ``windows``
    (finegrained's own ridge fit to standardised log norms), each layer's inputs taken from the model with the
    layers before it already refitted. Returns the held-out loss after."""
    from .routers import fit_linear_router
    for moe in tqdm(moes, desc="refitting routers", unit="layer", leave=False):
        xs = []

        def grab(_mod, args):
            xs.append(args[0].reshape(-1, args[0].shape[-1]).float())
            raise _Captured

        handle = moe.register_forward_pre_hook(grab)
        try:
            for w in windows:
                try:
                    model(input_ids=w.unsqueeze(0), use_cache=False)
                except _Captured:
                    pass
        finally:
            handle.remove()
        x = torch.cat(xs)
        w = {n: getattr(moe, n) for n in ("gate_exps", "up_exps", "down_exps")}
        # in row chunks: the (rows, E, d) block of every expert's output stays small for large models
        rows = max(1, 2 ** 24 // (w["gate_exps"].shape[0] * x.shape[1]))
        norms = torch.cat([moe._all_experts(x[i:i + rows].to(moe.gate_exps.dtype), w).norm(dim=-1)
                           for i in range(0, len(x), rows)])
        weight = fit_linear_router(x, norms.float())
        moe.set_router({"weight": weight})
    return held_loss()


def finetuned_overrides(model, adapter, n_layers: int) -> dict[str, torch.Tensor]:
    """The tensors fine-tuning changed, by name for the GGUF writer: attention weights by HF name, expert tensors by
    GGUF name. They are the model's own tensors (no copy)."""
    from .gguf_keys import expert_tensor_name
    out = {}
    for i in range(n_layers):
        prefix = adapter.layer_prefix.format(i=i)
        layer = model.get_submodule(prefix.rstrip("."))
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                out[f"{prefix}{name}.weight"] = mod.weight
            elif isinstance(mod, MoEMLP):
                for key in EXPERT_KEYS:
                    if hasattr(mod, key):
                        out[expert_tensor_name(i, key)] = getattr(mod, key)
    return out


def decoder_layers(model, adapter, n_layers: int) -> list[nn.Module]:
    return [model.get_submodule(adapter.layer_prefix.format(i=i).rstrip(".")) for i in range(n_layers)]


def finetune_windows(ckpt, calib: str | None, opts: LoRAOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) windows: the held-out ones come from the last eighth of the text (at least one window
    long), the training ones from the rest, so the held-out loss is measured on text training never saw."""
    from .calibration import corpus_tokens, draw_windows
    source = opts.data or calib
    seqlen = ckpt.window(opts.seqlen)
    n_held = max(1, opts.samples // 8)
    ids = corpus_tokens(ckpt, source, opts.samples, seqlen, opts.seed + 1)
    cut = len(ids) - max(len(ids) // 8, seqlen + 1)
    # seed + 1: other windows than the calibration ones drawn from the same text
    train = draw_windows(ids[:cut], opts.samples - n_held, seqlen, opts.seed + 1, "--finetune-data")
    held = draw_windows(ids[cut:], n_held, seqlen, opts.seed + 2, "--finetune-data")
    return train, held


def finetune_lora(model, ckpt, adapter, calib: str | None, opts: LoRAOptions, progress: bool = True) -> dict:
    """Fine-tune the converted torch model in place (LoRA, then merged). Returns the run's figures."""
    opts.check(calib)
    train, held = finetune_windows(ckpt, calib, opts)
    return train_lora(model, decoder_layers(model, adapter, ckpt.n_layers), train, held, opts, progress)
