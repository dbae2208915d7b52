"""The CPU expert kernels of the patched llama.cpp (patches 0007/0008: MUL_MAT_ID on the kernels of a dense MUL_MAT)
on quantized files, in prompt processing (llama-perplexity evaluates batches of tokens):

- all experts active == the dense file, q4_0 (repacked to 8x8 interleaved blocks on AVX2/AVX-512: gemm over each
  expert's gathered rows, gemv for the rows left over after groups of 4) and q8_0 (llamafile's sgemm over the
  gathered rows) -- expert slices of a quantized row are the very blocks of the dense row, so only the order of the
  down projection's float sums differs;
- the same for q4_K (repacked to 8x8 blocks with q8_K activations on AVX2), on a model with 256-wide rows;
- routed (top-2 of 4, uneven rows per expert): the repacked path equals the plain CPU path (``--no-repack``).
Micro-batches of 50 tokens, so experts get row counts that are not multiples of 4; and, for decoding (patches 0009,
0010), micro-batches of one and three tokens: all experts active == the dense file, q4_0 repacked and not.
And the q4_0 gemv of 0015 (AVX512-VNNI): a dense file decoded on the patched build == the stock build.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from gguf_moeify.convert import make_plans
from gguf_moeify.llama_cpp import RUNNER_ENV, relative_difference
from gguf_moeify.methods import MethodOptions

from conftest import make_tiny_model
from test_llama_cpp_parity import CTX, CHUNKS, F32_KV, _dense_reference_gguf, _write

UBATCH = 50  # 128-token windows as 50 + 50 + 28 rows: leftovers after groups of 4
VNNI_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}   # what 0015's kernels are compiled for


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere, and when the tools run under
    an emulator: its CPU is not the host's)."""
    if os.environ.get(RUNNER_ENV):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module")
def text_file(eval_excerpt):
    return eval_excerpt


def _quantized(tools, f32_file, qtype, tmp_path):
    # --pure: every weight in qtype (no k-quant mixture that could treat the dense and the expert tensors apart)
    return tools.quantize(f32_file, tmp_path / f"{f32_file.stem}.{qtype}.gguf", qtype.upper(), threads=2,
                          extra=["--pure"])


def _ppl(tools, model, text_file, extra=()):
    return tools.perplexity(model, text_file, ctx=CTX, chunks=CHUNKS, threads=2, batch=UBATCH,
                            extra=list(F32_KV) + list(extra))


