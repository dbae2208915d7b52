"""``python -m gguf_moeify bench``: the whole benchmark on a tiny model (two configurations), the configuration
syntax and its fraction mapping, SYNTHETIC files (layout, labels, bytes per token) and user errors."""
from __future__ import annotations

import json

import gguf
import pytest

from gguf_moeify.bench import main as bench_main
from gguf_moeify.bench import parse_configs
from gguf_moeify.sizing import expert_layout
from gguf_moeify.cli import main as cli_main
from gguf_moeify.errors import UserError
from gguf_moeify.synthetic import SHAPES, is_synthetic, write_synthetic
from gguf_moeify.weight_bytes import bytes_per_token

from conftest import eval_text_path

ROW_FIELDS = {"label", "method", "experts", "shared", "top_k", "active_fraction", "outtype", "file", "reused",
              "file_bytes", "bytes_per_token", "ppl", "kld", "kld_err", "top1", "top1_err", "pp_ts", "pp_ts_std",
              "tg_ts", "tg_ts_std", "peak_rss_mib", "tg_speedup", "bw_limit_speedup", "protocol", "synthetic"}


def _png_points(path) -> int:
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        im.load()
        return int(im.text["gguf_moeify.points"])


def test_whole_bench_on_tiny_model(tools, tiny_models, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(eval_text_path().read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    out = tmp_path / "out"
    argv = ["bench", str(tiny_models["llama"]), "--configs", "mlpmoe:1:q8_0,moefication:S0A4E8:q8_0",
            "--calib", str(text), "--calib-samples", "2", "--calib-seqlen", "64", "--text", str(text),
            "--ctx", "64", "--chunks", "4", "-p", "8", "-n", "4", "-r", "3", "-t", "2", "-o", str(out), "-q"]
    assert cli_main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["dense", "mlpmoe", "moefication"]
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["synthetic"] is False and r["outtype"] == "q8_0"
        assert r["ppl"] > 1 and r["kld"] >= 0 and 0 <= r["top1"] <= 1
        assert r["pp_ts"] > 0 and r["tg_ts"] > 0 and r["tg_ts_std"] >= 0 and r["peak_rss_mib"] > 1
        assert r["protocol"]["ctx"] == 64 and r["protocol"]["chunks"] == 4
        assert r["protocol"]["llama_bench"]["reps"] == 3
    dense, mlp, mf = rows
    # the speedups are the recorded figures' ratios to the dense row of the same outtype
    for r in (mlp, mf):
        assert r["tg_speedup"] == pytest.approx(r["tg_ts"] / dense["tg_ts"])
        assert r["pp_speedup"] == pytest.approx(r["pp_ts"] / dense["pp_ts"])
        assert r["bw_limit_speedup"] == pytest.approx(dense["bytes_per_token"] / r["bytes_per_token"])
        assert r["tg_ts"] == pytest.approx(sum(r["tg_samples"]) / 3) and len(set(r["tg_samples"])) > 1
    # all experts active is the dense function: same perplexity and (nearly) the same logits
    assert abs(mlp["ppl"] - dense["ppl"]) / dense["ppl"] < 1e-3
    assert mlp["kld"] < 0.01 and mlp["top1"] > 0.8
    assert (mf["experts"], mf["shared"], mf["top_k"], mf["active_fraction"]) == (8, 0, 4, 0.5)
    assert mf["bytes_per_token"] < dense["bytes_per_token"]
    # table: header, separator, one line per model
    md = (out / "results.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 3
    assert "| PPL |" in table[0] and "tg t/s" in table[0]
    assert table[2].startswith("| dense q8_0 |") and "moefication 50% (S0A4E8) q8_0" in table[4]
    assert _png_points(out / "plot.png") == 3

    # a second run reuses every file (recipes recorded in the GGUF / the dense sidecar)
    argv2 = argv[:]
    argv2[argv2.index("-n") + 1] = "2"
    assert cli_main(argv2) == 0
    rows2 = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["reused"] for r in rows2)


def test_speedups_and_table_come_from_the_recorded_figures():
    """Speedups over the dense row of the same outtype, from distinct hand-set figures: measured tokens/s ratios,
    the bandwidth limit (dense bytes per token / the row's) and the measured decode speedup as a share of it."""
    from gguf_moeify.bench.report import markdown_table
    from gguf_moeify.bench.runs import speed_fields

    def row(label, method, outtype, pp, tg, bpt):
        return {"label": label, "method": method, "outtype": outtype, "active_fraction": 0.5, "file_bytes": 2**20,
                "pp_ts": pp, "pp_ts_std": 1.0, "tg_ts": tg, "tg_ts_std": 0.5, "bytes_per_token": bpt,
                "peak_rss_mib": 100.0, "ppl": 10.0, "kld": 0.1, "kld_err": 0.01, "top1": 0.9, "top1_err": 0.01}
    dense8, dense4 = row("dense q8_0", "dense", "q8_0", 200.0, 40.0, 1000), row("dense q4_0", "dense", "q4_0",
                                                                                 300.0, 60.0, 600)
    moe8, moe4 = row("cmoe q8_0", "cmoe", "q8_0", 160.0, 50.0, 400), row("cmoe q4_0", "cmoe", "q4_0",
                                                                          210.0, 90.0, 200)
    rows = [dense8, dense4, moe8, moe4]
    for r in rows:
        speed_fields(r, {"q8_0": dense8, "q4_0": dense4})
    assert (moe8["tg_speedup"], moe8["pp_speedup"], moe8["bw_limit_speedup"]) == (1.25, 0.8, 2.5)
    assert moe8["tg_vs_limit"] == pytest.approx(0.5)
    assert (moe4["tg_speedup"], moe4["pp_speedup"], moe4["bw_limit_speedup"]) == (1.5, 0.7, 3.0)
    table = markdown_table(rows).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:] if line.startswith("|")]
    col = [c.strip() for c in table[0].strip("|").split("|")].index("tg vs dense")
    assert [c[col] for c in cells] == ["1.00x", "1.00x", "1.25x", "1.50x"]
    # the frontier: cmoe q4_0 is fastest; dense q8_0 has the lowest perplexity; cmoe q8_0 is beaten by cmoe q4_0
    # (faster, same perplexity), dense q4_0 by cmoe q4_0 (faster, lower perplexity)
    for r, ppl in zip(rows, (9.0, 12.0, 11.0, 11.0)):
        r["ppl"] = ppl
    front = [c[-1] for c in ([c.strip() for c in line.strip("|").split("|")]
                             for line in markdown_table(rows).splitlines()[2:6])]
    assert front == ["**yes**", "", "", "**yes**"]
    from gguf_moeify.bench.report import on_frontier
    assert on_frontier([*rows, {"tg_ts": 95.0, "ppl": None}]) == [True, False, False, True, False]


