"""llama.cpp's "normal" rope rotates adjacent pairs; HF's rotate_half rotates the two halves of each head.
llama.cpp's converter therefore permutes the rows of Q and K (weights and biases) for architectures with that rope.
"""
from __future__ import annotations

import numpy as np


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order -> llama.cpp row order, per head: [h0..h(d/2-1), h(d/2)..] -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Llama 3.x rope scaling as llama.cpp wants it: a ``rope_freqs`` tensor of n_rot/2 divisors of the rope
    frequencies (None when the config has no llama3 rope scaling). Meta's rule: wavelengths shorter than
    original_context / high_freq_factor keep their frequency, longer than original_context / low_freq_factor are
    divided by ``factor``, and the band between is interpolated smoothly in 1/wavelength."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if (params.get("rope_type") or params.get("type") or "").lower() != "llama3":
        return None
    base = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    context = float(params.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi * base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    with np.errstate(divide="ignore", invalid="ignore"):  # high == low leaves no band in between
        smooth = (context / wavelen - low) / (high - low)
        between = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, between))
    return out.astype(np.float32)
