"""The patched llama.cpp runtime (patches/) against its contract, on tiny GGUFs written here with gguf-py.

- stock-behaviour files (Mixtral-path llama with experts, dense qwen3) give identical perplexity on the patched
  and the stock build;
- unit expert weights: E experts, K=E, expert_weights_unit=true plus a shared expert == the dense FFN;
- every router type (linear, cmoe, mlp) with K<E runs, differs from K=E, and matches an exact numpy model of the
  contract (selection by score, unit or softmax weights, shared expert) on a model whose attention output is zero,
  so every token's logits depend on that token only and numpy can compute the perplexity llama.cpp reports.

Needs build/llama-cpp/bin (bash scripts/build_llama_cpp.sh) and, for the stock comparisons,
build/llama-cpp-stock/bin (bash scripts/build_llama_cpp.sh --stock); skipped otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf_moeify.errors import UserError  # noqa: E402
from gguf_moeify.llama_cpp import relative_difference  # noqa: E402

from conftest import llama_cpp_or_skip  # noqa: E402

CTX = 64
CHUNKS = 8


@pytest.fixture(scope="module")
def patched():
    return llama_cpp_or_skip("patched")


@pytest.fixture(scope="module")
def stock():
    return llama_cpp_or_skip("stock")


# ---------------------------------------------------------------------------------------------------------------
# tiny GGUF builder: byte-level GPT-2 BPE vocabulary, llama or qwen3 architecture, dense or MoE FFN


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable unicode character table (index = byte value)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


BYTE_TOKENS = _bytes_to_unicode()
# one merge the test text never triggers (no 'Q'): token id == byte value for every byte of the text
VOCAB = BYTE_TOKENS + ["QZ", "<|endoftext|>"]
MERGES = ["Q Z"]
EOS_ID = len(VOCAB) - 1

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. My dear Mr. Bennet, said his lady to him one "
    "day, have you heard that Netherfield Park is let at last? Mr. Bennet replied that he had not. But it is, "
    "returned she; for Mrs. Long has just been here, and she told me all about it. Mr. Bennet made no answer. "
    "Do you not want to know who has taken it? cried his wife impatiently. You want to tell me, and I have no "
    "objection to hearing it. This was invitation enough."
)
assert "Q" not in TEXT and TEXT.isascii()


def text_tokens() -> np.ndarray:
    return np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.int64)


@dataclass
class MoE:
    """One layer's MoE FFN in contract form (numpy shapes as gguf-py writes them)."""
    gate_inp: np.ndarray  # (E, d) linear/cmoe, (H, d) mlp
    gate_exps: np.ndarray  # (E, F, d)
    up_exps: np.ndarray  # (E, F, d)
    down_exps: np.ndarray  # (E, d, F)
    shexp: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # gate (Fs, d), up (Fs, d), down (d, Fs)
    up_inp: np.ndarray | None = None  # cmoe (E, d)
    gate_inp_b: np.ndarray | None = None  # mlp (H,)
    gate_inp_out: np.ndarray | None = None  # mlp (E, H)
    gate_inp_out_b: np.ndarray | None = None  # mlp (E,)


@dataclass
class TinyModel:
    arch: str = "llama"
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_layer: int = 2
    n_ff: int = 96
    eps: float = 1e-5
    tok_embd: np.ndarray = None
    output: np.ndarray = None
    output_norm: np.ndarray = None
    layers: list[dict] = field(default_factory=list)  # attention + norms + dense ffn_{gate,up,down}
    moe: list[MoE] | None = None
    n_expert_used: int = 0
    router_type: int | None = None  # None: key absent
    weights_unit: bool | None = None  # None: key absent
    expert_ff_key: bool = True  # write {arch}.expert_feed_forward_length

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def random_model(seed: int = 0, arch: str = "llama", zero_attn: bool = False, **kw) -> TinyModel:
    m = TinyModel(arch=arch, **kw)
    rng = np.random.default_rng(seed)
    d, hd, V = m.n_embd, m.head_dim, len(VOCAB)

    def w(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale / math.sqrt(shape[-1])).astype(np.float32)

    m.tok_embd = w(V, d, scale=math.sqrt(d))
    m.output = w(V, d, scale=1.5)
    m.output_norm = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    for _ in range(m.n_layer):
        layer = {
            "attn_norm": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
            "attn_q": w(m.n_head * hd, d), "attn_k": w(m.n_head_kv * hd, d), "attn_v": w(m.n_head_kv * hd, d),
            "attn_output": np.zeros((d, m.n_head * hd), np.float32) if zero_attn else w(d, m.n_head * hd),
            "ffn_norm": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
            "ffn_gate": w(m.n_ff, d, scale=2.0), "ffn_up": w(m.n_ff, d, scale=2.0), "ffn_down": w(d, m.n_ff),
        }
        if arch == "qwen3":
            layer["attn_q_norm"] = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
            layer["attn_k_norm"] = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
        m.layers.append(layer)
    return m