def test_config_syntax_and_fraction_mapping():
    cs = parse_configs("mlpmoe:1:q8_0, cmoe:0.25:q4_0,cmoe:50%:q4_0,moefication:0.75:q8_0,cmoe:S1A3E16:q8_0",
                       synthetic=False, d_ff=1536)
    assert [(c.method, c.shared, c.top_k, c.experts, c.outtype) for c in cs] == [
        ("mlpmoe", 0, 8, 8, "q8_0"), ("cmoe", 2, 2, 16, "q4_0"), ("cmoe", 4, 4, 16, "q4_0"),
        ("moefication", 0, 12, 16, "q8_0"), ("cmoe", 1, 3, 16, "q8_0")]
    assert [c.active_fraction for c in cs] == [1.0, 0.25, 0.5, 0.75, 0.25]
    assert expert_layout("cmoe", 1536, 0.75) == (16, 6, 6)
    assert expert_layout("moefication", 1536, 0.25, 8) == (8, 0, 2)
    assert expert_layout("mlpmoe", 1536, 0.5) == expert_layout("cmoe", 1536, 0.5)   # the baseline, same top-k
    assert expert_layout("finegrained", 1536, 0.5) == (48, 8, 16)
    assert [(c.top_k, c.experts) for c in parse_configs("moe:0.25:q4_0,moe:0.5:q4_0", synthetic=True,
                                                        d_ff=8192)] == [(4, 16), (8, 16)]
    for bad in ("cmoe:0.25", "foo:0.5:q8_0", "cmoe:0.5:q9_9", "cmoe:1.5:q8_0", "mlpmoe:0.5:f64",
                "cmoe:S16A1E16:q8_0", "cmoe:0.01:q8_0", "cmoe:0.5:q8_0,cmoe:50%:q8_0", "cmoe:x:q8_0"):
        with pytest.raises(UserError):
            parse_configs(bad, synthetic=False, d_ff=1536)
    with pytest.raises(UserError):
        parse_configs("cmoe:0.5:q4_0", synthetic=True, d_ff=1536)
    (t,) = parse_configs("tomoe:25%:q4_0", synthetic=False, d_ff=1536)
    assert (t.experts, t.top_k, t.active_fraction, t.slug) == (8, 1, 0.25, "tomoe-E8p0.25")
    for bad in ("tomoe:S1A1E8:q4_0", "tomoe:0.5:q4_0,tomoe:50%:q4_0"):
        with pytest.raises(UserError):
            parse_configs(bad, synthetic=False, d_ff=1536)


