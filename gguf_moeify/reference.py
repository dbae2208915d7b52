"""The torch reference: the HF model with every MLP replaced by the MoEMLP its plan describes."""
from __future__ import annotations

import torch

from .adapters import Adapter
from .checkpoint import Checkpoint
from .moe_torch import MoEMLP
from .plan import MoEPlan


class _Activation(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def load_dense(ckpt: Checkpoint, tokenizer: bool = True):
    """(model, tokenizer or None) from the checkpoint, in the working dtype, eval mode. The MLPs apply the adapter's
    activation (``Adapter.act``), as the MoE MLPs and llama.cpp do: for Gemma, GELU through ggml's f16 table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from .adapters import adapter_for
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=ckpt.dtype)
    model.eval()
    adapter = adapter_for(ckpt.config)
    mlp_path = adapter.mlp_gate.rsplit(".", 1)[0]
    for i in range(ckpt.n_layers):
        mlp = model.get_submodule(adapter.layer_prefix.format(i=i) + mlp_path)
        if hasattr(mlp, "act_fn"):
            mlp.act_fn = _Activation(adapter.act)
    return model, (AutoTokenizer.from_pretrained(str(ckpt.path)) if tokenizer else None)


def moeify_(model, adapter: Adapter, plans: list[MoEPlan]) -> None:
    """Swap each layer's dense MLP for its MoE form, in place (the dense MLP is freed as we go)."""
    mlp_path, gate_attr = adapter.mlp_gate.rsplit(".", 1)
    up_attr = adapter.mlp_up.rsplit(".", 1)[1]
    down_attr = adapter.mlp_down.rsplit(".", 1)[1]
    for plan in plans:
        layer = model.get_submodule(adapter.layer_prefix.format(i=plan.layer).rstrip("."))
        dense = layer.get_submodule(mlp_path)
        with torch.no_grad():
            moe = MoEMLP(plan, getattr(dense, gate_attr).weight, getattr(dense, up_attr).weight,
                         getattr(dense, down_attr).weight, act=adapter.act)
        setattr(layer, mlp_path, moe)


def logits_fn(model):
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits
    return run
