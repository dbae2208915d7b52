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
