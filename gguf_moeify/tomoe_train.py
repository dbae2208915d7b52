"""ToMoE's training (methods/tomoe.py has the method and the export): expert masks from a hypernetwork and one
linear router per layer, learned against the frozen dense model as teacher.

Pieces (ToMoE, arXiv 2501.15316; METHODS.md):
- ``MaskHypernet``: one learned embedding per (layer, expert) -> a small MLP shared by all layers -> one logit per
  d_ff neuron. Masks are straight-through Gumbel-sigmoid samples while training (hard 0/1 forward, the sigmoid's
  gradient backward) and ``logit > 0`` at inference.
- ``MaskedMLP`` replaces each dense MLP: a linear router (d -> E, no bias) chooses one expert per token (hard
  Gumbel-softmax, straight-through, while training; argmax at inference) and the output is the dense SwiGLU with
  the chosen expert's mask on its neurons, no gate weighting. With ``teacher`` set it is the dense MLP.
- Loss: KL(teacher || student) on next-token distributions + LAMBDA_RATIO * |log(R / p)| + LAMBDA_COVER *
  coverage (probability, under the soft masks, that no expert of a layer keeps a neuron) + LAMBDA_BALANCE * Switch load balancing
  (E * sum_e f_e P_e). AdamW on the hypernetwork and routers only; the model's weights never change.
  R (``budget_on``): "tokens" is the paper's, the mean over tokens of the chosen expert's share of d_ff, which lets
  a layer keep one wide expert for the few tokens that need it; a GGUF pads every expert of a layer to its widest
  (one width per layer), so on SmolLM2 a "tokens" run at p = 0.25 computed 78% of the MLP per token in llama.cpp.
  "widest" (default) puts the budget on what the file computes, the mean over layers of each layer's widest expert:
  narrower experts are then free to grow to the widest (the KL favours it), so a layer's experts end equal in size.
  "layer" holds each layer's widest expert to p on its own (the mean of the per-layer penalties), so layers end
  about equally wide: what ``--runtime stock`` needs, whose files have one expert width (padded to the widest layer).
- Resumable: the trainable state, the optimizer and the step are saved atomically every SAVE_EVERY steps; the
  windows and the Gumbel noise of step s are drawn from generators seeded with (seed, s), so a resumed run takes
  the same steps as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .errors import UserError

LAMBDA_RATIO = 10.0
LAMBDA_COVER = 1.0
LAMBDA_BALANCE = 0.1
MASK_TAU = 0.5          # Gumbel-sigmoid temperature
ROUTER_TAU = 1.0        # Gumbel-softmax temperature
INIT_LOGIT = 3.0        # every mask starts (nearly) all-on: training starts from the dense model
SAVE_EVERY = 10


@dataclass
class TrainOptions:
    experts: int = 8
    budget: float = 0.5           # target fraction p of d_ff neurons active per token
    # what the budget limits: "widest", each layer's widest expert (what a file computes), averaged over layers;
    # "layer", the same in every layer; "tokens", the paper's mean over tokens of the chosen expert's size
    budget_on: str = "widest"
    steps: int = 400
    lr: float = 5e-3
    seqlen: int = 256
    seed: int = 0
    embed_dim: int = 64
    hidden: int = 256
    state: str | None = None      # file for checkpoint/resume; None: no checkpoints


def logistic_noise(shape, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


class MaskHypernet(nn.Module):
    def __init__(self, n_layers: int, n_experts: int, d_ff: int, embed_dim: int, hidden: int, gen: torch.Generator):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(n_layers, n_experts, embed_dim, generator=gen))
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, d_ff)
        with torch.no_grad():
            for lin in (self.fc1, self.fc2):
                bound = 1 / math.sqrt(lin.in_features)
                lin.weight.copy_((torch.rand(lin.weight.shape, generator=gen) * 2 - 1) * bound)
                lin.bias.zero_()
            self.fc2.weight.mul_(0.1)
            self.fc2.bias.fill_(INIT_LOGIT)

    def forward(self) -> torch.Tensor:
        """Mask logits (n_layers, n_experts, d_ff)."""
        return self.fc2(F.gelu(self.norm(self.fc1(self.embed))))


def gumbel_sigmoid(logits: torch.Tensor, gen: torch.Generator, noise: float = 1.0) -> torch.Tensor:
    soft = torch.sigmoid((logits + noise * logistic_noise(logits.shape, gen)) / MASK_TAU)
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


def hard_gumbel_softmax(logits: torch.Tensor, gen: torch.Generator, noise: float = 1.0) -> torch.Tensor:
    u = torch.rand(logits.shape, generator=gen).clamp(1e-9, 1 - 1e-9)
    soft = torch.softmax((logits - noise * torch.log(-torch.log(u))) / ROUTER_TAU, dim=-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


class MaskedMLP(nn.Module):
    """A dense SwiGLU MLP (weights borrowed, frozen) with ToMoE's router and per-token expert mask."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, router: nn.Linear, act):
        super().__init__()
        self.act = act
        self.gate, self.up, self.down = gate, up, down     # plain tensors: not parameters of this module
        self.router = router
        self.masks: torch.Tensor | None = None             # (E, d_ff), set by the trainer before each forward
        self.gen: torch.Generator | None = None            # Gumbel noise while training
        self.noise = 1.0                                   # its scale (annealed to 0 over the run)
        self.teacher = False
        self.record: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(x @ self.gate.t()) * (x @ self.up.t())
        if self.teacher:
            return h @ self.down.t()
        flat = x.reshape(-1, x.shape[-1])
        scores = self.router(flat.to(self.router.weight.dtype))
        if self.training:
            choice = hard_gumbel_softmax(scores, self.gen, self.noise)
        else:
            choice = F.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)
        token_mask = choice @ self.masks                   # (T, d_ff): the chosen expert's mask
        self.record = {"active": (choice @ self.masks.sum(-1)).mean() / self.masks.shape[-1],
                       "load": choice.detach().mean(0), "prob": torch.softmax(scores, -1).mean(0)}
        return (h * token_mask.reshape(h.shape).to(h.dtype)) @ self.down.t()


