"""The patched llama.cpp loader against hostile MoE files (patch 0016), and ``inspect --check`` against the loader.

Two small converter files (qwen3: linear router, the shared expert as an always-selected expert, a per-layer
expert_used_count; llama: MLP router, a separate shared expert) are rewritten with gguf-py in many ways (keys
removed, retyped or out of range, arrays of the wrong length, tensors dropped, reshaped or retyped, the selection
bias of declared always-selected experts removed, ...). Each mutated file must give llama-perplexity either a
clean load error (non-zero exit, no signal, no assert or abort in its output) or a correct run (a finite
perplexity; the unmutated file's where the mutation keeps the function), as each mutation expects; and
``inspect --check`` must flag every file the loader refuses and pass the files that run.

Run with ``-s`` to see the table of outcomes (docs/robustness.md has its counts without and with patch 0016).
Needs build/llama-cpp/bin; skipped otherwise.
"""
from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from gguf_moeify.adapters import adapter_for
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.cli import main as cli_main
from gguf_moeify.convert import provenance, write_model_file
from gguf_moeify.file_contract import check_file
from gguf_moeify.gguf_writer import _copy_key
from gguf_moeify.llama_cpp import parse_perplexity_output, relative_difference
from gguf_moeify.methods import MethodOptions
from gguf_moeify.plan import ModelPlan

from conftest import make_tiny_model
from test_llama_cpp_parity import _dense_reference_gguf, _routed_plans, _write

V = gguf.GGUFValueType
T = gguf.GGMLQuantizationType
CTX = 64
CRASH_MARKS = ("GGML_ASSERT", "GGML_ABORT", "Aborted", "core dumped", "fatal error", "Floating point exception")


def u32(v):
    return (v, V.UINT32)


def arr(values, sub=V.INT32):   # what gguf-py's add_array writes for Python ints: an int32 array
    return (list(values), V.ARRAY, sub)


@dataclass
class Mutation:
    name: str
    base: str                                          # "qwen3" or "llama"
    keys: dict = field(default_factory=dict)           # key -> None (drop) or (value, type[, sub_type])
    tensors: dict = field(default_factory=dict)        # name -> None (drop) or a function of the reader's tensors
    expect: str = "error"   # error: a clean load error; same: the base file's perplexity; runs: a finite one;
                            # runs-flagged: runs, but inspect --check flags it (what the loader cannot see)


def rewrite(src: Path, dst: Path, m: Mutation) -> Path:
    """``src`` with ``m``'s changes: every other field and tensor copied as it is."""
    reader = gguf.GGUFReader(src)
    tensors = {t.name: t for t in reader.tensors}
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    keys = dict(m.keys)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in keys:
            continue
        _copy_key(w, name, f.contents(), f.types)
    for name, change in keys.items():
        if change is not None:
            w.add_key_value(name, change[0], change[1], sub_type=change[2] if len(change) > 2 else None)
    new = {name: (None if make is None else make(tensors)) for name, make in m.tensors.items()}
    for t in reader.tensors:
        if t.name not in new:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for name, data in new.items():
        if data is not None:
            w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# tensor changes: functions of {name: ReaderTensor} (numpy shapes, the reverse of ggml's ne)
def data(name):
    return lambda ts: np.array(ts[name].data)


def cut(name, axis, n):
    return lambda ts: np.take(np.array(ts[name].data), range(n), axis=axis)


def grow(name, axis):
    return lambda ts: np.concatenate([np.array(ts[name].data)] * 2, axis=axis)


def retype(name, dtype):
    def make(ts):
        with np.errstate(over="ignore"):   # 2^100 is inf in f16: the type is what is wrong
            return np.array(ts[name].data).astype(dtype)
    return make


def half_of(name, part):   # gate rows (part 0) or up rows (part 1) of each expert of ffn_gate_up_exps (E, 2F, d)
    def make(ts):
        a = np.array(ts[name].data)
        f = a.shape[1] // 2
        return a[:, part * f:(part + 1) * f]
    return make


