"""Every bad input gets one clear line on stderr, exit code 2, no traceback, and no output or temporary file."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_moeify.convert import convert
from gguf_moeify.errors import UserError
from gguf_moeify.methods import OWN_OPTIONS, CMoEOptions, MethodOptions

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gguf_moeify", *args], capture_output=True, text=True, env=env,
                          cwd=cwd)


def assert_clean_failure(proc: subprocess.CompletedProcess, folder: Path, expect: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expect in err, err
    assert not [p for p in folder.iterdir() if p.suffix in (".gguf", ".tmp") or p.name.startswith(".out")]


@pytest.fixture
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def _edited_model(src: Path, dest: Path, **config_changes) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(config_changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_missing_model_path(tmp_path):
    proc = run_cli(str(tmp_path / "nope"), str(tmp_path / "out.gguf"))
    assert_clean_failure(proc, tmp_path, "model not found")


def test_unknown_architecture(tiny_llama, tmp_path):
    model = _edited_model(tiny_llama, tmp_path / "m", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    proc = run_cli(str(model), str(tmp_path / "out.gguf"))
    assert_clean_failure(proc, tmp_path, "unsupported architecture model_type='gpt2'")
    assert "supported: llama" in proc.stderr and "qwen3" in proc.stderr


def test_mlp_not_gated_swiglu(tiny_llama, tmp_path):
    model = _edited_model(tiny_llama, tmp_path / "m", hidden_act="gelu")
    proc = run_cli(str(model), str(tmp_path / "out.gguf"))
    assert_clean_failure(proc, tmp_path, "unsupported MLP activation 'gelu'")


def test_experts_must_divide_intermediate_size(tiny_llama, tmp_path):
    proc = run_cli(str(tiny_llama), str(tmp_path / "out.gguf"), "--experts", "3")
    assert_clean_failure(proc, tmp_path, "does not divide the intermediate size 256")


def test_top_k_larger_than_routed_experts(tiny_llama, tmp_path):
    proc = run_cli(str(tiny_llama), str(tmp_path / "out.gguf"), "--experts", "8", "--shared", "2", "--top-k", "7")
    assert_clean_failure(proc, tmp_path, "--top-k 7 must be between 1 and the number of routed experts 6")


def test_shared_not_less_than_experts(tiny_llama, tmp_path):
    proc = run_cli(str(tiny_llama), str(tmp_path / "out.gguf"), "--experts", "4", "--shared", "4")
    assert_clean_failure(proc, tmp_path, "--shared 4 must be >= 0 and < --experts 4")


def test_option_of_another_method(tiny_llama, tmp_path):
    calib = tmp_path / "c.txt"
    calib.write_text("some calibration text " * 50)
    proc = run_cli(str(tiny_llama), str(tmp_path / "out.gguf"), "--method", "cmoe", "--calib", str(calib),
                   "--split", "coact")
    assert_clean_failure(proc, tmp_path, "--split is an option of --method moefication, not cmoe")
    proc = run_cli(str(tiny_llama), str(tmp_path / "out.gguf"), "--method", "moefication", "--calib", str(calib),
                   "--router", "linear")   # a choice of finegrained's --router, not of moefication's
    assert_clean_failure(proc, tmp_path, "--router 'linear' is not available for moefication; choose one of "
                                         "similarity, mlp")
    with pytest.raises(UserError, match="--ka belongs to --method cmoe, not moefication"):
        convert(str(tiny_llama), tmp_path / "out.gguf", "moefication",
                MethodOptions(experts=4, calib=str(calib), own=CMoEOptions(ka=3)), "f32", progress=False)
    assert list(tmp_path.iterdir()) == [calib]


def test_unwritable_output(tiny_llama, tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = run_cli(str(tiny_llama), str(tmp_path / "a_file" / "out.gguf"))
    assert_clean_failure(proc, tmp_path, "cannot write")
    proc = run_cli(str(tiny_llama), "/proc/out.gguf")   # unwritable even for root
    assert proc.returncode == 2 and "cannot write /proc/out.gguf" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_outtype(tiny_llama, tmp_path):
    proc = run_cli(str(tiny_llama), str(tmp_path / "out.gguf"), "--outtype", "q9_9")
    assert_clean_failure(proc, tmp_path, "invalid choice: 'q9_9'")


def test_failure_midway_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    """A crash while writing tensors (here: an injected error on layer 1) leaves no out.gguf and no temp file."""
    import gguf_moeify.gguf_writer as gw
    real = gw.expert_tensors

    def failing(plan, *a):
        if plan.layer == 1:
            raise UserError("injected failure")
        return real(plan, *a)

    monkeypatch.setattr(gw, "expert_tensors", failing)
    with pytest.raises(UserError, match="injected"):
        convert(str(tiny_llama), tmp_path / "out.gguf", "mlpmoe", MethodOptions(experts=4), "f32", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_help_names_every_option_with_default():
    proc = run_cli("convert", "--help")
    assert proc.returncode == 0
    for opt in ("--method", "--experts", "--shared", "--top-k", "--dtype", "--outtype"):
        assert opt in proc.stdout
    text = " ".join(proc.stdout.split())   # argparse wraps lines
    for cls in OWN_OPTIONS.values():        # every method's own flag, with the method's name and its default
        for f in dataclasses.fields(cls):
            if f.metadata["flag"]:
                default = f.metadata.get("default_text", f.default)
                assert f"{f.metadata['flag']} " in text and f"{cls.method}: " in text, f.name
                assert f"(default: {default})" in text, (f.name, default)
    assert proc.stdout.count("default") >= 7


def test_inspect_prints_layout(tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    assert run_cli(str(tiny_llama), str(out), "--experts", "4", "-q").returncode == 0
    proc = run_cli("inspect", str(out))
    assert proc.returncode == 0
    assert "expert_count: 4" in proc.stdout and "blk.1: ffn_gate_inp[4x64 F32]" in proc.stdout
    assert "ffn_gate_up_exps[4x128x64 F16]" in proc.stdout


def test_console_script_is_the_same_program(tmp_path):
    """`gguf-moeify` (installed by pip with the package) behaves as `python -m gguf_moeify`."""
    script = Path(sys.executable).parent / "gguf-moeify"
    if not script.is_file():
        pytest.skip(f"{script} not installed (pip install . installs it)")
    proc = subprocess.run([str(script), "convert", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: gguf-moeify convert MODEL OUT.gguf")
    assert "main options:" in proc.stdout and "--active FRACTION" in proc.stdout
    proc = subprocess.run([str(script), str(tmp_path / "nope"), str(tmp_path / "out.gguf")], capture_output=True,
                          text=True)
    assert_clean_failure(proc, tmp_path, "model not found")
