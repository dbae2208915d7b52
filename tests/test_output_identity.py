"""Converted files stay byte-identical across refactoring: tiny random models converted with every method, runtime
target and file layout, hashed (sha256) and compared with the hashes the code of ``REFERENCE_COMMIT`` wrote.

The expected hashes (tests/data/output_hashes.json) were written by that commit on an x86 CPU. Another CPU may
round float32 products differently (fitted routers, f16 rounding of them), so when a hash differs the test converts
the same case with the reference commit's code on this machine (``git archive`` of its package into a temporary
folder) and compares with that instead: a change in the bytes is reported only when the old code, run here,
writes other bytes than the new. After an intended change of the output: set ``REFERENCE_COMMIT`` to the commit
that changes it and run ``python tests/test_output_identity.py --write [--cases A,B]`` (converts with that commit's
package). History: 695aa88 (before the ModelPlan refactor, whose files were identical), 79136ec (exact eigh up to
4096 neurons: the finegrained cases), 26819b5 (typed method options: only the provenance key changed, every tensor
and every other key identical in all cases), 5503d70 (default calibration 32 x 512: the recorded options of the
cases that leave them at their defaults, i.e. the provenance key of the mlpmoe and qwen3moe cases), de2fa53
(finegrained's --expert-counts and --max-experts: the provenance key of the finegrained cases, every tensor and
every other key identical), 8d827a9 (the ``calib_outtype`` option, recorded in the provenance key of every case; no
case calibrates through stored weights).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HASHES = ROOT / "tests" / "data" / "output_hashes.json"
REFERENCE_COMMIT = "8d827a9"   # the last commit that changed the output on purpose
CALIB = ("--calib", "calib.txt", "--calib-samples", "2", "--calib-seqlen", "64")
# (model, method and options): one per method, per stock architecture, per file layout and router dtype
CASES = {
    "llama-mlpmoe": ("llama", ["--method", "mlpmoe", "-E", "8"]),
    "llama-mlpmoe-slice-k2": ("llama", ["--method", "mlpmoe", "-E", "8", "-K", "2"]),
    "llama-cmoe": ("llama", ["--method", "cmoe", "--active", "0.5", *CALIB]),
    "llama-cmoe-separate-f16router": ("llama", ["--method", "cmoe", "--config", "S2A2E8", "--shared-layout",
                                                "separate", "--router-dtype", "f16", *CALIB]),
    "llama-moefication": ("llama", ["--method", "moefication", "--active", "0.5", *CALIB]),
    "llama-moefication-coact-mlp": ("llama", ["--method", "moefication", "--split", "coact", "--router", "mlp",
                                              "--active", "0.25", *CALIB]),
    "llama-finegrained": ("llama", ["--method", "finegrained", "--active", "0.5", *CALIB]),
    "llama-finegrained-mlp-budget": ("llama", ["--method", "finegrained", "--router", "mlp", "--router-hidden", "16",
                                               "--layer-budget", "sensitivity", "--active", "0.5", *CALIB]),
    "llama-tomoe": ("llama", ["--method", "tomoe", "-E", "4", "--train-steps", "3", "--seqlen", "32", *CALIB]),
    "llama-stock-deepseek": ("llama", ["--method", "cmoe", "--config", "S2A2E8", "--runtime", "stock", *CALIB]),
    "llama-stock-mixtral": ("llama", ["--method", "moefication", "--active", "0.5", "--runtime", "stock", *CALIB]),
    "llama-stock-tomoe": ("llama", ["--method", "tomoe", "-E", "4", "--train-steps", "3", "--seqlen", "32",
                                    "--runtime", "stock", *CALIB]),
    # qwen models carry a SentencePiece tokenizer that transformers 5 reads only through tiktoken: data-free cases
    "qwen3-stock-qwen3moe": ("qwen3", ["--method", "mlpmoe", "-E", "8", "--runtime", "stock"]),
    "qwen2-mlpmoe-slice-q8": ("qwen2", ["--method", "mlpmoe", "-E", "8", "-K", "2", "--outtype", "q8_0"]),
    "qwen2-mlpmoe-fractal-q4": ("qwen2", ["--method", "mlpmoe", "-E", "4", "--variant", "fractal-fade",
                                          "--outtype", "q4_0"]),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _workdir(base: Path, models: dict[str, Path], calib: Path) -> Path:
    """Relative paths only, so the provenance the file records does not depend on where the test runs."""
    base.mkdir(parents=True, exist_ok=True)
    for arch, src in models.items():
        if not (base / arch).exists():
            shutil.copytree(src, base / arch)
    shutil.copy(calib, base / "calib.txt")
    return base


def convert_case(name: str, work: Path, package_root: Path, env_extra: dict | None = None) -> str:
    """sha256 of the file the package under ``package_root`` writes for case ``name``."""
    arch, args = CASES[name]
    out = work / f"{name}.gguf"
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(package_root), **(env_extra or {})}
    cmd = [sys.executable, "-m", "gguf_moeify", "convert", arch, out.name, *args, "-q"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
    digest = _sha256(out)
    out.unlink()
    return digest


def reference_package(dest: Path) -> Path | None:
    """The package of REFERENCE_COMMIT extracted under ``dest`` (None without the git history)."""
    pkg = dest / "gguf_moeify"
    if pkg.is_dir():
        return dest
    archive = dest / "ref.tar"
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), REFERENCE_COMMIT, "gguf_moeify"],
                          capture_output=True)
    if proc.returncode != 0:
        return None
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="module")
def identity_work(tiny_models, tmp_path_factory):
    from conftest import calib_text_path
    return _workdir(tmp_path_factory.mktemp("identity") / "w",
                    {a: tiny_models[a] for a in ("llama", "qwen2", "qwen3")}, calib_text_path())


@pytest.mark.parametrize("name", sorted(CASES))
def test_file_bytes_unchanged(name, identity_work, tmp_path_factory):
    expected = json.loads(HASHES.read_text())[name]
    got = convert_case(name, identity_work, ROOT)
    if got == expected:
        return
    ref = reference_package(tmp_path_factory.getbasetemp() / "reference-package")
    if ref is None:
        pytest.fail(f"{name}: sha256 {got[:16]} differs from the recorded {expected[:16]} and the reference "
                    f"commit {REFERENCE_COMMIT} is not in this clone's history to recheck on this CPU")
    old = convert_case(name, identity_work, ref)
    assert got == old, (f"{name}: the file differs from what {REFERENCE_COMMIT}'s code writes on this machine "
                        f"(new {got[:16]}, old {old[:16]}, recorded {expected[:16]})")


if __name__ == "__main__":   # --write: record the hashes REFERENCE_COMMIT's code writes (run from the repo root)
    import argparse
    import tempfile
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from gguf_moeify.demo_model import build_smollm2_folder
    from gguf_moeify.llama_cpp_source import cache_root
    from conftest import build_spm_tokenizer, build_tiny_models, calib_text_path
    p = argparse.ArgumentParser()
    p.add_argument("--write", action="store_true", help="write tests/data/output_hashes.json")
    p.add_argument("--cases", default=None, help="only these cases (comma-separated), the others kept as recorded")
    args = p.parse_args()
    names = args.cases.split(",") if args.cases else sorted(CASES)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        smol = build_smollm2_folder(cache_root() / "models" / "smollm2-135m")
        models = build_tiny_models(d / "m", smol, build_spm_tokenizer(d / "spm"), archs=("llama", "qwen2", "qwen3"))
        work = _workdir(d / "w", models, calib_text_path())
        ref = reference_package(d / "ref")
        hashes = json.loads(HASHES.read_text()) if args.cases else {}
        for name in names:
            hashes[name] = convert_case(name, work, ref)
            print(name, hashes[name], flush=True)
        if args.write:
            HASHES.parent.mkdir(exist_ok=True)
            HASHES.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