class ToMoEModel:
    """The HF model with every MLP replaced by a MaskedMLP, plus the trainable hypernetwork and routers."""

    def __init__(self, model, adapter, n_layers: int, opts: TrainOptions):
        self.model, self.opts = model, opts
        for p in model.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(opts.seed)
        mlp_path, gate_attr = adapter.mlp_gate.rsplit(".", 1)
        up_attr, down_attr = adapter.mlp_up.rsplit(".", 1)[1], adapter.mlp_down.rsplit(".", 1)[1]
        self.layers: list[MaskedMLP] = []
        routers = []
        for i in range(n_layers):
            layer = model.get_submodule(adapter.layer_prefix.format(i=i).rstrip("."))
            dense = layer.get_submodule(mlp_path)
            gate, up, down = (getattr(dense, a).weight for a in (gate_attr, up_attr, down_attr))
            router = nn.Linear(gate.shape[1], opts.experts, bias=False)
            with torch.no_grad():
                router.weight.copy_(torch.randn(router.weight.shape, generator=gen) / math.sqrt(gate.shape[1]))
            routers.append(router)
            masked = MaskedMLP(gate, up, down, router, adapter.act)
            setattr(layer, mlp_path, masked)
            self.layers.append(masked)
        self.d_ff = self.layers[0].gate.shape[0]
        if any(m.gate.shape[0] != self.d_ff for m in self.layers):
            raise UserError("tomoe needs the same MLP width in every layer (its hypernetwork is shared)")
        self.routers = nn.ModuleList(routers)
        self.hyper = MaskHypernet(n_layers, opts.experts, self.d_ff, opts.embed_dim, opts.hidden, gen)
        self.history: list[dict] = []

    def parameters(self) -> list[nn.Parameter]:
        return list(self.hyper.parameters()) + list(self.routers.parameters())

    def state_dict(self) -> dict:
        return {"hyper": self.hyper.state_dict(), "routers": self.routers.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.hyper.load_state_dict(state["hyper"])
        self.routers.load_state_dict(state["routers"])

    def set_masks(self, gen: torch.Generator | None, noise: float = 1.0) -> torch.Tensor:
        """Masks for the next forward (sampled with ``gen`` and noise scale ``noise``, or hard ``logit > 0`` when
        ``gen`` is None); returns the logits."""
        logits = self.hyper()
        masks = gumbel_sigmoid(logits, gen, noise) if gen is not None else (logits > 0).to(logits.dtype)
        for layer, m in zip(self.layers, masks):
            layer.masks, layer.gen, layer.noise = m, gen, noise
        return logits

    def set_mode(self, teacher: bool = False, training: bool = False) -> None:
        for layer in self.layers:
            layer.teacher = teacher
            layer.train(training)

    @torch.no_grad()
    def hard_masks(self) -> torch.Tensor:
        """(n_layers, E, d_ff) bool: the masks used at inference."""
        return self.hyper() > 0

    def router_weights(self) -> list[torch.Tensor]:
        return [r.weight.detach().clone() for r in self.routers]

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The inference-time ToMoE model (hard masks, argmax routing)."""
        self.set_mode()
        self.set_masks(None)
        return self.model(input_ids=ids, use_cache=False).logits


def budget_penalty(budget_on: str, budget: float, widest_per_layer: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """|log(R / p)| for the R that ``budget_on`` names; "layer" averages the per-layer penalties, so no layer can
    pay for another (one width for the whole file)."""
    if budget_on == "layer":
        return torch.abs(torch.log(widest_per_layer / budget)).mean()
    return torch.abs(torch.log((widest_per_layer.mean() if budget_on == "widest" else ratio) / budget))


def losses(tm: ToMoEModel, ids: torch.Tensor, gen: torch.Generator, noise: float = 1.0) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        tm.set_mode(teacher=True)
        teacher = torch.log_softmax(tm.model(input_ids=ids, use_cache=False).logits.float(), -1)
    tm.set_mode(training=True)
    logits = tm.set_masks(gen, noise)
    masks_st = torch.stack([m.masks for m in tm.layers])
    student = torch.log_softmax(tm.model(input_ids=ids, use_cache=False).logits.float(), -1)
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    ratio = torch.stack([m.record["active"] for m in tm.layers]).mean()
    # what a file computes per token: in each layer the widest expert (narrower ones are padded to it)
    widest_per_layer = masks_st.sum(-1).amax(-1) / masks_st.shape[-1]
    widest = widest_per_layer.mean()
    soft = torch.sigmoid(logits)
    cover = torch.prod(1 - soft, dim=1).mean()
    n_exp = tm.opts.experts
    balance = torch.stack([n_exp * (m.record["load"] * m.record["prob"]).sum() for m in tm.layers]).mean()
    penalty = budget_penalty(tm.opts.budget_on, tm.opts.budget, widest_per_layer, ratio)
    total = kl + LAMBDA_RATIO * penalty + LAMBDA_COVER * cover + LAMBDA_BALANCE * balance
    return {"loss": total, "kl": kl, "ratio": ratio, "widest": widest, "cover": cover, "balance": balance}


def fingerprint(model_id: str, calib: str, opts: TrainOptions) -> str:
    """What a saved state must match to be resumed. Steps are excluded: a finished run asked for fewer steps is
    reused as it is, asked for more it is extended (the noise schedule then follows the new step count)."""
    keys = {k: v for k, v in asdict(opts).items() if k not in ("steps", "state")}
    blob = json.dumps({"model": model_id, "calib": calib, **keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def step_window(ids: torch.Tensor, seqlen: int, seed: int, step: int) -> torch.Tensor:
    """The (1, seqlen) training window of ``step``: calibration's window draw, seeded per step (resumable)."""
    from .calibration import draw_windows
    return draw_windows(ids, 1, seqlen, seed * 1_000_003 + step)


def train(tm: ToMoEModel, ids: torch.Tensor, fp: str, progress: bool = True) -> dict:
    """Train ``tm`` on random windows of the token sequence ``ids``; resume from ``opts.state`` when it holds a run
    with the same fingerprint. Returns the run's figures."""
    opts = tm.opts
    if len(ids) < opts.seqlen + 1:
        raise UserError(f"--calib text too short for tomoe: {len(ids)} tokens, need more than --seqlen "
                        f"{opts.seqlen}")
    params = tm.parameters()
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    start, history, seconds = 0, [], 0.0
    state_path = Path(opts.state) if opts.state else None
    if state_path is not None and state_path.is_file():
        try:
            saved = torch.load(state_path, weights_only=False)
        except Exception as exc:
            raise UserError(f"--train-state {state_path}: cannot be read ({type(exc).__name__}); delete it to "
                            f"start over")
        if saved.get("fingerprint") != fp:
            raise UserError(f"--train-state {state_path} holds a ToMoE run with other options or another model; "
                            f"delete it or give another --train-state")
        tm.load_state_dict(saved["trainable"])
        optim.load_state_dict(saved["optim"])
        start, history, seconds = saved["step"], saved["history"], saved["seconds"]
    bar = tqdm(range(start, opts.steps), desc="training ToMoE", unit="step", disable=not progress,
               initial=start, total=opts.steps)
    t0 = time.time() - seconds
    for step in bar:
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + step + 7)
        # noise annealed linearly to 0: the run ends on the deterministic masks and routing that are exported
        terms = losses(tm, step_window(ids, opts.seqlen, opts.seed, step), gen, 1.0 - step / opts.steps)
        optim.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optim.step()
        rec = {k: round(float(v.detach()), 5) for k, v in terms.items()}
        history.append(rec)
        bar.set_postfix(kl=f"{rec['kl']:.3f}", ratio=f"{rec['ratio']:.3f}", widest=f"{rec['widest']:.3f}",
                        cover=f"{rec['cover']:.3f}", balance=f"{rec['balance']:.2f}")
        if state_path is not None and ((step + 1) % SAVE_EVERY == 0 or step + 1 == opts.steps):
            _save(state_path, {"fingerprint": fp, "step": step + 1, "trainable": tm.state_dict(),
                               "optim": optim.state_dict(), "history": history, "seconds": time.time() - t0})
    bar.close()
    tm.set_mode()
    tm.history = history   # every step's loss terms (kept out of the returned figures, which go into the file)
    last = history[-min(10, len(history)):] if history else []
    mean = {k: sum(r[k] for r in last) / len(last) for k in last[0]} if last else {}
    return {"steps": max(opts.steps, start), "resumed_at": start, "seconds": round(time.time() - t0, 1),
            "final": {k: round(v, 5) for k, v in mean.items()}, "lr": opts.lr, "seqlen": opts.seqlen,
            "budget": opts.budget, "budget_on": opts.budget_on, "seed": opts.seed}
