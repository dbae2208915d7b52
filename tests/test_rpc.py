"""llama.cpp's RPC backend: a routed file whose every layer runs on ``ggml-rpc-server`` (on 127.0.0.1, started here)
gives the perplexity of the same build run locally.

The client (libllama: the graph-level patches, the loader's checks) builds the graph; the server computes it with
its CPU backend on buffers of that backend's default type (ggml-rpc.cpp's ``rpc_server::alloc_buffer``), never the
repacked ones, so the CPU patches for repacked weights (decode paths, the sum inside the down product) do not run
there. Hence the comparison: q8_0 (not repacked on x86: the same kernels on both sides) and f32 exactly, q4_0 against
the local run with ``--no-repack`` exactly (and near the repacked local run)."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest

from gguf_moeify.cli import main as cli_main
from gguf_moeify.llama_cpp import relative_difference

from conftest import calib_text_path, llama_cpp_or_skip
from test_llama_cpp_parity import CHUNKS, CTX, F32_KV

THREADS = 2


@pytest.fixture(scope="module")
def rpc_tools():
    tools = llama_cpp_or_skip("rpc")
    if not tools.has("ggml-rpc-server"):
        pytest.skip(f"no ggml-rpc-server in {tools.bin_dir}; build it with: bash scripts/build_llama_cpp.sh cpu --rpc")
    return tools


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_server(rpc_tools, tmp_path_factory):
    """A ggml-rpc-server on 127.0.0.1 (its CPU backend); yields "host:port", stopped at the end. Its log goes to a
    file (a pipe nobody reads could fill and stall it)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("rpc-server") / "server.log"
    server = [*rpc_tools.runner, str(rpc_tools.tool("ggml-rpc-server"))]
    with open(log, "w") as f:
        proc = subprocess.Popen(server + ["-H", "127.0.0.1", "-p", str(port), "-t", str(THREADS)],
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"ggml-rpc-server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def routed_files(tiny_models, tmp_path_factory):
    """A tiny llama converted with the default recipe at 50% active (finegrained: shared expert as always-selected
    experts, linear router), as f32, q8_0 and q4_0."""
    d = tmp_path_factory.mktemp("rpc")
    files = {}
    for outtype in ("f32", "q8_0", "q4_0"):
        out = d / f"routed-{outtype}.gguf"
        code = cli_main([str(tiny_models["llama"]), str(out), "--method", "finegrained", "--active", "0.5",
                         "--calib", str(calib_text_path()), "--calib-samples", "2", "--calib-seqlen", "128",
                         "--outtype", outtype, "-q"])
        assert code == 0
        files[outtype] = out
    return files


def _ppl(tools, model, text_file, extra):
    return tools.perplexity(model, text_file, ctx=CTX, chunks=CHUNKS, threads=THREADS, extra=F32_KV + extra)


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_0"])
def test_rpc_server_computes_the_local_perplexity(rpc_tools, rpc_server, routed_files, eval_excerpt, outtype):
    model = routed_files[outtype]
    remote = _ppl(rpc_tools, model, eval_excerpt, ["--rpc", rpc_server, "-ngl", "99"])
    local = _ppl(rpc_tools, model, eval_excerpt, ["--no-repack"] if outtype == "q4_0" else [])
    print(f"{outtype}: over RPC {remote.ppl:.6f}, local {local.ppl:.6f}", end="")
    assert remote.n_chunks == local.n_chunks == CHUNKS
    assert (remote.chunk_ppls, remote.ppl) == (local.chunk_ppls, local.ppl), (outtype, remote.ppl, local.ppl)
    if outtype == "q4_0":   # the repacked local run: other kernels, the same function up to float rounding
        repacked = _ppl(rpc_tools, model, eval_excerpt, [])
        print(f", local repacked {repacked.ppl:.6f}", end="")
        assert relative_difference(repacked.ppl, remote.ppl) < 1e-3, (repacked.ppl, remote.ppl)
