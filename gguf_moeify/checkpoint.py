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


class Checkpoint:
    def __init__(self, model: str | os.PathLike, dtype: str = "float32"):
        self.path = resolve_model_dir(str(model))
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise UserError(f"{self.path}: no config.json (not a Hugging Face model folder)")
        try:
            self.config: dict = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{cfg}: invalid JSON ({exc})")
        # Some multimodal/wrapper configs nest the language model's config.
        if "text_config" in self.config and "hidden_size" not in self.config:
            self.config = {**self.config["text_config"], "architectures": self.config.get("architectures")}
        if dtype not in DTYPES:
            raise UserError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]
        self._where = self._index()
        self._handles: dict[Path, object] = {}

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / fname for name, fname in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path}: no *.safetensors weights (convert .bin checkpoints with transformers' "
                            f"save_pretrained(safe_serialization=True) first)")
        from safetensors import safe_open
        where = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for name in h.keys():
                    where[name] = f
        return where

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def _handle(self, name: str):
        from safetensors import safe_open
        f = self._where.get(name)
        if f is None:
            raise UserError(f"{self.path}: tensor {name} missing from the checkpoint")
        handle = self._handles.get(f)
        if handle is None:
            handle = self._handles[f] = safe_open(f, framework="pt")
        return handle

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from disk now, in the working dtype (or ``dtype``)."""
        return self._handle(name).get_tensor(name).to(dtype or self.dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the safetensors header only."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def d_ff(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def n_embd(self) -> int:
        return int(self.config["hidden_size"])
