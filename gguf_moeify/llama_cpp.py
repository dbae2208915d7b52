"""Run the llama.cpp tools built by ``scripts/build_llama_cpp.sh`` and parse what they print.

Three builds live in the project folder: the patched runtime (``build/llama-cpp/bin``, patches/ applied: unit expert
weights, shared experts, router types), stock llama.cpp (``build/llama-cpp-stock/bin``) and the patched one with the
RPC backend (``build/llama-cpp-rpc/bin``). ``find_llama_cpp`` finds one of them (``GGUF_MOEIFY_LLAMA_BIN`` /
``_STOCK_BIN`` / ``_RPC_BIN`` override the folder; ``GGUF_MOEIFY_LLAMA_RUNNER`` runs the tools under an emulator,
``GGUF_MOEIFY_LLAMA_NGL`` offloads layers) and returns a ``LlamaCppTools`` whose methods run the binaries in a
subprocess (the module is long because it runs and parses five tools, each with its own output format):

- ``perplexity`` (llama-perplexity): running per-chunk estimates, the final estimate, and optionally the logits
  saved for a later KL-divergence run; ``kl_divergence`` compares a model with such saved logits.
- ``bench`` (llama-bench ``-o json``: tokens/s of prompt processing and decoding, and the peak memory of the
  llama-bench process), ``quantize`` (llama-quantize), ``completion`` (llama-completion, greedy, non-interactive).

``PerplexityResult`` is also what the torch reference (``evaluate.perplexity``) returns, so the figures of both
compare field by field.

No torch here: this module is used by the CLI's evaluation and by the runtime tests.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = "bash scripts/build_llama_cpp.sh"

# A command the tools run under, e.g. "qemu-aarch64 -cpu max" for a cross-compiled aarch64 build (emulated ARM)
RUNNER_ENV = "GGUF_MOEIFY_LLAMA_RUNNER"
# Layers the tools offload to a GPU (-ngl); 0, the CPU only, unless set (e.g. 99 to check a CUDA build)
NGL_ENV = "GGUF_MOEIFY_LLAMA_NGL"

VARIANTS = {
    # variant: (env override, folder under the project, build command)
    "patched": ("GGUF_MOEIFY_LLAMA_BIN", PROJECT_ROOT / "build" / "llama-cpp" / "bin", BUILD_SCRIPT),
    "stock": ("GGUF_MOEIFY_LLAMA_STOCK_BIN", PROJECT_ROOT / "build" / "llama-cpp-stock" / "bin",
              BUILD_SCRIPT + " --stock"),
    # the patched series with llama.cpp's RPC backend and its rpc-server (a model spread over machines)
    "rpc": ("GGUF_MOEIFY_LLAMA_RPC_BIN", PROJECT_ROOT / "build" / "llama-cpp-rpc" / "bin", BUILD_SCRIPT + " cpu --rpc"),
}

_EXE = ".exe" if os.name == "nt" else ""
_NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
_CHUNK_RE = re.compile(r"\[(\d+)\](" + _NUM + r")")
_FINAL_RE = re.compile(r"Final estimate: PPL = (" + _NUM + r") \+/- (" + _NUM + r")")
_KLD_RE = re.compile(r"Mean\s+KLD:\s*(" + _NUM + r")\s*±\s*(" + _NUM + r")")
_TOP_P_RE = re.compile(r"Same top p:\s*(" + _NUM + r")\s*±\s*(" + _NUM + r")\s*%")
_PPL_Q_RE = re.compile(r"Mean PPL\(Q\)\s*:\s*(" + _NUM + r")\s*±\s*(" + _NUM + r")")
_PPL_BASE_RE = re.compile(r"Mean PPL\(base\)\s*:\s*(" + _NUM + r")\s*±\s*(" + _NUM + r")")


@dataclass
class PerplexityResult:
    """A perplexity under llama-perplexity's protocol: what llama-perplexity printed (``parse_perplexity_output``)
    or what the torch reference computed (``evaluate.perplexity``). ``chunk_ppls[i]`` is llama-perplexity's running
    estimate after chunk i+1 (as printed ``[i+1]x.xxxx``), so ``chunk_ppls[-1]`` equals ``ppl`` up to the 4 printed
    decimals."""
    ppl: float
    n_chunks: int
    ppl_err: float | None = None   # llama-perplexity: "+/- y" of the final estimate, when that line was printed
    chunk_ppls: list[float] = field(default_factory=list)   # llama-perplexity's running estimates
    raw_output: str = ""           # llama-perplexity's stdout + stderr
    nll_sum: float | None = None   # torch reference: summed negative log-likelihood of the scored tokens
    n_scored: int | None = None    # torch reference: tokens scored
    ctx: int | None = None         # torch reference: window length
    # per-token expert counts (llama-perplexity with expert_stats): expert slots used per token in each MoE layer
    # on this text, always-selected experts included (the last layer counts only the rows whose logits were
    # computed); None for fixed counts
    experts_used: list[float] | None = None

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "n_scored": self.n_scored, "n_chunks": self.n_chunks, "ctx": self.ctx}


@dataclass
class KLDivergenceResult:
    """A ``--kl-divergence`` run against logits saved by a base run (``perplexity(..., save_logits=...)``)."""
    mean_kld: float
    mean_kld_err: float
    same_top_p: float  # fraction (0..1) of tokens where both models have the same top token
    same_top_p_err: float
    ppl: float | None  # Mean PPL(Q): the compared model
    ppl_base: float | None  # Mean PPL(base)
    chunk_ppls: list[float] = field(default_factory=list)
    raw_output: str = ""
    experts_used: list[float] | None = None   # as PerplexityResult's


# patched llama-perplexity with GGUF_MOEIFY_EXPERT_STATS set (patch 0018), for files with per-token expert counts
EXPERT_STATS_ENV = "GGUF_MOEIFY_EXPERT_STATS"
_EXPERT_USE_RE = re.compile(r"gguf_moeify expert use: (" + _NUM + r") of (" + _NUM + r") expert slots used per "
                            r"token and MoE layer \(mean of the layers\), over (\d+) rows; by layer:([^\n]*)")


def parse_expert_use(text: str) -> list[float] | None:
    """Expert slots used per token in each MoE layer, from the patched llama-perplexity's expert-use line; None
    when it counted nothing (a file with fixed counts)."""
    m = _EXPERT_USE_RE.search(text)
    return [_float(v) for v in m.group(4).split()] if m and int(m.group(3)) > 0 else None


def _float(s: str) -> float:
    return float(s.replace("+", "")) if s.lower() not in ("nan", "-nan", "inf", "-inf") else float(s.lower())


def parse_perplexity_output(stdout: str, stderr: str = "") -> PerplexityResult:
    """Parse llama-perplexity's output: per-chunk ``[N]x`` values (stdout) and the final estimate (stderr)."""
    chunks: dict[int, float] = {}
    for m in _CHUNK_RE.finditer(stdout):
        chunks[int(m.group(1))] = _float(m.group(2))
    chunk_ppls = [chunks[k] for k in sorted(chunks)]
    final = _FINAL_RE.search(stderr) or _FINAL_RE.search(stdout)
    if final:
        final_ppl, final_err = _float(final.group(1)), _float(final.group(2))
    elif chunk_ppls:
        final_ppl, final_err = chunk_ppls[-1], None
    else:
        raise UserError("llama-perplexity printed no perplexity values; its output ends with:\n"
                        + _tail(stdout + "\n" + stderr))
    return PerplexityResult(ppl=final_ppl, n_chunks=len(chunk_ppls), ppl_err=final_err, chunk_ppls=chunk_ppls,
                            raw_output=stdout + stderr)


