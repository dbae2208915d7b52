"""MoEPlan: the one object every method produces and everything downstream (torch reference, GGUF writer,
reports) consumes.

A plan says, for one decoder layer, which of the dense MLP's d_ff neurons form the always-on shared expert, which
form each routed expert (equal widths; index -1 is a zero padding neuron), an optional per-neuron output scale folded
into W_down, how the router scores experts, and how many experts each token uses. Chosen experts are summed with
weight exactly 1 ("unit" gate), as every seed method prescribes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

ROUTER_KINDS = ("linear", "cmoe", "mlp")
# llama.cpp key value for each router kind (patched runtime: {arch}.expert_router_type)
ROUTER_TYPE_IDS = {"linear": 0, "cmoe": 1, "mlp": 2}
# How a router's matrices are stored in the file. "f16" halves their bytes (with 256 experts of 32 neurons the f32
# router is ~7% of the bytes a token reads); biases stay f32. Values are rounded when set, so the torch reference
# and the writer see the same numbers.
ROUTER_DTYPES = ("f32", "f16")
# What a file is written for: the patched llama.cpp (unit gates, any router, per-layer budgets), or an architecture
# unmodified llama.cpp already runs (stock.py: deepseek with a shared expert, llama's Mixtral path, qwen3moe)
TARGETS = ("patched", "stock-llama", "stock-deepseek", "stock-qwen3moe")
SHARED_LAYOUTS = ("experts", "separate")
LLAMA_MAX_EXPERTS = 1024   # llama.cpp's limit on expert_count at the pinned commit (llama-hparams.h)


@dataclass(frozen=True)
class Router:
    """kind "linear": weight (E, d); "cmoe": gate (E, d), up (E, d), score |up·x * act(gate·x)|;
    "mlp": w1 (H, d), b1 (H,), w2 (E, H), b2 (E,), score w2·tanh(w1·x + b1) + b2.
    dtype: "f32", or "f16": every matrix holds f16 values (kept as float32 arrays), rounded on construction, so
    what the torch reference computes with is what the file stores. A router is never changed in place: a trained
    or refitted one is a new Router (``with_tensors``), a rounded one too (``with_dtype``)."""
    kind: str
    tensors: dict[str, np.ndarray]
    dtype: str = "f32"

    def __post_init__(self):
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {self.kind}")
        if self.dtype not in ROUTER_DTYPES:
            raise ValueError(f"unknown router dtype {self.dtype}")
        object.__setattr__(self, "tensors", {k: _stored(np.ascontiguousarray(v, dtype=np.float32), self.dtype)
                                             for k, v in self.tensors.items()})

    def with_dtype(self, dtype: str) -> "Router":
        return self if dtype == self.dtype else Router(self.kind, self.tensors, dtype)

    def with_tensors(self, tensors: dict[str, np.ndarray]) -> "Router":
        return Router(self.kind, tensors, self.dtype)


def _stored(arr: np.ndarray, dtype: str) -> np.ndarray:
    """The values a router tensor has in the file: matrices rounded to f16 for dtype "f16", vectors f32."""
    return arr.astype(np.float16).astype(np.float32) if dtype == "f16" and arr.ndim == 2 else arr


@dataclass(frozen=True)
class MoEPlan:
    layer: int
    d_ff: int                          # dense intermediate size
    experts: np.ndarray                # (E, width) int64 neuron indices, -1 = zero padding neuron
    top_k: int
    router: Router
    shared: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))   # (Fs,) indices
    neuron_scale: np.ndarray | None = None   # (d_ff,) multiplier on W_down columns, or None
    info: dict = field(default_factory=dict)  # method-specific figures for reports/metadata (JSON-able)
    # How chosen experts are weighted. "unit": weight 1 (the patched runtime). "softmax": stock llama.cpp's gating,
    # softmax of the router scores over all experts, the chosen ones renormalised to sum 1 when norm_weights, and
    # every routed expert's down projection multiplied by expert_scale (folded into the weights; see stock.py)
    gating: str = "unit"
    norm_weights: bool = False
    expert_scale: float = 1.0
    # Per-token expert counts (patched runtime, patch 0018): ``selection_bias`` (E,) is added to the router scores
    # before the top-k, and with ``per_token_count`` a token uses only the chosen experts whose biased score is
    # above 0, so top_k is the most experts a token may use; ``mean_top_k``: the mean the threshold (folded into
    # the bias) was set to on the calibration tokens, what the budget counts
    selection_bias: np.ndarray | None = None
    per_token_count: bool = False
    mean_top_k: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "experts", np.asarray(self.experts, dtype=np.int64))
        object.__setattr__(self, "shared", np.asarray(self.shared, dtype=np.int64))
        if self.experts.ndim != 2 or self.experts.shape[1] == 0:
            raise ValueError("experts must be a non-empty (E, width) index array")
        if self.gating not in ("unit", "softmax"):
            raise ValueError(f"unknown gating {self.gating}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..{self.n_experts}")
        if self.selection_bias is not None:
            object.__setattr__(self, "selection_bias", np.asarray(self.selection_bias, dtype=np.float32))
            if self.selection_bias.shape != (self.n_experts,):
                raise ValueError(f"selection_bias must have one value per expert ({self.n_experts})")
        if self.per_token_count and (self.gating != "unit" or self.selection_bias is None
                                     or self.router.kind != "linear"):
            raise ValueError("per-token expert counts need unit gating, a linear router and a selection bias")
        if self.mean_top_k is not None and not 0 < self.mean_top_k <= self.top_k:
            raise ValueError(f"mean_top_k={self.mean_top_k} must be in (0, top_k={self.top_k}]")
        used = np.concatenate([self.shared, self.experts[self.experts >= 0]])
        if used.size and (used.min() < 0 or used.max() >= self.d_ff):
            raise ValueError("neuron index out of range")

    @property
    def n_experts(self) -> int:
        return int(self.experts.shape[0])

    @property
    def expert_width(self) -> int:
        return int(self.experts.shape[1])

    @property
    def shared_width(self) -> int:
        return int(self.shared.size)

    @property
    def mean_experts(self) -> float:
        """Routed experts a token uses: top_k, or with per-token counts the mean they were calibrated to."""
        return self.mean_top_k if self.per_token_count and self.mean_top_k is not None else float(self.top_k)

    def active_fraction(self, experts: float | None = None) -> float:
        """Fraction of the dense d_ff neurons computed per token (padding counts, as the runtime computes it; with
        per-token counts, the calibrated mean), or with ``experts`` routed experts a token used (measured)."""
        used = self.mean_experts if experts is None else experts
        return (self.shared_width + used * self.expert_width) / self.d_ff

    def summary(self) -> dict:
        gating = {} if self.gating == "unit" else {"gating": self.gating, "norm_weights": self.norm_weights,
                                                  "expert_scale": self.expert_scale}
        counts = {} if not self.per_token_count else {"per_token_count": True, "mean_top_k": self.mean_top_k}
        return {"experts": self.n_experts, "expert_width": self.expert_width, "top_k": self.top_k, **counts,
                "shared_width": self.shared_width, "router": self.router.kind,
                "active_fraction": round(self.active_fraction(), 6), **gating, **self.info}


@dataclass(frozen=True)
class ModelPlan:
    """A whole file: every layer's plan and what the file is for. Built once (``convert.make_plans``), validated
    here, then read by the torch reference, the writers and the reports; never changed (``with_layers`` returns a
    new one, e.g. after fine-tuning). Iterating it, indexing it and ``len`` give the layer plans.

    target: ``TARGETS``; shared_layout (patched target): the shared expert as always-selected routed experts where
    the widths allow it ("experts", ``n_shared_as_experts``) or in its own tensors ("separate"); router_dtype: the
    type of every router matrix in the file; provenance: what made the file (written as gguf_moeify.provenance)."""
    layers: tuple[MoEPlan, ...]
    target: str = "patched"
    shared_layout: str = "experts"
    router_dtype: str = "f32"
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("a model plan needs at least one layer")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target}")
        if self.shared_layout not in SHARED_LAYOUTS:
            raise ValueError(f"unknown shared layout {self.shared_layout}")
        stock = self.stock
        first = self.layers[0]
        for i, p in enumerate(self.layers):
            if p.layer != i:
                raise ValueError(f"plan {i} is for layer {p.layer}")
            if p.router.dtype != self.router_dtype:
                raise ValueError(f"layer {i}: router dtype {p.router.dtype}, the file's is {self.router_dtype}")
            if p.per_token_count != first.per_token_count:
                raise ValueError(f"layer {i}: per-token expert counts in some layers only")
            if p.per_token_count and stock:
                raise ValueError(f"layer {i}: per-token expert counts need the patched runtime, not {self.target}")
            if (p.gating == "softmax") != stock:
                raise ValueError(f"layer {i}: {p.gating} gating in a file for {self.target}")
            # llama.cpp reads one expert count, shared width and router kind per file; the expert width may differ
            # per layer in the patched runtime (expert_feed_forward_length as a per-layer array, patch 0002) only
            if (p.n_experts, p.shared_width, p.router.kind) != (first.n_experts, first.shared_width,
                                                                 first.router.kind) \
                    or (stock and p.expert_width != first.expert_width):
                raise ValueError(f"layer {p.layer} has a different expert layout than layer 0")

    @classmethod
    def build(cls, layers, target: str = "patched", shared_layout: str = "experts", router_dtype: str = "f32",
              provenance: dict | None = None) -> "ModelPlan":
        """From the method's layer plans: routers rounded to ``router_dtype`` (calibration ran with f32 ones)."""
        layers = [replace(p, router=p.router.with_dtype(router_dtype)) for p in layers]
        return cls(tuple(layers), target, shared_layout, router_dtype, dict(provenance or {}))

    def with_layers(self, layers) -> "ModelPlan":
        return replace(self, layers=tuple(layers))

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    @property
    def stock(self) -> bool:
        return self.target != "patched"

    def n_shared_as_experts(self) -> int:
        """How many routed-expert slots the shared expert takes in a patched-runtime file, or 0 to keep it apart.

        The shared expert is written as n always-selected experts (the first n of ``ffn_gate_up_exps`` /
        ``ffn_down_exps``, selection bias ``exp_probs_b``), so a layer runs one expert FFN instead of two (patch
        0013): with shared_layout "experts", when every layer's shared width is n times its expert width, with the
        same n in every layer (the expert count is one number per file)."""
        if self.stock or self.shared_layout != "experts" or not all(p.shared_width for p in self.layers):
            return 0
        counts = {p.shared_width // p.expert_width if p.shared_width % p.expert_width == 0 else 0
                  for p in self.layers}
        n = counts.pop() if len(counts) == 1 else 0
        return n if self.layers[0].n_experts + n <= LLAMA_MAX_EXPERTS else 0