def test_user_errors_are_one_line(tmp_path, capsys):
    for argv in (["bench", "--configs", "mlpmoe:1:q8_0"],                                  # no model
                 ["bench", str(tmp_path / "missing"), "--configs", "mlpmoe:1:q8_0", "--text", "x"],
                 ["bench", "--synthetic", "1b", "--configs", "moe:0.25:q4_0", "-r", "2"],  # reps < 3
                 ["bench", "--synthetic", "1b", "--configs", "cmoe:0.25:q4_0"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "Traceback" not in err


def test_synthetic_files_layout_and_bandwidth(tmp_path, monkeypatch):
    import gguf_moeify.demo_model as demo_model

    def no_real_model():
        raise AssertionError("synthetic files must not need the embedded model")
    monkeypatch.setattr(demo_model, "embedded_gguf_path", no_real_model)
    shape = SHAPES["tiny"]
    dense = write_synthetic(tmp_path / "d.gguf", shape, "q4_0")
    moe = write_synthetic(tmp_path / "m.gguf", shape, "q4_0", experts=16, top_k=4)
    assert is_synthetic(dense) and is_synthetic(moe)
    r = gguf.GGUFReader(moe)
    assert r.fields["general.name"].contents().startswith("SYNTHETIC")
    assert r.fields["llama.expert_weights_unit"].contents() is True
    assert int(r.fields["llama.expert_count"].contents()) == 16
    assert int(r.fields["llama.expert_feed_forward_length"].contents()) == shape.n_ff // 16
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"   # generated: no real tokenizer needed
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == shape.n_vocab
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.ffn_gate_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    bd, bm = bytes_per_token(dense), bytes_per_token(moe)
    assert bm["experts_active"] * 4 == bm["experts_all"] == bd["dense_ffn"]
    assert bm["attention"] == bd["attention"] and bm["output"] == bd["output"]
    assert bm["total"] == bd["total"] - bd["dense_ffn"] + bm["experts_active"] + bm["router"]
    half = write_synthetic(tmp_path / "m16.gguf", shape, "q4_0", experts=16, top_k=4, router_dtype="f16")
    r16 = gguf.GGUFReader(half)
    assert {x.name: x for x in r16.tensors}["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert json.loads(r16.fields["gguf_moeify.synthetic_recipe"].contents())["router_dtype"] == "f16"
    assert bytes_per_token(half)["router"] * 2 == bm["router"]
    with pytest.raises(UserError, match="f32 or f16"):
        write_synthetic(tmp_path / "m8.gguf", shape, "q4_0", experts=16, top_k=4, router_dtype="q8_0")


def test_bytes_per_token_reads_per_layer_expert_counts(tmp_path):
    """Per-layer budgets write expert_used_count as an array: each layer's experts count with its own K / E."""
    import numpy as np
    out = tmp_path / "budget.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_expert_count(4)
    w.add_array("llama.expert_used_count", [1, 3])
    w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", np.zeros((4, 8, 8), np.float32))   # 1024 bytes each
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    b = bytes_per_token(out)
    assert b["experts_all"] == 2048 and b["experts_active"] == 256 + 768 and b["top_k"] == [1, 3]


def test_synthetic_bench_speed_only(tools, tmp_path):
    out = tmp_path / "syn"
    assert bench_main(["--synthetic", "tiny", "--configs", "moe:0.25:q4_0", "-p", "8", "-n", "4", "-t", "1",
                       "-o", str(out), "-q"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["synthetic"] and r["label"].startswith("SYNTHETIC") for r in rows)
    assert "ppl" not in rows[1] and rows[1]["bw_limit_speedup"] > 1 and rows[1]["tg_vs_limit"] > 0
    md = (out / "results.md").read_text()
    assert "SYNTHETIC" in md and "Bandwidth limit" in md
    assert _png_points(out / "plot.png") == 2


def test_decode_profile_sorts_nodes_into_parts_and_bounds_moe():
    """The profiling build's NODE_TIMER totals (scripts/profile_decode.py): each node type goes to its part (the
    residual add and norm around the MLP and a ROPE on Qcur are not MLP or attention products), shares add up to 1,
    time per token counts the output projection's calls, and the bound is Amdahl's law on the MLP share."""
    from gguf_moeify.decode_profile import moe_speedup_bound, parse
    stderr = "\n".join([
        "llama-bench: some other line",
        "NODE_TIMER MUL_MAT:result_output                    300 us  30.00% n=3",
        "NODE_TIMER MUL_MAT_ID:ffn_moe_gate_up               200 us  20.00% n=90",
        "NODE_TIMER MUL_MAT:ffn_moe_logits                    50 us   5.00% n=90",
        "NODE_TIMER ARGSORT:ffn_moe_argsort                   50 us   5.00% n=90",
        "NODE_TIMER ADD:ffn_inp                               40 us   4.00% n=90",
        "NODE_TIMER MUL:ffn_norm                              10 us   1.00% n=90",
        "NODE_TIMER MUL_MAT:Qcur                             150 us  15.00% n=90",
        "NODE_TIMER MUL_MAT:attn_out                          50 us   5.00% n=90",
        "NODE_TIMER ROPE:Qcur                                 50 us   5.00% n=90",
        "NODE_TIMER RMS_NORM:norm                            100 us  10.00% n=180",
    ])
    r = parse(stderr)
    assert r["us_per_token"] == pytest.approx(1000 / 3)
    assert r["shares"] == pytest.approx({"mlp": 0.3, "output": 0.3, "attention": 0.2, "other": 0.2})
    assert moe_speedup_bound(0.4, 0.5) == pytest.approx(1.25) and moe_speedup_bound(0.4, 1.0) == 1.0
    with pytest.raises(ValueError, match="NODE_TIMER"):
        parse("llama-bench output without the timer")
