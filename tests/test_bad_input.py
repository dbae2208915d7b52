"""Bad input and faults: each ends as one ``error:`` line with exit code 2 (128 + N for a signal), no traceback,
nothing left behind, and no source or earlier output lost. The cases are the rows of the tables below; their
count is what docs/robustness.md reports."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gguf_moeify.bundled import CALIB_EXCERPT, EVAL_EXCERPT

from conftest import make_tiny_model
from test_cli_errors import ROOT, assert_clean_failure, run_cli

FAST = ("--experts", "4", "-q")   # mlpmoe slicing: no data, a second or two


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def model(tiny_models, tmp_path) -> Path:
    """A private copy of the tiny llama model that a case may break."""
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "model"))


def _config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def _tensors(model: Path, edit) -> None:
    f = model / "model.safetensors"
    t = load_file(f)
    edit(t)
    save_file(t, f, metadata={"format": "pt"})


def _shard(model: Path) -> dict:
    """Split the checkpoint into two shards with an index; returns the index."""
    t = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(t)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: t[n] for n in part}, model / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


# (case id, how to break the model folder, expected message)
MODEL_CASES = [
    ("truncated-safetensors", lambda m: (m / "model.safetensors").write_bytes(
        (m / "model.safetensors").read_bytes()[:100_000]), "not a readable safetensors file"),
    ("garbage-safetensors", lambda m: (m / "model.safetensors").write_bytes(os.urandom(4096)),
     "not a readable safetensors file"),
    ("empty-safetensors", lambda m: (m / "model.safetensors").write_bytes(b""), "not a readable safetensors"),
    ("tensor-wrong-shape", lambda m: _tensors(m, lambda t: t.update(
        {"model.layers.1.mlp.up_proj.weight": torch.zeros(128, 64)})), "has shape [128, 64], but config.json"),
    ("tensor-transposed", lambda m: _tensors(m, lambda t: t.update(
        {"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 32)})), "has shape [64, 32]"),
    ("tensor-int-dtype", lambda m: _tensors(m, lambda t: t.update(
        {"model.layers.0.mlp.gate_proj.weight": torch.zeros(256, 64, dtype=torch.int8)})),
     "is I8; only float weights"),
    ("tensor-missing", lambda m: _tensors(m, lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
     "tensor model.layers.1.mlp.down_proj.weight missing"),
    ("config-list", lambda m: (m / "config.json").write_text("[1, 2]"), "expected a JSON object, found list"),
    ("config-not-json", lambda m: (m / "config.json").write_text("{model_type: llama"), "not valid JSON"),
    ("config-binary", lambda m: (m / "config.json").write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
    ("config-no-intermediate-size", lambda m: _config(m, intermediate_size=None), "intermediate_size is missing"),
    ("config-intermediate-size-string", lambda m: _config(m, intermediate_size="256"),
     "intermediate_size is '256', not a positive integer"),
    ("config-zero-layers", lambda m: _config(m, num_hidden_layers=0), "num_hidden_layers is 0"),
    ("config-hidden-mismatch", lambda m: _config(m, hidden_size=128), "but config.json implies"),
    ("config-d_ff-mismatch", lambda m: _config(m, intermediate_size=512), "but config.json implies [512, 64]"),
    ("config-more-layers", lambda m: _config(m, num_hidden_layers=3), "model.layers.2."),
    ("config-kv-heads", lambda m: _config(m, num_key_value_heads=3), "num_key_value_heads 3 must divide"),
    ("config-vocab-mismatch", lambda m: _config(m, vocab_size=1000), "but config.json implies [1000, 64]"),
    ("config-missing", lambda m: (m / "config.json").unlink(), "no config.json"),
    ("no-weights", lambda m: (m / "model.safetensors").unlink(), "no *.safetensors weights"),
    ("index-missing-shard", lambda m: (_shard(m), (m / "model-00002-of-00002.safetensors").unlink()),
     "names the shard model-00002-of-00002.safetensors, which is not in"),
    ("index-not-json", lambda m: (_shard(m), (m / "model.safetensors.index.json").write_text("{oops")),
     "not valid JSON"),
    ("index-no-weight-map", lambda m: (_shard(m), (m / "model.safetensors.index.json").write_text('{"a": 1}')),
     "no \"weight_map\""),
    ("index-truncated-shard", lambda m: (_shard(m), (m / "model-00001-of-00002.safetensors").write_bytes(
        (m / "model-00001-of-00002.safetensors").read_bytes()[:5000])), "not a readable safetensors file"),
]


@pytest.mark.parametrize("case,break_model,expect", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_broken_checkpoint_is_one_line(model, tmp_path, case, break_model, expect):
    break_model(model)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli(str(model), str(out_dir / "out.gguf"), *FAST)
    assert_clean_failure(proc, out_dir, expect)


def test_sharded_checkpoint_still_converts(model, tmp_path):
    """The control for the index cases above: a well-formed sharded checkpoint converts."""
    _shard(model)
    proc = run_cli(str(model), str(tmp_path / "out.gguf"), *FAST)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "tokenizer.json", "sub/out.gguf"])
def test_output_inside_the_model_folder_is_refused(model, target):
    (model / "sub").mkdir()
    before = _digest(model)
    proc = run_cli(str(model), str(model / target), *FAST)
    assert proc.returncode == 2 and "inside the model folder" in proc.stderr, proc.stderr
    assert _digest(model) == before and not list((model / "sub").iterdir())


def test_existing_non_gguf_output_is_kept(model, tmp_path):
    victim = tmp_path / "notes.gguf"
    victim.write_text("not a model")
    proc = run_cli(str(model), str(victim), *FAST)
    assert_clean_failure(proc, tmp_path / "model", "exists and is not a GGUF file")
    assert victim.read_text() == "not a model"


def test_existing_gguf_output_is_replaced(model, tmp_path):
    out = tmp_path / "out.gguf"
    assert run_cli(str(model), str(out), *FAST).returncode == 0
    first = out.read_bytes()
    assert run_cli(str(model), str(out), "--experts", "2", "-q").returncode == 0
    assert out.read_bytes() != first and out.read_bytes()[:4] == b"GGUF"


CALIB_CASES = [
    ("binary", os.urandom(2000) + b"\0", "is not text (a NUL byte"),
    ("latin-1", "Caf\xe9 au lait, cr\xe8me br\xfbl\xe9e. ".encode("latin-1") * 50, "is not UTF-8 (byte 0xe9"),
    ("empty-folder", None, "folder has no *.txt files"),
]


@pytest.mark.parametrize("case,data,expect", CALIB_CASES, ids=[c[0] for c in CALIB_CASES])
def test_bad_calibration_text_is_refused(model, tmp_path, case, data, expect):
    calib = tmp_path / "calib"
    if data is None:
        calib.mkdir()
    else:
        calib.write_bytes(data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli(str(model), str(out_dir / "out.gguf"), "--method", "finegrained", "--calib", str(calib), "-q")
    assert_clean_failure(proc, out_dir, expect)


@pytest.mark.parametrize("argv,expect", [
    (["--ctx", "0"], "--ctx must be >= 16"),
    (["--chunks", "0"], "--chunks >= 1"),
    (["--text", "BINARY"], "is not text"),
], ids=["ctx-0", "chunks-0", "binary-text"])
def test_eval_bad_arguments(model, tmp_path, argv, expect):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\0\1\2" * 100)
    argv = [str(binary) if a == "BINARY" else a for a in argv]
    if "--text" not in argv:
        argv = ["--text", str(EVAL_EXCERPT), *argv]
    proc = run_cli("eval", str(model), *argv, "--experts", "4")
    assert_clean_failure(proc, tmp_path, expect)


@pytest.mark.parametrize("where,attr,exc,expect", [
    ("writer", "write_tensor_data", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ("os", "replace", PermissionError(errno.EACCES, "Permission denied", "out.gguf"), "Permission denied: out.gguf"),
    ("writer", "write_header_to_file", OSError(errno.EIO, "Input/output error"), "Input/output error"),
], ids=["disk-full", "rename-fails", "io-error"])
def test_io_faults_keep_the_old_output(model, tmp_path, monkeypatch, capsys, where, attr, exc, expect):
    """In this process, so the fault can be injected: the write (gguf-py's writer) or the final rename fails."""
    import gguf

    import gguf_moeify.convert as convert_module
    from gguf_moeify.cli import main
    out = tmp_path / "out.gguf"
    assert main([str(model), str(out), *FAST]) == 0
    old = out.read_bytes()
    capsys.readouterr()

    def failing(*a, **k):
        raise exc
    monkeypatch.setattr({"writer": gguf.GGUFWriter, "os": convert_module.os}[where], attr, failing)
    code, err = main([str(model), str(out), "--experts", "2", "-q"]), capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and expect in err and len(err.splitlines()) == 1, err
    assert out.read_bytes() == old
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".tmp.q"))]


