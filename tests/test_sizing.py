"""Expert counts come from the model's d_ff and the requested active fraction, the same for convert, eval, bench
and the quality table (sizing.expert_layout); explicit -E/-S win, and a d_ff other than SmolLM2's 1536 gets
valid defaults everywhere."""
from __future__ import annotations

import json

import gguf
import pytest

from gguf_moeify.bench import parse_configs
from gguf_moeify.bundled import CALIB_EXCERPT, EVAL_EXCERPT
from gguf_moeify.errors import UserError
from gguf_moeify.methods import MethodOptions, get_method, resolve_options
from gguf_moeify.sizing import expert_layout

from conftest import make_tiny_model
from test_cli_errors import assert_clean_failure, run_cli

D_FFS = (1536, 2816, 4864, 8192, 11008, 14336, 18944, 1000)
ROUTED = ("finegrained", "cmoe", "moefication", "mlpmoe")


@pytest.mark.parametrize("d_ff", D_FFS)
@pytest.mark.parametrize("method", ROUTED)
def test_layout_divides_d_ff_and_hits_the_fraction(method, d_ff):
    for f in (0.25, 0.5, 0.75):
        e, s, k = expert_layout(method, d_ff, f)
        assert d_ff % e == 0 and 0 <= s < e and 1 <= k <= e - s
        assert abs((s + k) / e - f) <= 0.5 / e + 1e-9, (method, d_ff, f, e, s, k)
        if method == "finegrained":
            assert e <= 512 and d_ff // e >= 32
        opts = MethodOptions(experts=e, shared=s, top_k=k, calib=None if method == "mlpmoe" else str(CALIB_EXCERPT))
        get_method(method).validate(opts, d_ff)   # what every command then checks


def test_resolve_options_from_active_and_explicit_overrides():
    r = resolve_options("finegrained", MethodOptions(experts=None, shared=None, active=0.5), 14336)
    assert (r.experts, r.shared, r.top_k) == (448, 74, 150)
    r = resolve_options("finegrained", MethodOptions(experts=None, shared=0, active=0.5), 14336)
    assert (r.experts, r.shared, r.top_k) == (448, 0, 224)          # -S 0: the routed experts keep the fraction
    r = resolve_options("cmoe", MethodOptions(experts=32, shared=None, active=0.25), 4864)
    assert (r.experts, r.shared, r.top_k) == (32, 4, 4)
    r = resolve_options("tomoe", MethodOptions(experts=None, shared=None, active=0.3), 4864)
    assert (r.experts, r.own.budget) == (8, 0.3)
    # no fraction: the methods' own defaults, as library callers always had them
    r = resolve_options("cmoe", MethodOptions(experts=None, shared=None), 4864)
    assert (r.experts, r.shared, r.top_k) == (8, 0, None)


def test_active_errors_are_one_line(tiny_models, tmp_path):
    model = tiny_models["llama"]
    for argv, expect in (
            (["--active", "1.5"], "--active 1.5 must be in (0, 1]"),
            (["--active", "0.5", "--top-k", "2"], "give one of them"),
            (["--method", "tomoe", "--active", "0.5", "--budget", "0.25", "--calib", str(CALIB_EXCERPT)],
             "disagree"),
            (["--method", "cmoe", "--active", "0.01", "--calib", str(CALIB_EXCERPT)], "less than one expert")):
        proc = run_cli(str(model), str(tmp_path / "out.gguf"), *argv)
        assert_clean_failure(proc, tmp_path, expect)


@pytest.fixture(scope="module")
def wide_model(smollm2_dir, tmp_path_factory):
    """One layer, d_ff 2816 (Qwen2.5-1.5B's ratio to a small hidden size): not SmolLM2's shapes."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("wide") / "m", smollm2_dir, num_hidden_layers=1,
                           intermediate_size=2816)


def _file_layout(path) -> tuple[int, int]:
    f = gguf.GGUFReader(path).fields
    return f["llama.expert_count"].contents(), f["llama.expert_used_count"].contents()


def test_convert_and_eval_pick_defaults_for_another_d_ff(wide_model, tmp_path):
    calib = ["--calib", str(CALIB_EXCERPT), "--calib-samples", "2", "--calib-seqlen", "64", "-q"]
    out = tmp_path / "fg.gguf"
    proc = run_cli(str(wide_model), str(out), "--method", "finegrained", "--active", "0.5", *calib)
    assert proc.returncode == 0, proc.stderr
    e, s, k = expert_layout("finegrained", 2816, 0.5)
    assert (e, s, k) == (88, 14, 30)
    assert _file_layout(out) == (e, s + k)        # the shared expert as S always-selected experts
    prov = json.loads(gguf.GGUFReader(out).fields["gguf_moeify.provenance"].contents())
    assert (prov["options"]["experts"], prov["options"]["shared"], prov["options"]["top_k"]) == (e, s, k)
    # no flags at all: cmoe at the default fraction, E the divisor of 2816 nearest 16
    out2 = tmp_path / "cmoe.gguf"
    assert run_cli(str(wide_model), str(out2), "--method", "cmoe", *calib).returncode == 0
    assert _file_layout(out2) == (16, 8)
    proc = run_cli("eval", str(wide_model), "--text", str(EVAL_EXCERPT), "--ctx", "64", "--chunks", "1", "--json",
                   "--method", "moefication", "--active", "0.25", *calib[:-1])
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["active_fraction"] == 0.25 and res["plan"]["experts"] == 16 and res["plan"]["top_k"] == 4


def test_bench_configs_for_another_d_ff():
    (fg, cm) = parse_configs("finegrained:0.5:q4_0,cmoe:25%:q8_0", synthetic=False, d_ff=2816)
    assert (fg.experts, fg.shared, fg.top_k) == (88, 14, 30)
    assert (cm.experts, cm.shared, cm.top_k) == (16, 2, 2)
    with pytest.raises(UserError, match="less than one expert"):
        parse_configs("finegrained:0.001:q4_0", synthetic=False, d_ff=2816)
