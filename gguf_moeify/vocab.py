"""Tokenizer and hyper-parameter keys from llama.cpp's own converter (``convert_hf_to_gguf.py --vocab-only``).

Pre-tokenizer detection, special tokens, chat templates and per-architecture hyper-parameters (rope scaling,
head sizes, ...) are solved there, at the pinned commit, and re-implementing them is a source of silent mismatches:
a wrong ``tokenizer.ggml.pre`` silently changes tokenization. So we run it in a subprocess (with the gguf-py
vendored beside it) and copy its keys. The result is cached per (commit, model files) hash.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import UserError
from .llama_cpp_source import LLAMA_CPP_COMMIT, cache_root, llama_cpp_source

_VOCAB_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                "chat_template.json", "generation_config.json")


def _key(model_dir: Path) -> str:
    h = hashlib.sha256(LLAMA_CPP_COMMIT.encode())
    for name in _VOCAB_FILES:
        f = model_dir / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:24]


# Weights and the weight maps of sharded checkpoints: the converter opens every part an index names when it builds
# the model (even for --vocab-only), so a view that kept ``model.safetensors.index.json`` without its shards failed
# with FileNotFoundError. Without weights and index the converter indexes no tensors at all, which --vocab-only
# never needs: every layout (single file, sharded) then reaches it in the same state.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def _vocab_dir_for_converter(model_dir: Path, tmp: Path) -> Path:
    """The converter only needs config + tokenizer files; a folder of links avoids it touching the weights."""
    view = tmp / "model"
    view.mkdir()
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
            os.symlink(f.resolve(), view / f.name)
    return view


def vocab_gguf(model_dir: str | os.PathLike) -> Path:
    """Path to a metadata-only GGUF that llama.cpp's converter wrote for ``model_dir`` (cached)."""
    model_dir = Path(model_dir)
    out = cache_root() / "vocab" / f"{_key(model_dir)}.gguf"
    if out.is_file():
        return out
    src = llama_cpp_source()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        view = _vocab_dir_for_converter(model_dir, tmp)
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        env.pop("NO_LOCAL_GGUF", None)
        proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(view), "--vocab-only",
                               "--outfile", str(tmp / "vocab.gguf")], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not (tmp / "vocab.gguf").is_file():
            tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-1:]
            raise UserError(f"llama.cpp's converter could not export the tokenizer of {model_dir}: "
                            f"{tail[0] if tail else 'no output'}")
        shutil.move(tmp / "vocab.gguf", out)
    return out


def converter_keys(model_dir: str | os.PathLike) -> tuple[str, list[tuple[str, object, list]]]:
    """(converter's architecture, [(key, value, gguf types)]) of the converter's metadata-only file."""
    import gguf
    reader = gguf.GGUFReader(vocab_gguf(model_dir))
    arch = reader.fields["general.architecture"].contents()
    keys = [(k, f.contents(), list(f.types)) for k, f in reader.fields.items() if not k.startswith("GGUF.")]
    return arch, keys