def split_dense(m: TinyModel, n_shared: int, n_expert: int, n_used: int, router_type: int | None = 0,
                weights_unit: bool | None = True, seed: int = 1, router_hidden: int = 8) -> TinyModel:
    """The same model with each dense FFN split into a shared block (the first n_shared neurons) and n_expert
    equal experts (the rest, in order), plus a random router of the given type."""
    rng = np.random.default_rng(seed)
    d = m.n_embd
    F = (m.n_ff - n_shared) // n_expert
    assert n_shared + n_expert * F == m.n_ff
    moe = []
    for layer in m.layers:
        g, u, dn = layer["ffn_gate"], layer["ffn_up"], layer["ffn_down"]
        exps = [slice(n_shared + e * F, n_shared + (e + 1) * F) for e in range(n_expert)]
        x = MoE(
            gate_inp=(rng.standard_normal((n_expert, d)) / math.sqrt(d)).astype(np.float32),
            gate_exps=np.stack([g[s] for s in exps]), up_exps=np.stack([u[s] for s in exps]),
            down_exps=np.stack([dn[:, s] for s in exps]),
            shexp=(g[:n_shared], u[:n_shared], dn[:, :n_shared]) if n_shared else None,
        )
        if router_type == 1:
            # CMoE: the rows of the dense gate/up of one "representative" neuron per expert
            reps = [s.start for s in exps]
            x.gate_inp, x.up_inp = g[reps].copy(), u[reps].copy()
        elif router_type == 2:
            x.gate_inp = (rng.standard_normal((router_hidden, d)) / math.sqrt(d)).astype(np.float32)
            x.gate_inp_b = (0.1 * rng.standard_normal(router_hidden)).astype(np.float32)
            x.gate_inp_out = (rng.standard_normal((n_expert, router_hidden))).astype(np.float32)
            x.gate_inp_out_b = (0.1 * rng.standard_normal(n_expert)).astype(np.float32)
        moe.append(x)
    out = TinyModel(**{k: getattr(m, k) for k in ("arch", "n_embd", "n_head", "n_head_kv", "n_layer", "n_ff",
                                                  "eps", "tok_embd", "output", "output_norm", "layers")})
    out.moe, out.n_expert_used, out.router_type, out.weights_unit = moe, n_used, router_type, weights_unit
    return out


def write_gguf(m: TinyModel, path: Path) -> Path:
    arch = m.arch
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name(f"tiny-{arch}")
    wr.add_context_length(512)
    wr.add_embedding_length(m.n_embd)
    wr.add_block_count(m.n_layer)
    wr.add_head_count(m.n_head)
    wr.add_head_count_kv(m.n_head_kv)
    wr.add_rope_dimension_count(m.head_dim)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(m.eps)
    wr.add_vocab_size(len(VOCAB))
    if arch == "qwen3":
        wr.add_key_length(m.head_dim)
        wr.add_value_length(m.head_dim)
    if m.moe is None:
        wr.add_feed_forward_length(m.n_ff)
    else:
        E, F = m.moe[0].gate_exps.shape[:2]
        Fs = 0 if m.moe[0].shexp is None else m.moe[0].shexp[0].shape[0]
        # with expert_ff_key False this is a stock Mixtral-style file: feed_forward_length is the expert width
        wr.add_feed_forward_length(m.n_ff if m.expert_ff_key else F)
        wr.add_expert_count(E)
        wr.add_expert_used_count(m.n_expert_used)
        if m.expert_ff_key:
            wr.add_expert_feed_forward_length(F)
        if Fs:
            wr.add_expert_shared_feed_forward_length(Fs)
        if m.router_type is not None:
            wr.add_uint32(f"{arch}.expert_router_type", m.router_type)
        if m.weights_unit is not None:
            wr.add_bool(f"{arch}.expert_weights_unit", m.weights_unit)
    # tokenizer: byte-level BPE
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("gpt-2")
    wr.add_token_list(VOCAB)
    wr.add_token_types([1] * (len(VOCAB) - 1) + [3])
    wr.add_token_merges(MERGES)
    wr.add_bos_token_id(EOS_ID)
    wr.add_eos_token_id(EOS_ID)
    wr.add_add_bos_token(False)

    wr.add_tensor("token_embd.weight", m.tok_embd)
    wr.add_tensor("output_norm.weight", m.output_norm)
    wr.add_tensor("output.weight", m.output)
    for i, layer in enumerate(m.layers):
        names = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"]
        names += ["attn_q_norm", "attn_k_norm"] if arch == "qwen3" else []
        names += ["ffn_gate", "ffn_up", "ffn_down"] if m.moe is None else []
        for n in names:
            wr.add_tensor(f"blk.{i}.{n}.weight", layer[n])
        if m.moe is not None:
            x = m.moe[i]
            wr.add_tensor(f"blk.{i}.ffn_gate_inp.weight", x.gate_inp)
            wr.add_tensor(f"blk.{i}.ffn_gate_exps.weight", x.gate_exps)
            wr.add_tensor(f"blk.{i}.ffn_up_exps.weight", x.up_exps)
            wr.add_tensor(f"blk.{i}.ffn_down_exps.weight", x.down_exps)
            if x.shexp is not None:
                for n, t in zip(("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"), x.shexp):
                    wr.add_tensor(f"blk.{i}.{n}.weight", t)
            if x.up_inp is not None:
                wr.add_tensor(f"blk.{i}.ffn_up_inp.weight", x.up_inp)
            if x.gate_inp_out is not None:
                wr.add_tensor(f"blk.{i}.ffn_gate_inp.bias", x.gate_inp_b)
                wr.add_tensor(f"blk.{i}.ffn_gate_inp_out.weight", x.gate_inp_out)
                wr.add_tensor(f"blk.{i}.ffn_gate_inp_out.bias", x.gate_inp_out_b)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


