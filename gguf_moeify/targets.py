"""What each target runtime needs in a file beyond the tensors every file has: the architecture name, the MoE
hyper-parameter keys, and the expert tensor layout. One small class per target behind one interface (``Target``);
``target_for`` picks it from the ``ModelPlan``. Key names come from gguf_keys (gguf-py's and this project's).

| target | general.architecture | expert FFN tensors | MoE keys |
|---|---|---|---|
| patched | the source's (llama, qwen2, qwen3) | ffn_gate_up_exps + ffn_down_exps | expert widths (per-layer array if they differ), shared width, router type, unit weights, always-selected experts |
| stock-llama | llama (Mixtral path) | ffn_gate_exps / ffn_up_exps / ffn_down_exps | feed_forward_length = the expert width |
| stock-deepseek | deepseek | the same + shexp tensors | expert width, shared count in experts, no dense leading block |
| stock-qwen3moe | qwen3moe | the same | expert width |
"""
from __future__ import annotations

from .gguf_keys import (ALWAYS_SELECTED_EXPERTS, EXPERT_COUNT_PER_TOKEN, EXPERT_FEED_FORWARD_LENGTH,
                        EXPERT_ROUTER_TYPE, EXPERT_SHARED_COUNT, EXPERT_USED_COUNT, EXPERT_WEIGHTS_UNIT,
                        FEED_FORWARD_LENGTH)
from .plan import ROUTER_TYPE_IDS, ModelPlan


class Target:
    """One runtime's view of a file. ``arch``: general.architecture; ``merge_gate_up``: gate and up rows in one
    tensor per layer; ``skip_keys``: keys of llama.cpp's converter this target writes itself (or must not have)."""
    merge_gate_up = False

    def __init__(self, plan: ModelPlan, source_arch: str):
        self.plan = plan
        self.arch = self.arch_name(source_arch)
        self.n_shared_exps = plan.n_shared_as_experts()

    def arch_name(self, source_arch: str) -> str:
        return self.plan.target.removeprefix("stock-")

    def skip_keys(self) -> set[str]:
        return set()

    def write_keys(self, writer) -> None:
        """The MoE keys: expert count and used count (as a per-layer array when budgets differ: patch 0005), then
        the target's own."""
        layers, n_sh = self.plan.layers, self.n_shared_exps
        writer.add_expert_count(layers[0].n_experts + n_sh)
        used = [p.top_k + n_sh for p in layers]
        if len(set(used)) == 1:
            writer.add_expert_used_count(used[0])
        else:
            writer.add_array(EXPERT_USED_COUNT.format(arch=self.arch), used)
        self.write_target_keys(writer)

    def write_target_keys(self, writer) -> None:
        writer.add_expert_feed_forward_length(self.plan.layers[0].expert_width)


class Patched(Target):
    merge_gate_up = True

    def arch_name(self, source_arch: str) -> str:
        return source_arch

    def write_target_keys(self, writer) -> None:
        layers, n_sh, arch = self.plan.layers, self.n_shared_exps, self.arch
        widths = [p.expert_width for p in layers]
        if len(set(widths)) == 1:
            writer.add_expert_feed_forward_length(widths[0])
        else:  # experts of different widths per layer (ToMoE): read as a per-layer array (patch 0002)
            writer.add_array(EXPERT_FEED_FORWARD_LENGTH.format(arch=arch), widths)
        shared_width = 0 if n_sh else layers[0].shared_width
        writer.add_expert_shared_feed_forward_length(shared_width)
        writer.add_uint32(EXPERT_SHARED_COUNT.format(arch=arch), 1 if shared_width else 0)
        if n_sh:  # informational: llama.cpp knows them only by their selection bias
            writer.add_uint32(ALWAYS_SELECTED_EXPERTS, n_sh)
        writer.add_uint32(EXPERT_ROUTER_TYPE.format(arch=arch), ROUTER_TYPE_IDS[layers[0].router.kind])
        writer.add_bool(EXPERT_WEIGHTS_UNIT.format(arch=arch), True)
        if layers[0].per_token_count:   # every layer or none (ModelPlan checks)
            writer.add_bool(EXPERT_COUNT_PER_TOKEN.format(arch=arch), True)


class StockLlama(Target):
    """Mixtral's convention: feed_forward_length is the expert width."""

    def skip_keys(self) -> set[str]:
        return {FEED_FORWARD_LENGTH.format(arch=self.arch)}

    def write_target_keys(self, writer) -> None:
        writer.add_feed_forward_length(self.plan.layers[0].expert_width)


class StockDeepseek(Target):
    """The shared expert is n_expert_shared experts wide; every layer is an MoE layer."""

    def write_target_keys(self, writer) -> None:
        p0 = self.plan.layers[0]
        writer.add_expert_feed_forward_length(p0.expert_width)
        if p0.shared_width % p0.expert_width:
            raise ValueError("deepseek needs a shared expert width that is a multiple of the expert width")
        writer.add_expert_shared_count(p0.shared_width // p0.expert_width)
        writer.add_leading_dense_block_count(0)


class StockQwen3Moe(Target):
    pass


TARGET_CLASSES = {"patched": Patched, "stock-llama": StockLlama, "stock-deepseek": StockDeepseek,
                  "stock-qwen3moe": StockQwen3Moe}


def target_for(plan: ModelPlan, source_arch: str) -> Target:
    return TARGET_CLASSES[plan.target](plan, source_arch)