def _take_rows(w: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """Rows of ``w`` at ``idx``; index -1 gives a zero row."""
    idx_t = torch.as_tensor(idx, dtype=torch.long)
    out = w[idx_t.clamp(min=0)]
    return out * (idx_t >= 0).to(w.dtype).unsqueeze(-1)


def expert_tensors(plan: MoEPlan, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense MLP weights (gate/up: (d_ff, d), down: (d, d_ff)) -> the plan's expert weights in llama.cpp's layout:
    gate_exps/up_exps (E, F, d), down_exps (E, d, F), and gate_shexp/up_shexp (Fs, d), down_shexp (d, Fs).
    The plan's ``expert_scale`` is folded into the routed experts' down projections."""
    down_t = down.t()  # (d_ff, d): one row per neuron
    if plan.neuron_scale is not None:
        down_t = down_t * torch.as_tensor(plan.neuron_scale, dtype=down.dtype).unsqueeze(-1)
    down_exps = _take_rows(down_t, plan.experts).transpose(1, 2)
    out = {
        "gate_exps": _take_rows(gate, plan.experts),
        "up_exps": _take_rows(up, plan.experts),
        "down_exps": down_exps if plan.expert_scale == 1.0 else down_exps * plan.expert_scale,
    }
    if plan.shared_width:
        out["gate_shexp"] = gate[torch.as_tensor(plan.shared)]
        out["up_shexp"] = up[torch.as_tensor(plan.shared)]
        out["down_shexp"] = down_t[torch.as_tensor(plan.shared)].t()
    return {k: v.contiguous() for k, v in out.items()}