# ---------------------------------------------------------------------------------------------------------------
# numpy model of the contract, for models with zero attention output (each token's logits depend on it alone)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1 + np.exp(-x))


def _swiglu(x, g, u, dn):  # x (T, d); g, u (F, d); dn (d, F)
    return (_silu(x @ g.T) * (x @ u.T)) @ dn.T


def moe_ffn_reference(m: TinyModel, i: int, x: np.ndarray, n_used: int) -> np.ndarray:
    mo = m.moe[i]
    if m.router_type == 1:
        scores = np.abs((x @ mo.up_inp.T) * _silu(x @ mo.gate_inp.T))
    elif m.router_type == 2:
        scores = np.tanh(x @ mo.gate_inp.T + mo.gate_inp_b) @ mo.gate_inp_out.T + mo.gate_inp_out_b
    else:
        scores = x @ mo.gate_inp.T
    chosen = np.argsort(-scores, axis=-1, kind="stable")[:, :n_used]  # (T, K)
    if m.weights_unit:
        weights = np.ones(chosen.shape)
    else:  # Mixtral path: softmax over all experts, the chosen renormalised
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        weights = np.take_along_axis(p, chosen, -1)
        weights /= weights.sum(-1, keepdims=True)
    E = mo.gate_exps.shape[0]
    out = np.zeros_like(x)
    for e in range(E):
        coef = (weights * (chosen == e)).sum(-1)  # (T,)
        if np.any(coef):
            out += coef[:, None] * _swiglu(x, mo.gate_exps[e], mo.up_exps[e], mo.down_exps[e])
    if mo.shexp is not None:
        out += _swiglu(x, *mo.shexp)
    return out