@pytest.fixture(scope="module")
def slow_model(smollm2_dir, tmp_path_factory) -> Path:
    """Wide enough that calibrating finegrained takes a few seconds: time to send a signal mid-run."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("slow") / "m", smollm2_dir, num_hidden_layers=4,
                           intermediate_size=2048)


def _default_sigint():
    """A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored (as a program should):
    the child converts as if run from a terminal, whatever started the test run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT"])
def test_signal_while_converting_leaves_nothing(slow_model, tmp_path, sig):
    out = tmp_path / "out.gguf"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gguf_moeify", str(slow_model), str(out), "--method",
                             "finegrained", "--calib", str(CALIB_EXCERPT), "--calib-samples", "8",
                             "--calib-seqlen", "512", "-q"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]:   # the run has started writing
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"error: interrupted ({sig.name})" or \
        (sig == signal.SIGINT and err.strip().splitlines()[-1] == "error: interrupted"), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_interrupt_inside_exec_still_exits_128_plus_signal(tmp_path):
    """CPython ends a process by SIGINT, whatever it returns, once a KeyboardInterrupt has passed through an
    exec() of a string; the signal can land in one (a lazy import defining a dataclass), and the exit status must
    still say which signal ended the run."""
    # run as `python -m` (as a user does): only that path ends through the flag the exec() sets
    (tmp_path / "interrupted_run.py").write_text(
        "import runpy, gguf_moeify.cli as cli\n"
        "cli._run = lambda args: exec(\"raise KeyboardInterrupt('SIGHUP')\")\n"
        "runpy.run_module('gguf_moeify', run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    proc = subprocess.run([sys.executable, "-m", "interrupted_run", "m", str(tmp_path / "o.gguf")], env=env,
                          capture_output=True, text=True, preexec_fn=_default_sigint)
    assert proc.returncode == 128 + signal.SIGHUP, proc.stderr
    assert proc.stderr.strip() == "error: interrupted (SIGHUP)"


def test_stale_temp_files_of_killed_runs_are_removed(model, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                      # a pid that no longer runs
    stale = [tmp_path / f".out.gguf.{dead.pid}.abc123_x.tmp", tmp_path / f".out.gguf.{dead.pid}.abc123_x.tmp.q"]
    alive = tmp_path / f".out.gguf.{os.getpid()}.zzz.tmp"          # a run in progress (this process)
    other = [tmp_path / f".other.gguf.{dead.pid}.abc.tmp", tmp_path / ".out.gguf.notapid.tmp",
             tmp_path / "notes.tmp"]                                 # not ours for this output
    for f in stale + [alive] + other:
        f.write_bytes(b"x" * 100)
    assert run_cli(str(model), str(tmp_path / "out.gguf"), *FAST).returncode == 0
    assert not any(f.exists() for f in stale)
    assert alive.exists() and all(f.exists() for f in other)