@pytest.fixture(scope="module")
def kquant_model(smollm2_dir, tmp_path_factory):
    """Rows of 256 (the k-quant block) everywhere: hidden 256, d_ff 1024, 4 experts of 256 neurons."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("kq") / "llama", smollm2_dir, seed=7,
                           hidden_size=256, intermediate_size=1024)


def _assert_all_experts_active_equals_dense(tools, model, experts, qtype, text_file, tmp_path, extras, tol=1e-4):
    """An MLPMoE file with all ``experts`` active, quantized to ``qtype``, gives the dense file's perplexity to ``tol``
    under each llama-perplexity option list in ``extras``."""
    dense = _quantized(tools, _dense_reference_gguf(model, tmp_path / "dense.gguf"), qtype, tmp_path)
    opts = MethodOptions(experts=experts, shared=0)
    _write(model, lambda c, a: make_plans(c, a, "mlpmoe", opts, progress=False), tmp_path / "moe.gguf")
    moe = _quantized(tools, tmp_path / "moe.gguf", qtype, tmp_path)
    for extra in extras:
        d, m = _ppl(tools, dense, text_file, extra), _ppl(tools, moe, text_file, extra)
        assert m.n_chunks == d.n_chunks == CHUNKS
        assert relative_difference(m.ppl, d.ppl) < tol, (qtype, extra, m.ppl, d.ppl)


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "q4_k"])
def test_quantized_all_experts_active_equals_dense(tools, tiny_models, kquant_model, text_file, tmp_path, qtype):
    model = kquant_model if qtype == "q4_k" else tiny_models["llama"]
    _assert_all_experts_active_equals_dense(tools, model, 4, qtype, text_file, tmp_path, ([], ["--no-repack"]))


def test_decode_all_experts_active_equals_dense(tools, kquant_model, text_file, tmp_path):
    """One token per micro-batch, as in decoding: the single-row paths of the experts (patch 0009 walks a thread's
    short run of an expert in parts while prefetching the next expert; the 9 KB down experts here give several parts
    per run), repacked (gemv) and not (vec_dot), compute the very rows of the dense file. Micro-batches of 1 and 3
    tokens read each activation row where 0010 quantized it once (one row for all experts of a token in gate/up).
    0014 cuts the used experts' rows into one contiguous range per thread: with 3 threads the ranges end inside
    experts, and sums the 16 experts' outputs inside the down product in two blocks of 8 (for one token, on
    AVX512-VNNI: 0015's kernel, the block's experts side by side)."""
    _assert_all_experts_active_equals_dense(tools, kquant_model, 16, "q4_0", text_file, tmp_path,
                                            (["-ub", "1"], ["-ub", "3"], ["-ub", "1", "-t", "3"],
                                             ["-ub", "3", "-t", "3"], ["-ub", "1", "--no-repack"]))


def test_decode_long_expert_runs_equal_dense(smollm2_dir, tools, text_file, tmp_path):
    """Experts of 512 neurons in a 256-wide model: each thread's run of an expert is 74 KB, so 0015 walks a block's 8
    experts 4 at a time (two kernel calls a block, adding into the same sums); the result is still the dense file's.
    Tolerance 1e-3: the 16-block expert rows summed over 16 experts against 256-block dense rows move this random
    model's perplexity (~1.8e5) by 2e-4 from the order of float additions alone (the same with 0015's gemv alone,
    which sums expert after expert); a block that lost or doubled 4 experts would move it by far more."""
    model = make_tiny_model("llama", tmp_path / "wide", smollm2_dir, seed=5, hidden_size=256, intermediate_size=8192)
    _assert_all_experts_active_equals_dense(tools, model, 16, "q4_0", text_file, tmp_path, (["-ub", "1"],), tol=1e-3)


def test_decode_gemv_q4_0_equals_stock(tools, stock_tools, smollm2_dir, text_file, tmp_path):
    """0015 gives the q4_0 gemv (one activation row: decoding, dense and experts alike) an AVX512-VNNI kernel meant to
    be bit-identical to the stock one: a dense q4_0 file decoded in micro-batches of 1 and 3 tokens gives the stock
    build's chunk perplexities. d_ff 8448 makes the down rows 264 blocks long, so the kernel's second pass over
    activation blocks (256 at a time) runs too. Without AVX512-VNNI both builds run the stock kernel: skipped."""
    missing = VNNI_FLAGS - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}: both builds would run the stock q4_0 gemv")
    model = make_tiny_model("llama", tmp_path / "wide", smollm2_dir, seed=11, intermediate_size=8448)
    dense = _quantized(tools, _dense_reference_gguf(model, tmp_path / "dense.gguf"), "q4_0", tmp_path)
    for extra in (["-ub", "1"], ["-ub", "3", "-t", "3"]):
        patched, stock = _ppl(tools, dense, text_file, extra), _ppl(stock_tools, dense, text_file, extra)
        assert patched.n_chunks == stock.n_chunks == CHUNKS
        assert (patched.chunk_ppls, patched.ppl) == (stock.chunk_ppls, stock.ppl), extra


def test_routed_repacked_equals_plain_cpu_path(tools, tiny_models, text_file, tmp_path):
    model = tiny_models["llama"]
    opts = MethodOptions(experts=4, shared=0, top_k=2)
    _write(model, lambda c, a: make_plans(c, a, "mlpmoe", opts, progress=False), tmp_path / "moe.gguf")
    moe = _quantized(tools, tmp_path / "moe.gguf", "q4_0", tmp_path)
    repacked, plain = _ppl(tools, moe, text_file), _ppl(tools, moe, text_file, ["--no-repack"])
    assert repacked.n_chunks == plain.n_chunks == CHUNKS
    assert relative_difference(repacked.ppl, plain.ppl) < 1e-3, (repacked.ppl, plain.ppl)