def parse_kl_divergence_output(stdout: str, stderr: str = "") -> KLDivergenceResult:
    text = stdout + "\n" + stderr
    kld = _KLD_RE.search(text)
    top_p = _TOP_P_RE.search(text)
    if not kld or not top_p:
        raise UserError("llama-perplexity --kl-divergence printed no KL-divergence statistics; its output ends with:\n"
                        + _tail(text))
    ppl_q, ppl_base = _PPL_Q_RE.search(text), _PPL_BASE_RE.search(text)
    return KLDivergenceResult(
        mean_kld=_float(kld.group(1)), mean_kld_err=_float(kld.group(2)),
        same_top_p=_float(top_p.group(1)) / 100.0, same_top_p_err=_float(top_p.group(2)) / 100.0,
        ppl=_float(ppl_q.group(1)) if ppl_q else None, ppl_base=_float(ppl_base.group(1)) if ppl_base else None,
        raw_output=text)


def _expected_chunks(stderr: str) -> int | None:
    m = re.search(r"(?:calculating perplexity|computing) over (\d+) chunks", stderr)
    return int(m.group(1)) if m else None


def _tail(text: str, n: int = 15) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


# A child forked from this (large) Python process would carry its RSS high-water mark through exec; this minimal
# interpreter forks the tool instead, waits for it and writes the tool's own max RSS (KiB, from wait4) to argv[1].
# SIGTERM (a timeout) is passed on to the tool as SIGKILL.
_RSS_HELPER = """import os, signal, sys
pid = 0
signal.signal(signal.SIGTERM, lambda *_: pid and os.kill(pid, signal.SIGKILL))
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class LlamaCppTools:
    """The llama.cpp binaries in ``bin_dir`` (one build: patched or stock), run directly or under ``runner`` (an
    emulator command, absolute path first)."""
    bin_dir: Path
    variant: str = "patched"
    runner: tuple[str, ...] = ()
    ngl: int = 0          # -ngl of every tool run (GGUF_MOEIFY_LLAMA_NGL)
    timeout: float | None = None  # seconds per tool run; None = no limit
    retries: int = 5  # runs of llama-perplexity when its log lost the last lines (unpatched builds)

    def tool(self, name: str) -> Path:
        path = self.bin_dir / (name + _EXE)
        if not path.is_file():
            _, _, build = VARIANTS.get(self.variant, VARIANTS["patched"])
            raise UserError(f"llama.cpp tool {name} not found in {self.bin_dir}; build it with: {build}")
        return path

    def has(self, name: str) -> bool:
        return (self.bin_dir / (name + _EXE)).is_file()

    def run(self, name: str, args: Sequence[str | os.PathLike], env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a tool (``env``: variables added to its environment); on failure raise UserError with the last lines
        of its stderr."""
        return self._run(name, args, env=env)[0]

    def _run(self, name: str, args: Sequence[str | os.PathLike], peak_rss: bool = False,
             env: dict | None = None) -> tuple[subprocess.CompletedProcess, float | None]:
        """``run``, and with ``peak_rss`` the tool's peak resident memory in MiB (Linux: max RSS of its process);
        ``env``: variables added to the tool's environment."""
        cmd = [*self.runner, str(self.tool(name))] + [str(a) for a in args]
        # stdout/stderr go to files, not pipes: an unpatched llama.cpp loses more of its async log on pipes
        with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err, \
                tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
            launch = [sys.executable, "-S", "-c", _RSS_HELPER, rss.name] + cmd if peak_rss else cmd
            child = subprocess.Popen(launch, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     env={**os.environ, **env} if env else None)
            try:
                rc = child.wait(timeout=self.timeout)
            except BaseException as e:   # the timeout, Ctrl-C, SIGTERM: the tool ends too
                if peak_rss:
                    child.terminate()    # the helper kills the tool
                else:
                    child.kill()
                child.wait()
                if isinstance(e, subprocess.TimeoutExpired):
                    raise UserError(f"{name} did not finish within {self.timeout} s: {' '.join(cmd)}") from e
                raise
            out.seek(0)
            err.seek(0)
            proc = subprocess.CompletedProcess(cmd, rc, out.read().decode("utf-8", "replace"),
                                               err.read().decode("utf-8", "replace"))
            rss_mib = float(rss.read().strip() or "nan") / 1024.0 if peak_rss else None   # ru_maxrss: KiB
        if proc.returncode != 0:
            raise UserError(f"{name} failed (exit code {proc.returncode}): {' '.join(cmd)}\n"
                            + _tail(proc.stderr or proc.stdout))
        return proc, rss_mib

    # ---- llama-perplexity
    def _ppl_run(self, args: list[str], expert_stats: bool) -> subprocess.CompletedProcess:
        if expert_stats:
            return self.run("llama-perplexity", args, env={EXPERT_STATS_ENV: "1"})
        return self.run("llama-perplexity", args)

    def _ppl_args(self, model, ctx, chunks, threads, batch) -> list[str]:
        args = ["-m", str(model), "-c", str(ctx), "-t", str(threads or _default_threads()),
                "-b", str(batch or ctx), "-ub", str(batch or ctx), "-fit", "off", "-ngl", str(self.ngl)]
        if chunks is not None:
            args += ["--chunks", str(chunks)]
        return args

    def perplexity(self, model, text_file, ctx: int = 512, chunks: int | None = None, threads: int | None = None,
                   batch: int | None = None, extra: Sequence[str] = (),
                   save_logits: str | os.PathLike | None = None, expert_stats: bool = False) -> PerplexityResult:
        """Perplexity of ``model`` on ``text_file`` in windows of ``ctx`` tokens (llama.cpp scores the second half
        of each window). ``save_logits``: also write the logits there (``--kl-divergence-base``) for a later
        ``kl_divergence`` run. ``expert_stats`` (patched build): also count the experts each token used
        (``experts_used``; slower). The text must hold at least 2*ctx tokens."""
        args = self._ppl_args(model, ctx, chunks, threads, batch) + ["-f", str(text_file)]
        if save_logits is not None:
            args += ["--kl-divergence-base", str(save_logits)]
        # Unpatched llama-perplexity logs through a worker thread that is never joined: the last lines (the last
        # chunk, the final estimate; at times everything after the start-up lines) are lost at exit (patch 0004
        # fixes that). Retry when they are.
        for attempt in range(self.retries):
            proc = self._ppl_run(args + list(extra), expert_stats)
            try:
                result = parse_perplexity_output(proc.stdout, proc.stderr)
            except UserError:   # not one chunk in the log
                if attempt == self.retries - 1:
                    raise
                continue
            expected = _expected_chunks(proc.stderr)
            if expected is None or result.n_chunks >= expected:
                result.experts_used = parse_expert_use(proc.stdout + proc.stderr)
                return result
        raise UserError(f"llama-perplexity printed {result.n_chunks} of {expected} chunks {self.retries} times "
                        f"(its log lost the last lines; the patched build fixes that: {BUILD_SCRIPT})")

    def kl_divergence(self, model, base_logits, ctx: int = 512, chunks: int | None = None,
                      threads: int | None = None, batch: int | None = None,
                      extra: Sequence[str] = (), expert_stats: bool = False) -> KLDivergenceResult:
        """KL divergence of ``model`` against logits saved by ``perplexity(base_model, ..., save_logits=...)``
        (same ctx; the tokens come from the saved file). ``expert_stats``: as ``perplexity``'s."""
        args = self._ppl_args(model, ctx, chunks, threads, batch)
        args += ["--kl-divergence-base", str(base_logits), "--kl-divergence"]
        for attempt in range(self.retries):  # see perplexity(): the statistics at the end can be lost
            proc = self._ppl_run(args + list(extra), expert_stats)
            try:
                result = parse_kl_divergence_output(proc.stdout, proc.stderr)
                result.experts_used = parse_expert_use(proc.stdout + proc.stderr)
                break
            except UserError:
                if attempt == self.retries - 1:
                    raise
        result.chunk_ppls = [_float(m.group(2)) for m in re.finditer(r"^\s*(\d+)\s+(" + _NUM + r")\s+±",
                                                                     proc.stdout, re.M)]
        return result

    # ---- llama-bench
    def bench(self, model, n_prompt: int = 512, n_gen: int = 128, threads: int | None = None, reps: int = 5,
              extra: Sequence[str] = ()) -> dict:
        """llama-bench (``-o json``) on ``model``: ``pp_ts`` / ``tg_ts`` (mean tokens/s of prompt processing and
        of decoding; a test with 0 tokens is left out), ``*_ts_std``, ``*_samples`` (tokens/s of each repetition),
        ``peak_rss_mib`` (max resident set of the llama-bench process: mmapped weights count once resident) and
        ``tests`` (llama-bench's JSON list, one entry per test)."""
        args = ["-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads or _default_threads()),
                "-r", str(reps), "-ngl", str(self.ngl), "-o", "json"]
        proc, rss_mib = self._run("llama-bench", args + list(extra), peak_rss=True)
        start = proc.stdout.find("[")
        try:
            tests = json.loads(proc.stdout[start:] if start >= 0 else proc.stdout)
        except json.JSONDecodeError as e:
            raise UserError("llama-bench printed no JSON; its output ends with:\n"
                            + _tail(proc.stdout + proc.stderr)) from e
        res = {"peak_rss_mib": rss_mib, "tests": tests}
        for t in tests:
            key = "pp" if t.get("n_gen", 0) == 0 else "tg"
            res[f"{key}_ts"] = float(t["avg_ts"])
            res[f"{key}_ts_std"] = float(t["stddev_ts"])
            res[f"{key}_samples"] = [float(x) for x in t.get("samples_ts", [])]
        return res

    # ---- llama-quantize
    def quantize(self, src, dst, qtype: str, threads: int | None = None, extra: Sequence[str] = ()) -> Path:
        """Quantize ``src`` to ``dst`` as ``qtype`` (e.g. Q4_K_M, Q8_0). Router tensors (ffn_gate_inp*) stay f32:
        llama-quantize never quantizes them."""
        args = list(extra) + [str(src), str(dst), qtype, str(threads or _default_threads())]
        self.run("llama-quantize", args)
        if not Path(dst).is_file():
            raise UserError(f"llama-quantize wrote no {dst}")
        return Path(dst)

    # ---- llama-completion
    def completion(self, model, prompt: str, n_predict: int = 32, seed: int = 0, temp: float = 0.0,
                   threads: int | None = None, ctx: int | None = None, extra: Sequence[str] = ()) -> str:
        """Greedy (temp 0), non-interactive generation; returns the generated text only (no prompt)."""
        args = ["-m", str(model), "-p", prompt, "-n", str(n_predict), "-s", str(seed), "--temp", str(temp),
                "-t", str(threads or _default_threads()), "-no-cnv", "--no-display-prompt", "--simple-io",
                "-fit", "off", "-ngl", str(self.ngl), "--no-warmup"]
        if ctx is not None:
            args += ["-c", str(ctx)]
        proc = self.run("llama-completion", args + list(extra))
        out = proc.stdout
        for marker in (" [end of text]", "[end of text]"):
            if out.rstrip().endswith(marker):
                out = out.rstrip()[: -len(marker)]
                break
        return out.rstrip("\n")


