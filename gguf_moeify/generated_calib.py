"""Calibration text the dense model writes itself (``--calib generated``): no data needed, and not one author's.

Each window starts with the model's BOS token (its EOS where it has none: the document separator of Qwen-style
vocabularies) and continues with tokens sampled from the model's own next-token distribution (temperature 1, no
top-k/top-p), with every special token masked so a window stays one document. Sampling uses a generator seeded with
``--seed``: the same model and options give the same tokens. The windows are cached under
``~/.cache/gguf_moeify/calib/`` (``GGUF_MOEIFY_CACHE`` moves it), keyed by the model's config, the names, sizes and
modification times of its weight files (weights edited in place are generated for anew), the generation dtype and
the options, so only the first conversion of a model pays for the generation. The tokens are the same for the same
options on one machine; another CPU or thread count may round the logits differently and so sample other tokens
(give a text file where bit-identical files across machines matter).

Cost: ``seqlen`` forward steps of the whole model over a batch of ``samples`` windows with a KV cache, i.e. about
``samples x seqlen`` tokens of decoding; the whole model is in memory for it, in its stored 16-bit type where it has
one (freed before calibration starts, so the conversion's peak is the larger of the two, never both).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import UserError

GENERATED = "generated"
FORMAT = 1   # bumped when the sampling recipe changes, so old caches are not reused


def cache_dir() -> Path:
    return Path(os.environ.get("GGUF_MOEIFY_CACHE", Path.home() / ".cache" / "gguf_moeify")).expanduser() / "calib"


def generation_dtype(ckpt) -> torch.dtype:
    """The working dtype, or the checkpoint's own 16-bit type where it is stored in one: the whole model is in
    memory for the generation, and a bf16 8B model is 16 GB where f32 would be 32."""
    from .checkpoint import DTYPES
    stored = ckpt.header_dtype(ckpt.names()[0])
    narrow = {"F16": "float16", "BF16": "bfloat16"}.get(stored)
    return DTYPES[narrow] if narrow and ckpt.dtype == torch.float32 else ckpt.dtype


def cache_key(ckpt, samples: int, seqlen: int, seed: int) -> str:
    # names, sizes and mtimes, not contents: hashing an 8B model's 16 GB would cost more than a small generation
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(ckpt.path).glob("*.safetensors"))
    key = {"format": FORMAT, "config": ckpt.config, "files": files, "dtype": str(generation_dtype(ckpt)),
           "samples": samples, "seqlen": seqlen, "seed": seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def start_token(tok) -> int:
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    raise UserError("--calib generated needs a BOS or EOS token to start from; give a text file with --calib")


@torch.no_grad()
def sample_windows(model, start: int, banned: list[int], samples: int, seqlen: int, seed: int,
                   progress: bool = True) -> torch.Tensor:
    """(samples, seqlen) int64: ``start`` then seqlen - 1 tokens sampled from ``model`` (HF causal LM)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((samples, seqlen), start, dtype=torch.long)
    out = model(input_ids=ids[:, :1], use_cache=True)
    cache = "cache" if "cache" in out else "past_key_values"   # recent transformers name the KV cache `cache`
    for t in tqdm(range(1, seqlen), desc=f"generating calibration text ({samples} windows)", unit="step",
                  disable=not progress):
        logits = out["logits"][:, -1].float()
        logits[:, banned] = float("-inf")
        ids[:, t] = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{cache: out[cache]})
    return ids


def generated_windows(ckpt, samples: int, seqlen: int, seed: int, progress: bool = True) -> torch.Tensor:
    """The model's own text as (samples, seqlen) token windows, from the cache when there."""
    path = cache_dir() / f"generated-{cache_key(ckpt, samples, seqlen, seed)}.pt"
    if path.is_file():
        return torch.load(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=generation_dtype(ckpt)).eval()
    tok = AutoTokenizer.from_pretrained(str(ckpt.path))
    vocab = model.get_output_embeddings().weight.shape[0]
    banned = sorted({int(i) for i in tok.all_special_ids if int(i) < vocab} |
                    set(range(len(tok), vocab)))   # special tokens and padding rows of the embedding
    ids = sample_windows(model, start_token(tok), banned, samples, seqlen, seed, progress)
    del model
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(ids, tmp)
    os.replace(tmp, path)   # a cache file is whole or absent
    return ids
