"""Weights as a file of a given tensor type stores them: the writer's type rules (which tensors keep a higher
precision) and, for q8_0 / q4_0, the rows quantized in blocks of 32 and back with gguf-py, the writer's own encoder.
Calibration uses it to propagate through what llama.cpp will compute from the file."""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 32                               # values per q8_0 / q4_0 block, along a row
ROUND_TRIP_OUTTYPES = ("q8_0", "q4_0")   # quantized by gguf-py here; k-quants are made by llama-quantize


def head_outtype(outtype: str) -> str:
    """The type of the output projection (and of a tied token embedding): q4_0 files keep it at q8_0, as
    llama-quantize keeps the output at a higher precision."""
    return "q8_0" if outtype == "q4_0" else outtype


def row_outtype(outtype: str, row_length: int) -> str:
    """The type of a matrix with rows of ``row_length``: f16 where a quantized type's rows are not whole blocks."""
    return "f16" if outtype in ROUND_TRIP_OUTTYPES and row_length % BLOCK else outtype


def embedding_tied(ckpt, adapter) -> bool:
    """Whether the token embedding is also the output projection (no separate lm_head in the file)."""
    return not ckpt.has(adapter.hf_global("output")) or bool(ckpt.config.get("tie_word_embeddings", False))


def embedding_outtype(ckpt, adapter, outtype: str) -> str:
    """The token embedding's type in a file of ``outtype``: the output projection's when it is tied to it."""
    return head_outtype(outtype) if embedding_tied(ckpt, adapter) else outtype


def layer_matrices(adapter) -> list[str]:
    """The per-layer HF modules (attention) whose ``.weight`` the file stores in the file's type; the others are
    norms, kept in f32."""
    return [mod for mod, gg in adapter.layer_tensors.items() if not gg.endswith("norm")]


def as_stored(w: torch.Tensor, outtype: str) -> torch.Tensor:
    """``w`` (rows along its last axis) as a file of ``outtype`` holds it, in w's dtype: quantized and dequantized
    (q8_0, q4_0), rounded (f16, bf16), or unchanged (f32)."""
    kind = row_outtype(outtype, w.shape[-1])
    if kind in ("f16", "bf16"):
        return w.to(torch.float16 if kind == "f16" else torch.bfloat16).to(w.dtype)
    if kind == "f32":
        return w
    if kind not in ROUND_TRIP_OUTTYPES:
        raise ValueError(f"no round trip for {kind}")
    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    a = np.ascontiguousarray(w.detach().to(torch.float32).numpy().reshape(-1, w.shape[-1]))
    back = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
    return torch.from_numpy(np.ascontiguousarray(back.reshape(w.shape))).to(w.dtype)


def experts_as_stored_(moe, outtype: str, width: int, shared_as_experts: bool) -> None:
    """Round an MoEMLP's expert tensors in place as the file stores them: gate/up rows along d, each expert's down
    rows along its ``width`` neurons; the shared expert's down in blocks of one expert's width when it is written as
    always-selected experts (``shared_as_experts``), along all its neurons otherwise."""
    for name in ("gate_exps", "up_exps", "down_exps", "gate_shexp", "up_shexp"):
        if hasattr(moe, name):
            setattr(moe, name, as_stored(getattr(moe, name), outtype))
    if hasattr(moe, "down_shexp"):
        down = moe.down_shexp                                          # (d, shared neurons)
        if shared_as_experts:
            d, n = down.shape
            moe.down_shexp = as_stored(down.reshape(d, n // width, width), outtype).reshape(d, n)
        else:
            moe.down_shexp = as_stored(down, outtype)