def find_llama_cpp(variant: str = "patched") -> LlamaCppTools:
    """The patched (default) or stock llama.cpp build, or a UserError that says how to build it."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, not {variant!r}")
    env, default, build = VARIANTS[variant]
    bin_dir = Path(os.environ[env]).expanduser() if os.environ.get(env) else default
    if not (bin_dir / ("llama-perplexity" + _EXE)).is_file():
        raise UserError(f"llama.cpp build not found in {bin_dir}; build it with: {build}")
    ngl = os.environ.get(NGL_ENV, "0")
    if not ngl.isdigit():
        raise UserError(f"{NGL_ENV} must be a number of layers, not {ngl!r}")
    return LlamaCppTools(bin_dir=bin_dir.resolve(), variant=variant, runner=runner_from_env(), ngl=int(ngl))


def runner_from_env() -> tuple[str, ...]:
    """``GGUF_MOEIFY_LLAMA_RUNNER`` split as a shell would, its program resolved on PATH; () when unset."""
    import shlex
    import shutil
    words = shlex.split(os.environ.get(RUNNER_ENV, ""))
    if not words:
        return ()
    program = shutil.which(words[0])
    if program is None:
        raise UserError(f"{RUNNER_ENV}: {words[0]} not found (for qemu-aarch64: apt-get install qemu-user)")
    return (program, *words[1:])


def relative_difference(a: float, b: float) -> float:
    """|a-b| / max(|a|, |b|), 0 when both are 0 (a helper for comparing perplexities)."""
    m = max(abs(a), abs(b))
    return 0.0 if m == 0 else abs(a - b) / m if math.isfinite(m) else float("inf")


def read_saved_tokens(path: str | os.PathLike) -> tuple[int, list[int]]:
    """(n_ctx, tokens) from a ``--kl-divergence-base`` file: the exact token ids llama-perplexity scored
    (header: "_logits_", int32 n_ctx, n_vocab, n_chunk, then n_chunk * n_ctx int32 tokens)."""
    import struct
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise UserError(f"{path}: not a llama-perplexity logits file")
        n_ctx, _n_vocab, n_chunk = struct.unpack("<iii", f.read(12))
        tokens = list(struct.unpack(f"<{n_ctx * n_chunk}i", f.read(4 * n_ctx * n_chunk)))
    return n_ctx, tokens
