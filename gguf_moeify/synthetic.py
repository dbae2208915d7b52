"""SYNTHETIC models for speed measurements: GGUF files of real shapes (1B-class, 7B-class) with random weights.

Decode speed on a CPU depends on the shapes, the types and how many experts are read per token, not on the values,
so a laptop-sized benchmark does not need a real 7B checkpoint. The files are written directly with gguf-py in the
patched-runtime contract (``patches/README.md``) for the ``llama`` architecture:

- dense: ``token_embd`` (tied output), per layer ``attn_norm``, ``attn_{q,k,v,output}``, ``ffn_norm``,
  ``ffn_{gate,up,down}``, then ``output_norm``;
- MoE: the same with ``ffn_gate_inp`` (E, d) f32 (a linear router), ``ffn_gate_up_exps`` and ``ffn_down_exps`` (E
  experts of n_ff/E neurons; gate and up merged, as the converter writes them), ``expert_weights_unit`` true,
  ``expert_used_count`` K.

Quantized weights are random blocks written as bytes (random nibbles/int8 with a fixed scale that gives a weight
std of ~0.02), so a 7B-class file is written at disk speed; no float tensor of the full size is ever made.
The tokenizer is generated (a SentencePiece-style vocabulary of ``n_vocab`` tokens: control tokens, the 256 byte
tokens, then fillers), so no real model is needed; ``tokenizer_gguf`` copies a real GGUF's ``tokenizer.*`` keys
instead.
Every file says it is synthetic: ``general.name`` starts with "SYNTHETIC" and ``gguf_moeify.synthetic`` is true.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .errors import UserError
from .weight_bytes import ModelShape


# tied embedding; the output projection's 49152 rows are part of what each decoded token reads
SHAPES = {
    "1b": ModelShape("1b", 2048, 8192, 16, 16, 16, 128, 49152, True),
    "7b": ModelShape("7b", 4096, 11008, 32, 32, 32, 128, 49152, True),
    "tiny": ModelShape("tiny", 256, 1024, 2, 4, 4, 64, 49152, True),  # for tests
}

WEIGHT_STD = 0.02
SYNTHETIC_OUTTYPES = ("f16", "q8_0", "q4_0")


def _qt(outtype: str):
    import gguf
    T = gguf.GGMLQuantizationType
    return {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[outtype]


def _random_tensor(rng: np.random.Generator, shape: tuple[int, ...], outtype: str) -> np.ndarray:
    """Encoded data (what gguf-py writes) of a random tensor with weight std ~WEIGHT_STD."""
    import gguf
    if outtype == "f32":
        return (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD)
    if outtype == "f16":
        return (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16)
    qt = _qt(outtype)
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    if shape[-1] % block:
        raise UserError(f"synthetic {outtype}: last dimension {shape[-1]} is not a multiple of {block}")
    byte_shape = tuple(gguf.quants.quant_shape_to_byte_shape(shape, qt))
    data = rng.integers(0, 256, size=byte_shape, dtype=np.uint8)
    blocks = data.reshape(-1, nbytes)
    # q4_0: value = (nibble - 8) * d, nibble uniform in 0..15 -> std 4.61 d; q8_0: int8 uniform -> std 73.9 d
    d = WEIGHT_STD / (4.61 if outtype == "q4_0" else 73.9)
    blocks[:, :2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
    return data


def _write_generated_vocab(w, n_vocab: int) -> None:
    """A minimal SentencePiece ("llama") vocabulary llama.cpp loads: <unk> <s> </s>, the byte tokens, fillers."""
    import gguf
    T = gguf.TokenType
    specials = ["<unk>", "<s>", "</s>"]
    if n_vocab < len(specials) + 256:
        raise UserError(f"a synthetic vocabulary needs at least {len(specials) + 256} tokens, not {n_vocab}")
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    n_fill = n_vocab - len(tokens)
    tokens += [f"\u2581t{i}" for i in range(n_fill)]
    types += [T.NORMAL] * n_fill
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * (n_vocab - n_fill) + [-float(i) for i in range(n_fill)])
    w.add_token_types([int(t) for t in types])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)


@functools.lru_cache(maxsize=2)
def _tokenizer_keys(path: str) -> list:
    """The ``tokenizer.*`` keys of a GGUF (reading a 49k-token vocabulary takes seconds: cached)."""
    import gguf
    reader = gguf.GGUFReader(path)
    return [(k, f.contents(), list(f.types)) for k, f in reader.fields.items() if k.startswith("tokenizer.")]


def synthetic_recipe(shape: ModelShape, outtype: str, experts: int, top_k: int, seed: int,
                     router_dtype: str = "f32") -> dict:
    """What a synthetic file records of how it was made (``gguf_moeify.synthetic_recipe``)."""
    recipe = {"synthetic": True, "shape": asdict(shape), "outtype": outtype, "experts": experts, "top_k": top_k,
              "seed": seed, "weights": "random"}
    return recipe if router_dtype == "f32" else {**recipe, "router_dtype": router_dtype}   # older files: f32


def write_synthetic(out: str | os.PathLike, shape: ModelShape, outtype: str = "q4_0", experts: int = 0, top_k: int = 0,
                    seed: int = 0, tokenizer_gguf: str | os.PathLike | None = None, ctx: int = 4096,
                    router_dtype: str = "f32") -> Path:
    """Write a SYNTHETIC dense (``experts == 0``) or MoE (E ``experts``, ``top_k`` used, unit weights) GGUF.
    Embedding (tied output) is q8_0 in q4_0 files, as the converter does; the router f32 or ``router_dtype``.
    Written via a temporary file."""
    import gguf
    if outtype not in SYNTHETIC_OUTTYPES:
        raise UserError(f"synthetic models support {', '.join(SYNTHETIC_OUTTYPES)}, not {outtype!r}")
    from .plan import ROUTER_DTYPES
    if router_dtype not in ROUTER_DTYPES:
        raise UserError(f"synthetic routers are {' or '.join(ROUTER_DTYPES)}, not {router_dtype!r}")
    if experts:
        if shape.n_ff % experts:
            raise UserError(f"{experts} experts do not divide n_ff {shape.n_ff}")
        if not 1 <= top_k <= experts:
            raise UserError(f"top-k {top_k} must be between 1 and {experts}")
    out = Path(out)
    tok_keys = _tokenizer_keys(str(tokenizer_gguf)) if tokenizer_gguf else None
    n_vocab = len(next(v for k, v, _ in tok_keys if k == "tokenizer.ggml.tokens")) if tok_keys else shape.n_vocab
    d, hd = shape.n_embd, shape.head_dim
    kind = f"MoE E{experts} K{top_k} ({top_k / experts:.0%} active)" if experts else "dense"
    meta = synthetic_recipe(shape, outtype, experts, top_k, seed, router_dtype)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"SYNTHETIC {shape.name} {kind} random weights")
    w.add_bool("gguf_moeify.synthetic", True)
    w.add_string("gguf_moeify.synthetic_recipe", json.dumps(meta, sort_keys=True))
    w.add_context_length(ctx)
    w.add_embedding_length(d)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(top_k)
        w.add_expert_feed_forward_length(shape.n_ff // experts)
        w.add_uint32("llama.expert_router_type", 0)
        w.add_bool("llama.expert_weights_unit", True)
    from .gguf_writer import _copy_key, file_type
    w.add_file_type(file_type(outtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tok_keys:
        for k, v, types in tok_keys:
            _copy_key(w, k, v, types)
    else:
        _write_generated_vocab(w, n_vocab)

    emb_type = "q8_0" if outtype == "q4_0" else outtype
    entries: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (n_vocab, d), emb_type)]
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        entries += [(b + "attn_norm.weight", (d,), "f32"),
                    (b + "attn_q.weight", (shape.n_head * hd, d), outtype),
                    (b + "attn_k.weight", (shape.n_head_kv * hd, d), outtype),
                    (b + "attn_v.weight", (shape.n_head_kv * hd, d), outtype),
                    (b + "attn_output.weight", (d, shape.n_head * hd), outtype),
                    (b + "ffn_norm.weight", (d,), "f32")]
        if experts:
            f = shape.n_ff // experts
            entries += [(b + "ffn_gate_inp.weight", (experts, d), router_dtype),
                        (b + "ffn_gate_up_exps.weight", (experts, 2 * f, d), outtype),
                        (b + "ffn_down_exps.weight", (experts, d, f), outtype)]
        else:
            entries += [(b + "ffn_gate.weight", (shape.n_ff, d), outtype),
                        (b + "ffn_up.weight", (shape.n_ff, d), outtype),
                        (b + "ffn_down.weight", (d, shape.n_ff), outtype)]
    entries.append(("output_norm.weight", (d,), "f32"))

    def layout(shp, t):
        if t == "f32":
            return np.dtype(np.float32), shp
        if t == "f16":
            return np.dtype(np.float16), shp
        return np.dtype(np.uint8), tuple(gguf.quants.quant_shape_to_byte_shape(shp, _qt(t)))

    try:
        for name, shp, t in entries:
            dt, bshape = layout(shp, t)
            w.add_tensor_info(name, bshape, dt, int(np.prod(bshape)) * dt.itemsize, raw_dtype=_qt(t))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for name, shp, t in entries:
            if name.endswith("norm.weight"):
                data = np.ones(shp, dtype=np.float32)
            elif t == "f32" or name.endswith("ffn_gate_inp.weight"):
                data = rng.standard_normal(shp, dtype=np.float32) * np.float32(1 / np.sqrt(shp[-1]))
                data = data.astype(np.float16) if t == "f16" else data
            else:
                data = _random_tensor(rng, shp, t)
            w.write_tensor_data(data)
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def is_synthetic(path: str | os.PathLike) -> bool:
    import gguf
    f = gguf.GGUFReader(path).fields.get("gguf_moeify.synthetic")
    return bool(f.contents()) if f is not None else False


def measured_active_fraction(path: str | os.PathLike, used_slots: list[float]) -> float:
    """Share of the dense MLP's neurons a token computed, averaged over layers, from the expert slots it used in
    each layer (always-selected experts included) and the file's widths: (slots x F + Fs) / d_ff."""
    import gguf
    fields = gguf.GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    d_ff, width = fields[f"{arch}.feed_forward_length"].contents(), fields[f"{arch}.expert_feed_forward_length"]
    shared = fields.get(f"{arch}.expert_shared_feed_forward_length")
    fs = int(shared.contents()) if shared is not None else 0
    per = lambda v, i: v[i] if isinstance(v, list) else v  # noqa: E731
    widths, d_ffs = width.contents(), d_ff
    return sum((u * per(widths, i) + fs) / per(d_ffs, i) for i, u in enumerate(used_slots)) / len(used_slots)


def has_per_token_counts(path: str | os.PathLike) -> bool:
    """Whether the file leaves out chosen experts that score below their threshold (patch 0018's key)."""
    import gguf
    from .gguf_keys import EXPERT_COUNT_PER_TOKEN
    fields = gguf.GGUFReader(path).fields
    key = fields.get(EXPERT_COUNT_PER_TOKEN.format(arch=fields["general.architecture"].contents()))
    return bool(key is not None and key.contents())