def reference_perplexity(m: TinyModel, tokens: np.ndarray, ctx: int, chunks: int, n_used: int) -> float:
    """llama-perplexity's number for a zero-attention model: per chunk of ctx tokens, the second half is scored."""
    for layer in m.layers:
        assert not np.any(layer["attn_output"]), "the reference needs attention output == 0"
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    h = f64(m.tok_embd)[tokens]  # (T, d)
    for i, layer in enumerate(m.layers):
        x = _rms(h, f64(layer["ffn_norm"]), m.eps)
        if m.moe is None:
            h = h + _swiglu(x, f64(layer["ffn_gate"]), f64(layer["ffn_up"]), f64(layer["ffn_down"]))
        else:
            h = h + moe_ffn_reference(m, i, x, n_used)
    logits = _rms(h, f64(m.output_norm), m.eps) @ f64(m.output).T
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll, count = 0.0, 0
    n_chunk = min(len(tokens) // ctx, chunks)
    first = ctx // 2
    for c in range(n_chunk):
        s = c * ctx
        for j in range(first, ctx - 1):
            nll -= logp[s + j, tokens[s + j + 1]]
            count += 1
    return math.exp(nll / count)


# ---------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(TEXT)
    assert len(text_tokens()) >= 2 * CTX
    return p


def ppl(tools, model: Path, text_file: Path, extra=()) -> "object":
    return tools.perplexity(model, text_file, ctx=CTX, chunks=CHUNKS, threads=2, extra=list(extra))


def used_override(arch: str, k: int) -> list[str]:
    return ["--override-kv", f"{arch}.expert_used_count=int:{k}"]


# ---------------------------------------------------------------------------------------------------------------
# (a) stock files behave exactly as before


@pytest.mark.parametrize("kind", ["llama-mixtral", "qwen3-dense", "llama-dense"])
def test_stock_files_identical_on_patched_and_stock(kind, patched, stock, text_file, tmp_path):
    arch = kind.split("-")[0]
    m = random_model(seed=3, arch=arch)
    if kind == "llama-mixtral":
        # Mixtral path: softmax + renormalised top-k, experts n_ff wide, none of the new keys
        m = split_dense(m, n_shared=0, n_expert=4, n_used=2, router_type=None, weights_unit=None)
        m.expert_ff_key = False
    path = write_gguf(m, tmp_path / f"{kind}.gguf")
    a = ppl(patched, path, text_file)
    b = ppl(stock, path, text_file)
    assert a.n_chunks == b.n_chunks == CHUNKS
    assert a.chunk_ppls == b.chunk_ppls
    assert a.ppl == b.ppl
    assert math.isfinite(a.ppl) and a.ppl > 1


def test_perplexity_retries_a_run_whose_log_lost_every_chunk(monkeypatch, tmp_path):
    """An unpatched llama-perplexity can exit 0 having logged nothing after its start-up lines (its async log is
    never drained): that run is repeated, as one that lost only the last chunks is; five such runs are an error."""
    import subprocess
    from gguf_moeify.llama_cpp import LlamaCppTools
    start = "perplexity: calculating perplexity over 2 chunks, n_ctx=64\n"
    lost = subprocess.CompletedProcess([], 0, "", "init: llama threadpool init, n_threads = 2\n")
    full = subprocess.CompletedProcess([], 0, "[1]10.5000,[2]11.2500,",
                                       start + "Final estimate: PPL = 11.2500 +/- 0.5\n")
    runs = [lost, lost, full]
    tools = LlamaCppTools(tmp_path)
    monkeypatch.setattr(tools, "run", lambda name, args: runs.pop(0))
    result = tools.perplexity(tmp_path / "m.gguf", tmp_path / "t.txt", ctx=64)
    assert result.ppl == 11.25 and result.chunk_ppls == [10.5, 11.25] and not runs
    monkeypatch.setattr(tools, "run", lambda name, args: lost)
    with pytest.raises(UserError, match="printed no perplexity values"):
        tools.perplexity(tmp_path / "m.gguf", tmp_path / "t.txt", ctx=64)


def test_perplexity_final_estimate_is_printed(patched, text_file, tmp_path):
    """Patch 0004: the "Final estimate" line is flushed before exit."""
    path = write_gguf(random_model(seed=4), tmp_path / "dense.gguf")
    r = ppl(patched, path, text_file)
    assert r.ppl_err is not None
    assert abs(r.ppl - r.chunk_ppls[-1]) <= 1e-4 * r.ppl + 1e-4


# ---------------------------------------------------------------------------------------------------------------
# (b) unit weights: every expert active + shared expert == the dense FFN


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("router_type", [0, 1, 2])
def test_unit_weights_all_experts_equal_dense(arch, router_type, patched, text_file, tmp_path):
    dense = random_model(seed=5, arch=arch)
    moe = split_dense(dense, n_shared=32, n_expert=4, n_used=4, router_type=router_type, weights_unit=True)
    p_dense = ppl(patched, write_gguf(dense, tmp_path / "dense.gguf"), text_file)
    p_moe = ppl(patched, write_gguf(moe, tmp_path / "moe.gguf"), text_file)
    assert relative_difference(p_dense.ppl, p_moe.ppl) < 1e-4, (p_dense.ppl, p_moe.ppl)
    for a, b in zip(p_dense.chunk_ppls, p_moe.chunk_ppls):
        assert relative_difference(a, b) < 1e-4


def test_unit_weights_key_absent_is_stock_softmax(patched, text_file, tmp_path):
    """Without expert_weights_unit the same K=E file is weighted by the (renormalised) softmax: not dense."""
    dense = random_model(seed=5)
    moe = split_dense(dense, n_shared=32, n_expert=4, n_used=4, router_type=None, weights_unit=None)
    p_dense = ppl(patched, write_gguf(dense, tmp_path / "dense.gguf"), text_file)
    p_moe = ppl(patched, write_gguf(moe, tmp_path / "moe.gguf"), text_file)
    assert relative_difference(p_dense.ppl, p_moe.ppl) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# (c) router types with K < E: run, differ from K = E, and match the numpy model of the contract


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("router_type", [0, 1, 2])
@pytest.mark.parametrize("unit", [True, False])
def test_router_types_match_reference(arch, router_type, unit, patched, text_file, tmp_path):
    dense = random_model(seed=7, arch=arch, zero_attn=True)
    moe = split_dense(dense, n_shared=32, n_expert=4, n_used=2, router_type=router_type, weights_unit=unit)
    path = write_gguf(moe, tmp_path / "moe.gguf")
    tokens = text_tokens()

    top2 = ppl(patched, path, text_file)
    all4 = ppl(patched, path, text_file, extra=used_override(arch, 4))
    assert math.isfinite(top2.ppl) and top2.n_chunks == CHUNKS
    assert relative_difference(top2.ppl, all4.ppl) > 1e-3, (top2.ppl, all4.ppl)

    ref2 = reference_perplexity(moe, tokens, CTX, CHUNKS, n_used=2)
    ref4 = reference_perplexity(moe, tokens, CTX, CHUNKS, n_used=4)
    assert relative_difference(top2.ppl, ref2) < 2e-4, (top2.ppl, ref2)
    assert relative_difference(all4.ppl, ref4) < 2e-4, (all4.ppl, ref4)


def test_reference_sanity_dense(patched, text_file, tmp_path):
    """The numpy model itself agrees with llama.cpp on the dense zero-attention model."""
    dense = random_model(seed=7, zero_attn=True)
    r = ppl(patched, write_gguf(dense, tmp_path / "dense.gguf"), text_file)
    ref = reference_perplexity(dense, text_tokens(), CTX, CHUNKS, n_used=0)
    assert relative_difference(r.ppl, ref) < 2e-4, (r.ppl, ref)


def test_unknown_router_type_is_rejected(patched, text_file, tmp_path):
    moe = split_dense(random_model(seed=8), n_shared=32, n_expert=4, n_used=2, router_type=0)
    moe.router_type = 7
    with pytest.raises(UserError, match="llama-perplexity failed"):
        ppl(patched, write_gguf(moe, tmp_path / "bad.gguf"), text_file)


# ---------------------------------------------------------------------------------------------------------------
# the other tools


def test_kl_divergence_of_a_model_with_itself_is_zero(patched, text_file, tmp_path):
    path = write_gguf(random_model(seed=9), tmp_path / "m.gguf")
    base = tmp_path / "base.kld"
    p = patched.perplexity(path, text_file, ctx=CTX, chunks=CHUNKS, threads=2, save_logits=base)
    assert base.is_file() and p.n_chunks == CHUNKS
    k = patched.kl_divergence(path, base, ctx=CTX, chunks=CHUNKS, threads=2)
    assert abs(k.mean_kld) < 1e-6
    assert k.same_top_p == pytest.approx(1.0)
    assert k.ppl == pytest.approx(p.ppl, rel=1e-4)


def test_completion_is_deterministic(patched, tmp_path):
    path = write_gguf(random_model(seed=10), tmp_path / "m.gguf")
    a = patched.completion(path, "It is a truth", n_predict=8)
    b = patched.completion(path, "It is a truth", n_predict=8)
    assert a == b and len(a) > 0


def test_quantize_and_bench(patched, text_file, tmp_path):
    moe = split_dense(random_model(seed=11), n_shared=32, n_expert=4, n_used=2, router_type=1)
    src = write_gguf(moe, tmp_path / "moe-f32.gguf")
    dst = patched.quantize(src, tmp_path / "moe-q8.gguf", "Q8_0")
    r = ppl(patched, dst, text_file)
    assert math.isfinite(r.ppl)
    bench = patched.bench(dst, n_prompt=16, n_gen=4, threads=2, reps=1)
    assert [t["n_gen"] for t in bench["tests"]] == [0, 4] and all(t["avg_ts"] > 0 for t in bench["tests"])
    assert bench["pp_ts"] == bench["tests"][0]["avg_ts"] and bench["tg_ts"] == bench["tests"][1]["avg_ts"]
    # peak RSS of llama-bench itself (this Python process's own is not carried over): above the file, far below us
    import resource
    own_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert dst.stat().st_size / 2**20 < bench["peak_rss_mib"] < own_mib, (bench["peak_rss_mib"], own_mib)