Q, L = "qwen3", "llama"
QA, LA = "qwen3.", "llama."
ALWAYS = "gguf_moeify.always_selected_experts"
# qwen3 base: E = 8 (expert 0 always selected), expert_used_count [3, 4] (i32 array), F = 32, linear router
# llama base: E = 7, expert_used_count 2, F = 32, MLP router (hidden 7), shared expert of 32 in its own tensors
MUTATIONS = [
    # expert_count
    Mutation("expert_count removed", Q, keys={QA + "expert_count": None}),
    Mutation("expert_count 0", Q, keys={QA + "expert_count": u32(0)}),
    Mutation("expert_count 9 (tensors have 8)", Q, keys={QA + "expert_count": u32(9)}),
    Mutation("expert_count 7 (tensors have 8)", Q, keys={QA + "expert_count": u32(7)}),
    Mutation("expert_count 2000 (> LLAMA_MAX_EXPERTS)", Q, keys={QA + "expert_count": u32(2000)}),
    Mutation("expert_count as f32", Q, keys={QA + "expert_count": (8.0, V.FLOAT32)}),
    Mutation("expert_count as i32", Q, keys={QA + "expert_count": (8, V.INT32)}),
    # expert_used_count
    Mutation("expert_used_count [0, 4]", Q, keys={QA + "expert_used_count": arr([0, 4])}),
    Mutation("expert_used_count [3, 9] (> expert_count)", Q, keys={QA + "expert_used_count": arr([3, 9])}),
    Mutation("expert_used_count [-1, 4] (u32 4294967295)", Q, keys={QA + "expert_used_count": arr([-1, 4])}),
    Mutation("expert_used_count array too short", Q, keys={QA + "expert_used_count": arr([3])}),
    Mutation("expert_used_count array too long", Q, keys={QA + "expert_used_count": arr([3, 4, 4])}),
    Mutation("expert_used_count array of f32", Q, keys={QA + "expert_used_count": arr([3.0, 4.0], V.FLOAT32)}),
    Mutation("expert_used_count scalar 0", Q, keys={QA + "expert_used_count": u32(0)}),
    Mutation("expert_used_count scalar 9", Q, keys={QA + "expert_used_count": u32(9)}),
    Mutation("expert_used_count removed", Q, keys={QA + "expert_used_count": None}),
    Mutation("expert_used_count scalar 4", Q, keys={QA + "expert_used_count": u32(4)}, expect="runs"),
    Mutation("expert_used_count as a u32 array", Q, keys={QA + "expert_used_count": arr([3, 4], V.UINT32)},
             expect="same"),
    Mutation("expert_used_count [1, 4] (layer 0: the shared expert only)", Q,
             keys={QA + "expert_used_count": arr([1, 4])}, expect="runs"),
    # always-selected experts and their selection bias
    Mutation("always_selected_experts 4 (> expert_used_count 3)", Q, keys={ALWAYS: u32(4)}),
    Mutation("always_selected_experts 8 (= expert_count)", Q, keys={ALWAYS: u32(8)}),
    Mutation("always_selected_experts as a string", Q, keys={ALWAYS: ("1", V.STRING)}),
    Mutation("always_selected_experts removed (bias kept)", Q, keys={ALWAYS: None}, expect="same"),
    Mutation("blk.0.exp_probs_b removed", Q, tensors={"blk.0.exp_probs_b.bias": None}),
    Mutation("exp_probs_b and always_selected_experts removed", Q, keys={ALWAYS: None},
             tensors={"blk.0.exp_probs_b.bias": None, "blk.1.exp_probs_b.bias": None}, expect="runs"),
    Mutation("exp_probs_b with 16 values", Q, tensors={"blk.0.exp_probs_b.bias": grow("blk.0.exp_probs_b.bias", 0)}),
    Mutation("exp_probs_b as f16", Q, tensors={"blk.1.exp_probs_b.bias": retype("blk.1.exp_probs_b.bias", np.float16)}),
    Mutation("exp_probs_b zeroed", Q, tensors={"blk.0.exp_probs_b.bias": lambda ts: np.zeros(8, np.float32)},
             expect="runs-flagged"),
    # expert widths
    Mutation("expert_feed_forward_length 0", Q, keys={QA + "expert_feed_forward_length": u32(0)}),
    Mutation("expert_feed_forward_length [32, 0]", Q, keys={QA + "expert_feed_forward_length": arr([32, 0])}),
    Mutation("expert_feed_forward_length 33", Q, keys={QA + "expert_feed_forward_length": u32(33)}),
    Mutation("expert_feed_forward_length [-1, 32]", Q, keys={QA + "expert_feed_forward_length": arr([-1, 32])}),
    Mutation("expert_feed_forward_length array too long", Q,
             keys={QA + "expert_feed_forward_length": arr([32, 32, 32])}),
    Mutation("expert_feed_forward_length removed (dense width)", Q, keys={QA + "expert_feed_forward_length": None}),
    Mutation("expert_feed_forward_length as an array", Q, keys={QA + "expert_feed_forward_length": arr([32, 32])},
             expect="same"),
    # router type and unit weights
    Mutation("expert_router_type 3", Q, keys={QA + "expert_router_type": u32(3)}),
    Mutation("expert_router_type 1 (no ffn_up_inp)", Q, keys={QA + "expert_router_type": u32(1)}),
    Mutation("expert_router_type 2 (no MLP tensors)", Q, keys={QA + "expert_router_type": u32(2)}),
    Mutation("expert_router_type as bool", Q, keys={QA + "expert_router_type": (False, V.BOOL)}),
    Mutation("expert_router_type removed (linear)", Q, keys={QA + "expert_router_type": None}, expect="same"),
    Mutation("expert_weights_unit as u32", Q, keys={QA + "expert_weights_unit": u32(1)}),
    Mutation("expert_weights_unit false", Q, keys={QA + "expert_weights_unit": (False, V.BOOL)}, expect="runs"),
    # per-token expert counts (patch 0018)
    Mutation("expert_count_per_token true (biases 0: thresholds at 0)", Q,
             keys={QA + "expert_count_per_token": (True, V.BOOL)}, expect="runs"),
    Mutation("expert_count_per_token as u32", Q, keys={QA + "expert_count_per_token": u32(1)}),
    Mutation("expert_count_per_token without unit weights", Q, keys={QA + "expert_count_per_token": (True, V.BOOL),
                                                                     QA + "expert_weights_unit": (False, V.BOOL)}),
    # expert tensors
    Mutation("blk.1.ffn_gate_inp removed", Q, tensors={"blk.1.ffn_gate_inp.weight": None}),
    Mutation("blk.0.ffn_down_exps removed", Q, tensors={"blk.0.ffn_down_exps.weight": None}),
    Mutation("blk.0.ffn_gate_up_exps removed", Q, tensors={"blk.0.ffn_gate_up_exps.weight": None}),
    Mutation("ffn_gate_up_exps with F rows", Q,
             tensors={"blk.0.ffn_gate_up_exps.weight": half_of("blk.0.ffn_gate_up_exps.weight", 0)}),
    Mutation("ffn_down_exps transposed", Q,
             tensors={"blk.1.ffn_down_exps.weight": lambda ts: np.array(ts["blk.1.ffn_down_exps.weight"].data)
                      .transpose(0, 2, 1)}),
    Mutation("ffn_gate_inp with 7 rows", Q, tensors={"blk.0.ffn_gate_inp.weight": cut("blk.0.ffn_gate_inp.weight",
                                                                                      0, 7)}),
    Mutation("gate and up as two tensors", Q, tensors={
        "blk.0.ffn_gate_up_exps.weight": None,
        "blk.0.ffn_gate_exps.weight": half_of("blk.0.ffn_gate_up_exps.weight", 0),
        "blk.0.ffn_up_exps.weight": half_of("blk.0.ffn_gate_up_exps.weight", 1)}, expect="same"),
    Mutation("gate and up both merged and separate", Q, tensors={
        "blk.0.ffn_gate_exps.weight": half_of("blk.0.ffn_gate_up_exps.weight", 0),
        "blk.0.ffn_up_exps.weight": half_of("blk.0.ffn_gate_up_exps.weight", 1)}),
    Mutation("expert_shared_feed_forward_length 32 without tensors", Q,
             keys={QA + "expert_shared_feed_forward_length": u32(32)}),
    Mutation("expert_shared_feed_forward_length as f32", Q,
             keys={QA + "expert_shared_feed_forward_length": (0.0, V.FLOAT32)}),
    # llama: MLP router, separate shared expert
    Mutation("MLP router: ffn_gate_inp_out.bias removed", L, tensors={"blk.0.ffn_gate_inp_out.bias": None}),
    Mutation("MLP router: ffn_gate_inp.bias as f16", L,
             tensors={"blk.1.ffn_gate_inp.bias": retype("blk.1.ffn_gate_inp.bias", np.float16)}),
    Mutation("MLP router: ffn_gate_inp_out with 14 hidden", L,
             tensors={"blk.0.ffn_gate_inp_out.weight": grow("blk.0.ffn_gate_inp_out.weight", 1)}),
    Mutation("MLP router: ffn_gate_inp with 14 hidden", L,
             tensors={"blk.0.ffn_gate_inp.weight": grow("blk.0.ffn_gate_inp.weight", 0)}),
    Mutation("MLP router: expert_router_type 0", L, keys={LA + "expert_router_type": u32(0)}),
    Mutation("shared expert: blk.1.ffn_down_shexp removed", L, tensors={"blk.1.ffn_down_shexp.weight": None}),
    Mutation("shared expert: expert_shared_feed_forward_length 0", L,
             keys={LA + "expert_shared_feed_forward_length": u32(0)}),
    Mutation("shared expert: expert_shared_feed_forward_length 64", L,
             keys={LA + "expert_shared_feed_forward_length": u32(64)}),
    Mutation("expert_count removed, unit weights kept", L, keys={LA + "expert_count": None,
                                                                LA + "expert_used_count": None}),
    Mutation("expert_used_count 7 (all experts)", L, keys={LA + "expert_used_count": u32(7)}, expect="runs"),
    Mutation("expert_weights_unit removed (softmax weights)", L, keys={LA + "expert_weights_unit": None},
             expect="runs"),
    Mutation("expert_count_per_token without exp_probs_b (the thresholds)", L,
             keys={LA + "expert_count_per_token": (True, V.BOOL)}),
]


