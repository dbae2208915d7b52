"""Lazy access to an HF checkpoint: config.json plus safetensors (single file or sharded index), one tensor at a time.

Nothing is read until asked for, so the converter's memory is one decoder layer, not the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_dir(model: str) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (online only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise UserError(f"{model} is a file; MODEL must be a folder with config.json and *.safetensors or a hub id")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise UserError(f"model not found: {model} is neither a local folder nor a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja", "*.tiktoken"]))
    except Exception as exc:  # offline, unknown repo, gated repo ... all end the same way for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model not found: {model} is not a local folder and the hub download failed ({first})")


FLOAT_HEADER_DTYPES = ("F32", "F16", "BF16")
# config keys every supported architecture needs, as positive integers
REQUIRED_CONFIG_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "vocab_size")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({_first_line(exc)})")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})")
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _check_config(path: Path, config: dict) -> None:
    for key in REQUIRED_CONFIG_INTS:
        v = config.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            what = "missing" if v is None else f"{v!r}, not a positive integer"
            raise UserError(f"{path}: {key} is {what}")
    kv = config.get("num_key_value_heads")
    if kv is not None and (not isinstance(kv, int) or kv < 1 or config["num_attention_heads"] % kv):
        raise UserError(f"{path}: num_key_value_heads {kv!r} must divide num_attention_heads "
                        f"{config['num_attention_heads']}")


def _open_safetensors(f: Path):
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(f, framework="pt")
    except (SafetensorError, OSError, RuntimeError) as exc:   # cut short, not safetensors, unreadable
        raise UserError(f"{f}: not a readable safetensors file ({_first_line(exc)})")


class Checkpoint:
    def __init__(self, model: str | os.PathLike, dtype: str = "float32"):
        self.path = resolve_model_dir(str(model))
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise UserError(f"{self.path}: no config.json (not a Hugging Face model folder)")
        self.config: dict = _read_json_object(cfg)
        # Some multimodal/wrapper configs nest the language model's config.
        if isinstance(self.config.get("text_config"), dict) and "hidden_size" not in self.config:
            self.config = {**self.config["text_config"], "architectures": self.config.get("architectures")}
        _check_config(cfg, self.config)
        if dtype not in DTYPES:
            raise UserError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]
        self._where = self._index()
        self._handles: dict[Path, object] = {}

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index}: no \"weight_map\" object naming the shard of each tensor")
            where = {name: self.path / str(fname) for name, fname in weight_map.items()}
            for shard in sorted(set(where.values())):
                if not shard.is_file():
                    raise UserError(f"{index} names the shard {shard.name}, which is not in {self.path}")
            return where
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path}: no *.safetensors weights (convert .bin checkpoints with transformers' "
                            f"save_pretrained(safe_serialization=True) first)")
        where = {}
        for f in files:
            with _open_safetensors(f) as h:
                for name in h.keys():
                    where[name] = f
        return where

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def _handle(self, name: str):
        f = self._where.get(name)
        if f is None:
            raise UserError(f"{self.path}: tensor {name} missing from the checkpoint")
        handle = self._handles.get(f)
        if handle is None:
            handle = self._handles[f] = _open_safetensors(f)
        return handle

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from disk now, in the working dtype (or ``dtype``). Read through a handle of its own,
        closed after: the shard's pages it touched leave this process's resident memory with it (the cached
        handles only ever read headers), so a conversion's RSS stays one layer, not the checkpoint."""
        self._handle(name)   # a missing tensor: one clear error
        try:
            with _open_safetensors(self._where[name]) as h:
                t = h.get_tensor(name)
            return t.to(dtype or self.dtype)
        except (OSError, RuntimeError) as exc:   # a shard cut short or changed since it was opened
            raise UserError(f"{self._where[name]}: cannot read tensor {name} ({_first_line(exc)})")

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the safetensors header only."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def header_dtype(self, name: str) -> str:
        """A tensor's safetensors dtype ("F32", "BF16", ...), from the header only."""
        return str(self._handle(name).get_slice(name).get_dtype())

    def check_tensors(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every expected tensor present with that shape and a float dtype, from the headers alone: a checkpoint
        that disagrees with its config is refused before any planning (llama.cpp would reject the file)."""
        for name, shape in expected.items():
            if name not in self._where:
                raise UserError(f"{self.path}: tensor {name} missing from the checkpoint")
            got = self.shape(name)
            if got != tuple(shape):
                raise UserError(f"{self.path}: tensor {name} has shape {list(got)}, but config.json implies "
                                f"{list(shape)}")
            dtype = self.header_dtype(name)
            if dtype not in FLOAT_HEADER_DTYPES:
                raise UserError(f"{self.path}: tensor {name} is {dtype}; only float weights "
                                f"({', '.join(FLOAT_HEADER_DTYPES)}) can be converted")

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def d_ff(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def n_embd(self) -> int:
        return int(self.config["hidden_size"])

    def window(self, seqlen: int) -> int:
        """``seqlen`` capped at the model's context (``max_position_embeddings``, when the config gives one)."""
        return min(seqlen, int(self.config.get("max_position_embeddings") or seqlen))
