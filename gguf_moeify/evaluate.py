"""Perplexity with llama-perplexity's protocol, so torch and llama.cpp figures are comparable.

Protocol: the whole text is tokenized once (BOS first when the vocabulary adds one); it is cut into consecutive,
non-overlapping windows of ``ctx`` tokens (a trailing partial window is dropped, at most ``chunks`` windows); when
the vocabulary adds BOS, each window's first token is replaced by BOS; in each window only the second half is
scored: the logits at positions ctx/2 .. ctx-2 predict the tokens at ctx/2+1 .. ctx-1. PPL = exp(mean NLL).
The result is llama_cpp's ``PerplexityResult``, the type llama-perplexity's figures are parsed into.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import UserError
from .llama_cpp import PerplexityResult


def read_text(path: str | Path) -> str:
    from .textfile import read_utf8
    return read_utf8(path)


def tokenize_for_ppl(tokenizer, text: str, add_bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def windows(tokens: list[int], ctx: int, chunks: int | None, bos_id: int | None) -> list[list[int]]:
    n = len(tokens) // ctx
    if chunks is not None:
        n = min(n, chunks)
    if n == 0:
        raise UserError(f"text too short: {len(tokens)} tokens, need at least one window of {ctx}")
    out = []
    for i in range(n):
        w = list(tokens[i * ctx:(i + 1) * ctx])
        if bos_id is not None:
            w[0] = bos_id
        out.append(w)
    return out


@torch.no_grad()
def perplexity(model, tokens: list[int], ctx: int = 512, chunks: int | None = None, bos_id: int | None = None,
               desc: str = "perplexity") -> PerplexityResult:
    """``model(ids[1, T]) -> logits[1, T, V]``."""
    first = ctx // 2
    nll, count = 0.0, 0
    wins = windows(tokens, ctx, chunks, bos_id)
    for w in tqdm(wins, desc=desc, unit="window", leave=False):
        ids = torch.tensor([w])
        logits = model(ids)[0, first:ctx - 1].double()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, first + 1:ctx], reduction="sum").item()
        count += ctx - 1 - first
    return PerplexityResult(ppl=math.exp(nll / count), n_chunks=len(wins), nll_sum=nll, n_scored=count, ctx=ctx)
