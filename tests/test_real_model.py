"""The real SmolLM2-135M (embedded, offline): MLPMoE slicing keeps the dense perplexity; the parameter-reducing
variants at 80% kept are reported and stay in a band that a broken conversion cannot reach.

Protocol (llama-perplexity's): the first 4 windows of 512 tokens of the Pride and Prejudice excerpt, second half
of each window scored (1020 tokens). Dense perplexity there is ~17.4; a random model of this shape scores ~50,000.
"""
from __future__ import annotations

import pytest

from gguf_moeify.adapters import adapter_for
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.convert import make_plans
from gguf_moeify.evaluate import perplexity, read_text, tokenize_for_ppl
from gguf_moeify.methods import MethodOptions, MLPMoEOptions
from gguf_moeify.reference import load_dense, logits_fn, moeify_

from conftest import eval_text_path

CTX, CHUNKS = 512, 4


@pytest.fixture(scope="module")
def dense(smollm2_dir):
    ckpt = Checkpoint(smollm2_dir)
    model, tok = load_dense(ckpt)
    tokens = tokenize_for_ppl(tok, read_text(eval_text_path())[:40_000], add_bos=False)
    return ckpt, tokens, perplexity(logits_fn(model), tokens, CTX, CHUNKS).ppl


def _moe_ppl(ckpt, tokens, opts: MethodOptions) -> float:
    adapter = adapter_for(ckpt.config)
    model, _ = load_dense(ckpt)
    moeify_(model, adapter, make_plans(ckpt, adapter, "mlpmoe", opts, progress=False))
    return perplexity(logits_fn(model), tokens, CTX, CHUNKS).ppl


def test_dense_model_is_the_real_one(dense):
    assert 10 < dense[2] < 30


def test_plain_slicing_keeps_dense_perplexity(dense):
    ckpt, tokens, ppl = dense
    moe = _moe_ppl(ckpt, tokens, MethodOptions(experts=8))
    print(f"dense {ppl:.4f} mlpmoe-slice-E8 {moe:.4f}")
    assert abs(moe / ppl - 1) < 1e-3


@pytest.mark.parametrize("variant", ["fractal-fade", "compensated-pruning"])
def test_variants_at_80_percent_stay_in_band(dense, variant):
    """Band: below 5x dense (measured ~2.7x / ~3x). Data-free removal of 17% of a 135M model's MLP neurons
    costs real quality (small models have little redundancy); a broken file (wrong neurons, lost scale,
    shuffled experts) lands in the hundreds to tens of thousands."""
    ckpt, tokens, ppl = dense
    moe = _moe_ppl(ckpt, tokens, MethodOptions(experts=8, own=MLPMoEOptions(variant=variant, keep=0.8)))
    print(f"dense {ppl:.4f} mlpmoe-{variant}-keep0.8 {moe:.4f} ratio {moe / ppl:.3f}")
    assert ppl < moe < 5 * ppl
