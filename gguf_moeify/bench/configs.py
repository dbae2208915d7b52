"""The bench configuration language: ``METHOD:ACTIVE:OUTTYPE`` (comma-separated) to ``Config`` objects.

ACTIVE is a fraction (``0.25``), a percentage (``25%``) or an explicit ``SxAyEz``; a fraction is sized for the
model's d_ff as ``convert --active`` does (``sizing.expert_layout``). The rules per method are in the ``bench``
command's help (``gguf_moeify/bench/__init__.py``)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError
from ..gguf_writer import FLOAT_OUTTYPES, NUMPY_QUANT_OUTTYPES
from ..synthetic import SYNTHETIC_OUTTYPES as SYN_OUTTYPES   # what synthetic files are written in

REAL_METHODS = ("mlpmoe", "cmoe", "moefication", "finegrained", "tomoe")
# what the writer writes, and the three k-quants bench offers (of gguf_writer.KQUANT_OUTTYPES)
BENCH_OUTTYPES = FLOAT_OUTTYPES + NUMPY_QUANT_OUTTYPES + ("q4_k_m", "q5_k_m", "q6_k")


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
    from ..sizing import expert_layout
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
