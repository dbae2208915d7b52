"""Every GGUF key and tensor name the writers, the file contract and the reports use: llama.cpp's own from gguf-py
(``gguf.Keys``, ``gguf.MODEL_TENSOR``), and this project's, which only the patched llama.cpp reads
(patches/README.md documents each with the patch that reads it). ``{arch}`` is general.architecture."""
from __future__ import annotations

import gguf
import numpy as np

_LLM, _T = gguf.Keys.LLM, gguf.MODEL_TENSOR

# llama.cpp's keys (gguf-py)
ARCH = gguf.Keys.General.ARCHITECTURE
BLOCK_COUNT = _LLM.BLOCK_COUNT
EMBEDDING_LENGTH = _LLM.EMBEDDING_LENGTH
FEED_FORWARD_LENGTH = _LLM.FEED_FORWARD_LENGTH
EXPERT_COUNT = _LLM.EXPERT_COUNT
EXPERT_USED_COUNT = _LLM.EXPERT_USED_COUNT
EXPERT_FEED_FORWARD_LENGTH = _LLM.EXPERT_FEED_FORWARD_LENGTH
EXPERT_SHARED_FEED_FORWARD_LENGTH = _LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH
EXPERT_SHARED_COUNT = _LLM.EXPERT_SHARED_COUNT

# this project's keys
EXPERT_ROUTER_TYPE = "{arch}.expert_router_type"          # patch 0003: ROUTER_TYPE_IDS
EXPERT_WEIGHTS_UNIT = "{arch}.expert_weights_unit"        # patch 0001: chosen experts summed with weight 1
# patch 0018: a chosen expert whose biased selection score is not above 0 is left out: expert_used_count is then
# the most experts a token uses
EXPERT_COUNT_PER_TOKEN = "{arch}.expert_count_per_token"
ALWAYS_SELECTED_EXPERTS = "gguf_moeify.always_selected_experts"   # checked by the loader since patch 0016
PROVENANCE = "gguf_moeify.provenance"                     # JSON: tool, version, source model, method, options
PLAN = "gguf_moeify.plan"                                 # JSON: every layer's plan summary

# llama.cpp's tensor names (gguf-py), without the blk.{bid}. prefix and .weight suffix
def _base(t) -> str:
    return gguf.TENSOR_NAMES[t].split(".", 2)[-1] if gguf.TENSOR_NAMES[t].startswith("blk.") else gguf.TENSOR_NAMES[t]


GATE_UP_EXPS = _base(_T.FFN_GATE_UP_EXP)   # patched files: each expert's gate rows, then its up rows (patch 0012)
EXPERT_TENSORS = {"gate_exps": _base(_T.FFN_GATE_EXP), "up_exps": _base(_T.FFN_UP_EXP),
                  "down_exps": _base(_T.FFN_DOWN_EXP), "gate_shexp": _base(_T.FFN_GATE_SHEXP),
                  "up_shexp": _base(_T.FFN_UP_SHEXP), "down_shexp": _base(_T.FFN_DOWN_SHEXP)}
ROUTER_INPUT = _base(_T.FFN_GATE_INP)
SELECTION_BIAS = _base(_T.FFN_EXP_PROBS_B) + ".bias"      # patch 0013: always-selected experts; 0018: thresholds
# router tensors of each router kind (this project's names beside ffn_gate_inp: patch 0003)
ROUTER_TENSOR_NAMES = {
    "linear": {"weight": ROUTER_INPUT + ".weight"},
    "cmoe": {"gate": ROUTER_INPUT + ".weight", "up": "ffn_up_inp.weight"},
    "mlp": {"w1": ROUTER_INPUT + ".weight", "b1": ROUTER_INPUT + ".bias",
            "w2": "ffn_gate_inp_out.weight", "b2": "ffn_gate_inp_out.bias"},
}
# Router tensors with one row (or value) per expert, by router kind; the others (the MLP router's hidden layer) are not
PER_EXPERT_ROUTER_KEYS = {"weight", "gate", "up", "w2", "b2"}
# Selection bias of always-selected experts: added to their router scores before the top-k. Far above any real
# score, and exactly representable: score + bias == bias in f32, so they tie among themselves.
ALWAYS_SELECTED_BIAS = np.float32(2.0 ** 100)


def expert_tensor_name(layer: int, key: str) -> str:
    """GGUF name of one of a layer's expert tensors (key: an ``expert_tensors`` key such as "gate_exps")."""
    return f"blk.{layer}.{EXPERT_TENSORS[key]}.weight"
