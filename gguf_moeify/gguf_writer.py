"""Write a converted model as GGUF in llama.cpp's MoE layout, streaming one decoder layer at a time.

Tensor infos are computed from the plans and the checkpoint's shapes first (gguf-py needs them before any data),
then each layer's weights are read, split into experts, quantized and written, and freed. The file is written
under a temporary name in the target folder and renamed at the end: a failed run leaves no output file.

Types: 1-D tensors (norms, biases) and router tensors stay f32 (llama.cpp never quantizes ffn_gate_inp), the
router's matrices f16 with --router-dtype f16; other weights take --outtype. q8_0/q4_0 need a last dimension that
is a multiple of 32: a tensor that is not falls back to f16 (reported). In q4_0 files the token embedding and output
projection are kept at q8_0, as llama-quantize keeps the output at a higher precision.

Layout for the patched runtime: each expert's gate and up rows in one ``ffn_gate_up_exps`` tensor, and a shared
expert whose width is a multiple of the expert width written as always-selected routed experts (see
``ModelPlan.n_shared_as_experts``); ``--runtime stock`` files keep the tensors unmodified llama.cpp reads. What
differs per target (architecture, MoE keys, gate/up layout) is in targets.py; every name is in gguf_keys.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .adapters import Adapter
from .checkpoint import Checkpoint
from .errors import UserError
from .gguf_keys import (ALWAYS_SELECTED_BIAS, EXPERT_TENSORS, GATE_UP_EXPS, PER_EXPERT_ROUTER_KEYS, PLAN, PROVENANCE,
                        ROUTER_TENSOR_NAMES, SELECTION_BIAS, expert_tensor_name)
from .plan import ModelPlan, MoEPlan, expert_tensors
from .rope_layout import llama3_rope_factors, permute_qk
from .stored_weights import ROUND_TRIP_OUTTYPES, embedding_tied, head_outtype, row_outtype
from .targets import Target, target_for
from .vocab import converter_keys

FLOAT_OUTTYPES = ("f32", "f16", "bf16")
NUMPY_QUANT_OUTTYPES = ROUND_TRIP_OUTTYPES
KQUANT_OUTTYPES = ("q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k", "q4_k_s", "q5_k_s")
OUTTYPES = FLOAT_OUTTYPES + NUMPY_QUANT_OUTTYPES + KQUANT_OUTTYPES

def _qtype(outtype: str):
    import gguf
    T = gguf.GGMLQuantizationType
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[outtype]


def file_type(outtype: str) -> int:
    import gguf
    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[outtype].value


@dataclass
class Entry:
    name: str
    shape: tuple[int, ...]     # numpy shape of the float tensor
    qtype: object              # gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]


class TensorPlanner:
    """Decides every tensor of the output file (name, shape, type) and how to produce its data lazily."""

    def __init__(self, ckpt: Checkpoint, adapter: Adapter, plans: ModelPlan, outtype: str,
                 overrides: dict[str, torch.Tensor] | None = None, n_shared_exps: int = 0,
                 merge_gate_up: bool = True, n_vocab: int | None = None):
        import gguf
        self.ckpt, self.adapter, self.plans, self.outtype = ckpt, adapter, plans.layers, outtype
        self.overrides = overrides or {}
        self.T = gguf.GGMLQuantizationType
        self.base = _qtype(outtype)
        self.fallbacks: list[str] = []
        self.tied = embedding_tied(ckpt, adapter)
        self.merge_gate_up = merge_gate_up   # patched runtime; --runtime stock files keep the two tensors
        self.n_shared_exps = n_shared_exps   # the shared expert as that many always-selected experts (0: separate)
        self._memo: tuple[int, dict] | None = None
        self.n_vocab = n_vocab   # rows of token_embd to keep (Adapter.trim_vocab: the tokenizer's token count)
        cfg = ckpt.config
        self.n_head = int(cfg["num_attention_heads"])
        self.n_head_kv = int(cfg.get("num_key_value_heads") or self.n_head)

    def _type_for(self, name: str, shape: tuple[int, ...], base=None) -> object:
        base = base or self.base
        if len(shape) == 1:
            return self.T.F32
        if row_outtype(base.name.lower(), shape[-1]) != base.name.lower():
            self.fallbacks.append(name)
            return self.T.F16
        return base

    def _hf(self, name: str) -> Callable[[], np.ndarray]:
        if name in self.overrides:
            return lambda: self.overrides[name].detach().to(torch.float32).numpy()
        return lambda: self.ckpt.get(name, torch.float32).numpy()

    def _norm(self, name: str) -> Callable[[], np.ndarray]:
        """A norm weight as the converter stores it: plus Adapter.norm_shift, added in f16 for an f16 tensor and
        in f32 otherwise (llama.cpp's converter upcasts every other dtype to f32 first)."""
        shift = self.adapter.norm_shift
        if not shift:
            return self._hf(name)
        if name in self.overrides:
            return lambda: (self.overrides[name].detach().to(torch.float32) + shift).numpy()
        dtype = torch.float16 if self.ckpt.header_dtype(name) == "F16" else torch.float32
        return lambda: (self.ckpt.get(name, dtype) + shift).to(torch.float32).numpy()

    def _layer_experts(self, i: int) -> dict:
        if self._memo is None or self._memo[0] != i:
            self._memo = None  # free the previous layer first
            own = {key: self.overrides[expert_tensor_name(i, key)].detach().to(torch.float32).numpy()
                   for key in EXPERT_TENSORS if expert_tensor_name(i, key) in self.overrides}
            if len(own) == (6 if self.plans[i].shared_width else 3):
                self._memo = (i, own)
            else:
                gate, up, down = (self.ckpt.get(n, torch.float32) for n in self.adapter.mlp_names(i))
                experts = expert_tensors(self.plans[i], gate, up, down)
                self._memo = (i, {**{k: v.numpy() for k, v in experts.items()}, **own})
        return self._memo[1]

    def _shared_split(self, i: int, key: str) -> np.ndarray:
        """The shared expert's gate/up (Fs, d) -> (n, F, d), or down (d, Fs) -> (n, d, F): n experts of width F."""
        w, n, f = self._layer_experts(i)[key], self.n_shared_exps, self.plans[i].expert_width
        return w.reshape(n, f, -1) if key != "down_shexp" else w.reshape(w.shape[0], n, f).transpose(1, 0, 2)

    def _gate_up(self, i: int) -> np.ndarray:
        experts = self._layer_experts(i)
        gate_up = np.concatenate([experts["gate_exps"], experts["up_exps"]], axis=1)   # (E, 2F, d)
        if self.n_shared_exps:
            shared = np.concatenate([self._shared_split(i, "gate_shexp"), self._shared_split(i, "up_shexp")], axis=1)
            gate_up = np.concatenate([shared, gate_up])
        return gate_up

    def _down(self, i: int) -> np.ndarray:
        down = self._layer_experts(i)["down_exps"]
        return np.concatenate([self._shared_split(i, "down_shexp"), down]) if self.n_shared_exps else down

    def _router(self, plan: MoEPlan, key: str) -> np.ndarray:
        arr = plan.router.tensors[key]
        if self.n_shared_exps and key in PER_EXPERT_ROUTER_KEYS:   # zero scores for the always-selected experts
            arr = np.concatenate([np.zeros((self.n_shared_exps,) + arr.shape[1:], np.float32), arr])
        return arr

    def entries(self) -> list[Entry]:
        ck, ad = self.ckpt, self.adapter
        out: list[Entry] = []
        emb_name, norm_name, head_name = (ad.hf_global(n) for n in ("token_embd", "output_norm", "output"))
        emb, produce_emb = ck.shape(emb_name), self._hf(emb_name)
        if ad.trim_vocab and self.n_vocab and self.n_vocab < emb[0]:
            emb, produce_emb = (self.n_vocab,) + emb[1:], (lambda p, n: lambda: p()[:n])(produce_emb, self.n_vocab)
        head_type = _qtype(head_outtype(self.outtype))
        out.append(Entry("token_embd.weight", emb, self._type_for("token_embd.weight", emb,
                         head_type if self.tied else None), produce_emb))
        rope_freqs = llama3_rope_factors(ck.config)
        if rope_freqs is not None:   # Llama 3.x rope scaling, as llama.cpp's converter writes it
            out.append(Entry("rope_freqs.weight", rope_freqs.shape, self.T.F32, lambda: rope_freqs))
        for i, plan in enumerate(self.plans):
            prefix = ad.layer_prefix.format(i=i)
            for hf_mod, gg in ad.layer_tensors.items():
                for suffix in ("weight", "bias"):
                    hf_name = f"{prefix}{hf_mod}.{suffix}"
                    if not ck.has(hf_name):
                        if suffix == "weight":
                            raise UserError(f"{ck.path}: tensor {hf_name} missing from the checkpoint")
                        continue
                    produce = self._norm(hf_name) if gg.endswith("norm") else self._hf(hf_name)
                    if ad.permute_qk and gg in ("attn_q", "attn_k"):
                        heads = self.n_head if gg == "attn_q" else self.n_head_kv
                        produce = (lambda p, h: lambda: permute_qk(p(), h))(produce, heads)
                    shape = ck.shape(hf_name)
                    name = f"blk.{i}.{gg}.{suffix}"
                    out.append(Entry(name, shape, self._type_for(name, shape), produce))
            for key, gg in ROUTER_TENSOR_NAMES[plan.router.kind].items():
                arr = self._router(plan, key)
                qtype = self.T.F16 if plan.router.dtype == "f16" and arr.ndim == 2 else self.T.F32
                out.append(Entry(f"blk.{i}.{gg}", arr.shape, qtype, (lambda a: lambda: a)(arr)))
            d, n_exp, n_sh = ck.n_embd, plan.n_experts + self.n_shared_exps, self.n_shared_exps
            if n_sh or plan.selection_bias is not None:   # always-selected experts first, then the routed ones'
                routed = plan.selection_bias if plan.selection_bias is not None else np.zeros(plan.n_experts)
                bias = np.concatenate([np.full(n_sh, ALWAYS_SELECTED_BIAS), routed]).astype(np.float32)
                out.append(Entry(f"blk.{i}.{SELECTION_BIAS}", bias.shape, self.T.F32, (lambda a: lambda: a)(bias)))
            if self.merge_gate_up:
                name, shape = f"blk.{i}.{GATE_UP_EXPS}.weight", (n_exp, 2 * plan.expert_width, d)
                out.append(Entry(name, shape, self._type_for(name, shape), (lambda i: lambda: self._gate_up(i))(i)))
                shapes = {}
            else:
                shapes = {"gate_exps": (n_exp, plan.expert_width, d), "up_exps": (n_exp, plan.expert_width, d)}
            name, shape = expert_tensor_name(i, "down_exps"), (n_exp, d, plan.expert_width)
            out.append(Entry(name, shape, self._type_for(name, shape), (lambda i: lambda: self._down(i))(i)))
            if plan.shared_width and not n_sh:
                shapes.update(gate_shexp=(plan.shared_width, d), up_shexp=(plan.shared_width, d),
                              down_shexp=(d, plan.shared_width))
            for key, shape in shapes.items():
                name = expert_tensor_name(i, key)
                out.append(Entry(name, shape, self._type_for(name, shape),
                                 (lambda i, key: lambda: self._layer_experts(i)[key])(i, key)))
        norm = ck.shape(norm_name)
        out.append(Entry("output_norm.weight", norm, self.T.F32, self._norm(norm_name)))
        if not self.tied:
            shape = ck.shape(head_name)
            out.append(Entry("output.weight", shape, self._type_for("output.weight", shape, head_type),
                             self._hf(head_name)))
        return out


def _encode(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return arr
    if qtype == gguf.GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def _encoded_layout(shape: tuple[int, ...], qtype) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of what :func:`_encode` returns, known before any data is read."""
    import gguf
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.dtype(np.float32), tuple(shape)
    if qtype == T.F16:
        return np.dtype(np.float16), tuple(shape)
    return np.dtype(np.uint8), tuple(gguf.quants.quant_shape_to_byte_shape(shape, qtype))


def _copy_key(writer, key: str, value, types: list) -> None:
    import gguf
    vt = gguf.GGUFValueType
    if types[0] == vt.ARRAY:
        writer.add_key_value(key, value, vt.ARRAY, sub_type=types[1] if len(types) > 1 else None)
    else:
        writer.add_key_value(key, value, types[0])


def write_gguf(out_tmp: Path, ckpt: Checkpoint, adapter: Adapter, plan: ModelPlan, outtype: str,
               progress: bool = True, overrides: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Write the GGUF of ``plan`` to ``out_tmp``; returns the names of tensors that fell back to f16.
    ``overrides`` replaces tensors by name: checkpoint tensors by their HF name (HF layout), expert tensors by
    their GGUF name (``expert_tensor_name``, expert layout), e.g. the merged weights of a fine-tuned model."""
    import gguf
    target = target_for(plan, adapter.gguf_arch)
    writer = gguf.GGUFWriter(str(out_tmp), target.arch)
    conv_arch, conv_keys = converter_keys(ckpt.path)
    _write_keys(writer, conv_arch, conv_keys, target)
    writer.add_file_type(file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(PROVENANCE, json.dumps(plan.provenance, sort_keys=True))
    writer.add_string(PLAN, json.dumps([p.summary() for p in plan], sort_keys=True))

    tokens = next((v for k, v, _ in conv_keys if k == "tokenizer.ggml.tokens"), None)
    planner = TensorPlanner(ckpt, adapter, plan, outtype, overrides, target.n_shared_exps,
                            merge_gate_up=target.merge_gate_up, n_vocab=len(tokens) if tokens else None)
    entries = planner.entries()
    for e in entries:
        dtype, shape = _encoded_layout(e.shape, e.qtype)
        writer.add_tensor_info(e.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=e.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    layer_of = lambda name: int(name.split(".")[1]) if name.startswith("blk.") else None  # noqa: E731
    bar = tqdm(total=len(plan), desc=f"writing {outtype}", unit="layer", disable=not progress)
    last = None
    for e in entries:
        data = _encode(e.produce(), e.qtype)
        if data.shape != _encoded_layout(e.shape, e.qtype)[1]:
            raise RuntimeError(f"{e.name}: produced shape {data.shape} does not match {e.shape}")
        writer.write_tensor_data(data)
        layer = layer_of(e.name)
        if layer is not None and layer != last:
            bar.update(1)
            last = layer
    bar.close()
    writer.close()
    return planner.fallbacks


def _write_keys(writer, conv_arch: str, conv_keys: list, target: Target) -> None:
    """llama.cpp's converter's hyper-parameter and tokenizer keys (renamed to the target's architecture), then the
    target's MoE keys."""
    skip = {"general.architecture", "general.file_type", "general.quantization_version"} | target.skip_keys()
    for key, value, types in conv_keys:
        if key.startswith(conv_arch + "."):
            key = target.arch + key[len(conv_arch):]
        elif not key.startswith(("general.", "tokenizer.")):
            continue
        if key in skip:
            continue
        _copy_key(writer, key, value, types)
    target.write_keys(writer)
