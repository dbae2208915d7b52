"""The options every method takes, and the checks they share."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError


@dataclass
class MethodOptions:
    experts: int | None = 8     # E: total experts, shared ones included (CMoE's z); None = the method's default
    shared: int | None = 0      # S: experts merged into the always-on shared expert (CMoE's x); None = default
    top_k: int | None = None    # routed experts per token (CMoE's y); None = the method's default
    variant: str = "slice"      # MLPMoE: slice | fractal-fade | compensated-pruning
    keep: float | None = None   # MLPMoE variants: fraction of MLP neurons kept
    calib: str | None = None    # data-driven methods: text file, folder of .txt, or "wikitext2"
    calib_samples: int = 8      # calibration windows
    calib_seqlen: int = 2048    # tokens per window (capped at the model's context)
    seed: int = 0               # calibration windows, k-means initialisation, router training
    layer_budget: str = "uniform"   # "sensitivity": per-layer top-k from measured error curves (same average)
    runtime: str = "patched"        # "stock": plans expressed for unmodified llama.cpp (stock.py)
    shared_layout: str = "experts"  # patched runtime: shared expert as always-selected experts, or "separate"
    router_dtype: str = "f32"       # "f16": router matrices stored (and computed) in f16 (plan.ROUTER_DTYPES)
    active: float | None = None     # fraction of MLP neurons per token: E/S/K (experts/shared/top_k left None) from
                                    # d_ff and this fraction (sizing.expert_layout); None: the methods' own defaults
    extra: dict = field(default_factory=dict)   # method-specific: cmoe "ka"; moefication "split", "router"

    @property
    def routed(self) -> int:
        return self.experts - self.shared


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