@pytest.fixture(scope="module")
def tiny(spm_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """Both with the 512-token SentencePiece vocabulary: a file of 1 MB, rewritten in a few ms (SmolLM2's vocabulary
    takes gguf-py seconds to read)."""
    root = tmp_path_factory.mktemp("tiny-fuzz")
    return {arch: make_tiny_model(arch, root / arch, spm_tokenizer_dir, seed=i) for i, arch in enumerate((Q, L))}


@pytest.fixture(scope="module")
def bases(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    per_layer = _routed_plans("linear", top_k=2)

    def qwen3_plans(ckpt, adapter):   # per-layer budgets: expert_used_count is an array
        plans = per_layer(ckpt, adapter)
        return [plans[0], replace(plans[1], top_k=3)]

    _write(tiny[Q], qwen3_plans, root / "qwen3.gguf")
    ckpt = Checkpoint(tiny[L])
    adapter = adapter_for(ckpt.config)
    plan = ModelPlan.build(_routed_plans("mlp", top_k=2)(ckpt, adapter), shared_layout="separate")
    write_model_file(ckpt, adapter, plan, root / "llama.gguf", "f32",
                     provenance(ckpt, "test", MethodOptions(), "f32", "float32"), progress=False)
    return {"qwen3": root / "qwen3.gguf", "llama": root / "llama.gguf"}


def test_base_files_are_what_the_mutations_assume(bases):
    q, ll = gguf.GGUFReader(bases["qwen3"]).fields, gguf.GGUFReader(bases["llama"]).fields
    assert q[QA + "expert_count"].contents() == 8 and q[QA + "expert_used_count"].contents() == [3, 4]
    assert q[ALWAYS].contents() == 1 and q[QA + "expert_feed_forward_length"].contents() == 32
    assert ll[LA + "expert_count"].contents() == 7 and ll[LA + "expert_used_count"].contents() == 2
    assert ll[LA + "expert_router_type"].contents() == 2 and ALWAYS not in ll
    assert ll[LA + "expert_shared_feed_forward_length"].contents() == 32


@dataclass
class Outcome:
    rc: int
    output: str
    ppl: float | None

    @property
    def crashed(self) -> bool:   # a signal (negative, or 128+N through a shell), or an assert/abort message
        return self.rc < 0 or self.rc >= 128 or any(mark in self.output for mark in CRASH_MARKS)


def run_perplexity(tools, model: Path, text: Path) -> Outcome:
    cmd = [str(tools.tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(CTX), "-b", str(CTX),
           "-ub", str(CTX), "--chunks", "1", "-t", "2", "-fit", "off", "-ngl", "0"]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=120)
    except subprocess.TimeoutExpired:
        return Outcome(-999, "timed out", None)
    ppl = None
    if proc.returncode == 0:
        try:
            ppl = parse_perplexity_output(proc.stdout, proc.stderr).ppl
        except Exception:   # a run that printed no perplexity
            ppl = None
    return Outcome(proc.returncode, proc.stdout + proc.stderr, ppl)


def classify(m: Mutation, out: Outcome, base_ppl: float) -> str:
    """crash / clean error / correct run / wrong run (runs, but a file the contract refuses, or another result)."""
    if out.crashed:
        return "crash"
    if out.rc != 0:
        return "clean error"
    if out.ppl is None or not math.isfinite(out.ppl) or m.expect == "error":
        return "wrong run"
    if m.expect == "same" and relative_difference(out.ppl, base_ppl) > 1e-5:
        return "wrong run"
    return "correct run"


def test_mutated_files_load_cleanly_or_run_and_check_agrees(tools, bases, eval_excerpt, tmp_path):
    assert len(MUTATIONS) >= 30
    base_ppl = {}
    for name, path in bases.items():
        out = run_perplexity(tools, path, eval_excerpt)
        assert out.rc == 0 and out.ppl is not None and math.isfinite(out.ppl), out.output[-2000:]
        assert not check_file(str(path)).problems
        base_ppl[name] = out.ppl
    rows, failures = [], []
    for i, m in enumerate(MUTATIONS):
        path = rewrite(bases[m.base], tmp_path / f"m{i:02d}.gguf", m)
        out = run_perplexity(tools, path, eval_excerpt)
        verdict = classify(m, out, base_ppl[m.base])
        problems = check_file(str(path)).problems
        error = next((ln for ln in out.output.splitlines() if "error loading model" in ln), "")
        rows.append(f"{verdict:12s} rc={out.rc:<4d} check={len(problems)}  {m.name}  {error.strip()[:150]}")
        wanted = "clean error" if m.expect == "error" else "correct run"
        if verdict != wanted:
            failures.append(f"{m.name}: {verdict}, expected {wanted}\n{out.output[-1500:]}")
        elif verdict == "clean error" and not error:   # refused, but the reason must reach the user
            failures.append(f"{m.name}: refused without an 'error loading model' line\n{out.output[-1500:]}")
        flagged = bool(problems)
        if flagged != (m.expect in ("error", "runs-flagged")) or (out.rc != 0 and not flagged):
            failures.append(f"{m.name}: inspect --check problems {problems}, loader rc {out.rc}")
        path.unlink()
    counts = {v: sum(r.startswith(v) for r in rows) for v in ("clean error", "correct run", "crash", "wrong run")}
    print(f"\n{len(MUTATIONS)} mutated files: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    print("\n".join(rows))
    assert not failures, "\n\n".join(failures)


def test_override_kv_is_validated_too(tools, bases, eval_excerpt):
    """--override-kv replaces the file's expert_used_count after it was read: the check runs on what is used."""
    proc = subprocess.run([str(tools.tool("llama-perplexity")), "-m", str(bases["llama"]), "-f", str(eval_excerpt),
                           "-c", str(CTX), "--chunks", "1", "-t", "2", "-fit", "off",
                           "--override-kv", "llama.expert_used_count=int:0"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=120)
    assert proc.returncode == 1 and not any(mark in proc.stderr for mark in CRASH_MARKS), proc.stderr[-2000:]
    assert "llama.expert_used_count = 0 in layer 0" in proc.stderr


def test_inspect_check_good_bad_and_dense(bases, tiny, tmp_path, capsys):
    assert cli_main(["inspect", "--check", str(bases["qwen3"])]) == 0
    assert "ok: qwen3 with 8 experts" in capsys.readouterr().out
    zero = next(m for m in MUTATIONS if m.name == "expert_used_count [0, 4]")
    bad = rewrite(bases["qwen3"], tmp_path / "bad.gguf", zero)
    assert cli_main(["inspect", "--check", str(bad)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{bad}: qwen3.expert_used_count = 0 in layer 0: must be in 1..qwen3.expert_count (8)"]
    dense = _dense_reference_gguf(tiny[Q], tmp_path / "dense.gguf")
    assert cli_main(["inspect", "--check", str(dense)]) == 0
    assert "it has no experts" in capsys.readouterr().out


def test_inspect_survives_unreadable_provenance(bases, tmp_path, capsys):
    bad = rewrite(bases["llama"], tmp_path / "prov.gguf",
                  Mutation("provenance", L, keys={"gguf_moeify.provenance": ("{not json", V.STRING)}))
    assert cli_main(["inspect", str(bad)]) == 0
    out = capsys.readouterr().out
    assert "gguf_moeify.provenance: unreadable" in out and "blk.1:" in out
