"""How conversion cost grows with the model: SYNTHETIC random-weight HF checkpoints of real shapes, converted end to
end by ``python -m gguf_moeify`` with each data-driven method, wall time per layer by phase and peak RSS.

    .venv/bin/python scripts/bench_scaling.py --calib CALIB.txt [--runs d1536:2,llama1b:16,llama8b:2,llama8b:4]
        [--methods finegrained,cmoe,moefication] [--active 0.5] [--outtype f16] [--convert-args "..."]
        [--work DIR] [--out results.jsonl]

Each checkpoint is written once under ``--work`` (bf16 safetensors, one shard per decoder layer plus one for the
embeddings, with ``model.safetensors.index.json``: the sharded layout), with the tokenizer of ``--tokenizer``
(default models/smollm2-135m: SmolLM2's BPE, 49152 tokens). llama.cpp's converter pads a vocab_size above the
tokenizer's with [PAD] tokens, so the real vocab sizes are kept (128256 for the Llama-3 shapes). Every run is a
child process under ``/usr/bin/time -v`` (peak RSS of the child, wall time) with ``GGUF_MOEIFY_TIMING`` set
(gguf_moeify/timing.py): one line per layer with the seconds in load, attention, plan (statistics, partition,
router inside it) and moe_forward. Writing = the end of the run minus the end of the last layer's plan.

Shapes (``name:layers``): d1536 = SmolLM2-135M's MLP (hidden 576), d4864 = Qwen2.5-0.5B's (hidden 896, written as
llama), llama1b = Llama-3.2-1B (hidden 2048, d_ff 8192, 32/8 heads, vocab 128256, tied), llama8b = Llama-3-8B's
layer (hidden 4096, d_ff 14336, 32/8 heads, vocab 128256). The 8B projection: per-layer cost from the difference
of the 2- and 4-layer runs, fixed cost from the rest, extrapolated to 32 layers (``--report``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "d1536": dict(hidden=576, d_ff=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, tie=True, rope=100000.0),
    "d4864": dict(hidden=896, d_ff=4864, heads=14, kv_heads=2, head_dim=64, vocab=151936, tie=True, rope=1e6),
    "llama1b": dict(hidden=2048, d_ff=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256, tie=True,
                    rope=500000.0),
    "llama8b": dict(hidden=4096, d_ff=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, tie=False,
                    rope=500000.0),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PHASES = ("load", "attention", "statistics", "partition", "router", "plan", "moe_forward")
STD = 0.02


def config(shape: dict, layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["hidden"],
            "intermediate_size": shape["d_ff"], "num_hidden_layers": layers,
            "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
            "head_dim": shape["head_dim"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_theta": shape["rope"], "max_position_embeddings": 8192, "vocab_size": shape["vocab"],
            "tie_word_embeddings": shape["tie"], "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
            "mlp_bias": False, "torch_dtype": "bfloat16"}


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * STD).to(torch.bfloat16)


def layer_tensors(shape: dict, i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    d, f, hd = shape["hidden"], shape["d_ff"], shape["head_dim"]
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": _randn(gen, shape["heads"] * hd, d),
            p + "self_attn.k_proj.weight": _randn(gen, shape["kv_heads"] * hd, d),
            p + "self_attn.v_proj.weight": _randn(gen, shape["kv_heads"] * hd, d),
            p + "self_attn.o_proj.weight": _randn(gen, d, shape["heads"] * hd),
            p + "mlp.gate_proj.weight": _randn(gen, f, d),
            p + "mlp.up_proj.weight": _randn(gen, f, d),
            p + "mlp.down_proj.weight": _randn(gen, d, f)}


def write_checkpoint(name: str, layers: int, dest: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A sharded bf16 checkpoint of random weights (one layer in memory at a time); reused when complete."""
    from safetensors.torch import save_file
    if (dest / "model.safetensors.index.json").is_file():
        return dest
    shape = SHAPES[name]
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    n_shards = layers + 1
    shard = lambda j: f"model-{j + 1:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731
    weight_map, total = {}, 0
    first = {"model.embed_tokens.weight": _randn(gen, shape["vocab"], shape["hidden"]),
             "model.norm.weight": torch.ones(shape["hidden"], dtype=torch.bfloat16)}
    if not shape["tie"]:
        first["lm_head.weight"] = _randn(gen, shape["vocab"], shape["hidden"])
    for j, tensors in enumerate([first] + [None] * layers):
        tensors = tensors if j == 0 else layer_tensors(shape, j - 1, gen)
        save_file(tensors, str(tmp / shard(j)), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = shard(j)
            total += t.numel() * t.element_size()
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config(shape, layers), indent=1))
    for f in TOKENIZER_FILES:
        if (tokenizer / f).is_file():
            shutil.copy(tokenizer / f, tmp / f)
    os.replace(tmp, dest)
    return dest


class _AnonPeak:
    """Highest anonymous resident memory (RssAnon) of a process tree, polled twice a second. Peak RSS also counts
    the checkpoint shards that safetensors keeps memory-mapped (file pages, reclaimable); RssAnon is what the
    converter itself holds."""

    def __init__(self, pid: int):
        import threading
        self.pid, self.peak_mib, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self, pid: int) -> list[int]:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        return [pid] + [q for c in children for q in self._tree(int(c))]

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            total = 0
            for pid in self._tree(self.pid):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                m = re.search(r"RssAnon:\s+(\d+) kB", status)
                total += int(m.group(1)) if m else 0
            self.peak_mib = max(self.peak_mib, round(total / 1024, 1))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _time_v(stderr: str) -> dict:
    """Peak RSS and CPU seconds of the child from /usr/bin/time -v."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", stderr))
    return {"peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None, "cpu_s": round(cpu, 1)}


def convert(ckpt: Path, method: str, active: float, calib: str, out: Path, timing: Path, outtype: str,
            extra: tuple[str, ...] | list[str] = ()) -> dict:
    """One end-to-end conversion in a child process: wall time, peak RSS, and the per-layer phase lines."""
    timing.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "gguf_moeify", "convert", str(ckpt), str(out), "--method", method,
           "--active", str(active), "--calib", calib, "--outtype", outtype, "-q", *extra]
    env = {**os.environ, "GGUF_MOEIFY_TIMING": str(timing)}
    start = time.time()
    proc = subprocess.Popen(["/usr/bin/time", "-v"] + cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    anon = _AnonPeak(proc.pid)
    stdout, stderr = proc.communicate()
    end = time.time()
    anon.stop()
    proc.stdout, proc.stderr = stdout, stderr
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-25:]
        raise SystemExit(f"conversion failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    lines = [json.loads(x) for x in timing.read_text().splitlines()] if timing.is_file() else []
    layers = [x for x in lines if "layer" in x]
    done = next((x["wall"] for x in lines if x.get("event") == "plans_done"), end)
    setup = next((x for x in lines if x.get("event") == "setup"), {})
    return {"command": " ".join(["python"] + cmd[1:]), "wall_s": round(end - start, 1),
            "setup_s": round(setup.get("wall", start) - start, 1), "writing_s": round(end - done, 1),
            "layers": layers, "file_mib": round(out.stat().st_size / 2 ** 20, 1), "peak_anon_mib": anon.peak_mib,
            **_time_v(proc.stderr)}


def per_layer(run: dict, cpu: bool = False) -> dict:
    """Mean seconds per layer by phase (wall, or the process's CPU seconds)."""
    layers = run["layers"]
    key = "_cpu" if cpu else ""
    return {p: round(sum(x.get(p + key, 0.0) for x in layers) / max(1, len(layers)), 2) for p in PHASES}


def load_results(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def report(results: list[dict]) -> str:
    """Markdown: per-layer phases (wall, and the process's CPU seconds), whole run, peak RSS, machine load."""
    head = ("| shape | d_ff | layers | method | E/S/K | load | attention | statistics | partition | router | plan | "
            "moe fwd | setup | writing | whole | CPU | peak RSS MiB | peak anon MiB | load avg |")
    rows = ["Per layer (mean over layers), seconds: wall (CPU of the process)", "", head, "|" + "---|" * 19]
    for r in results:
        wall, cpu = per_layer(r), per_layer(r, cpu=True)
        cells = " | ".join(f"{wall[p]} ({cpu[p]})" for p in PHASES)
        rows.append(f"| {r['shape']} | {r['d_ff']} | {r['n_layers']} | {r['method']} | {r.get('esk', '')} | {cells} | "
                    f"{r['setup_s']} | {r['writing_s']} | {r['wall_s']} | {r.get('cpu_s', '')} | "
                    f"{r['peak_rss_mib']} | {r.get('peak_anon_mib', '')} | {r.get('load_before', '')}/"
                    f"{r.get('load_after', '')} |")
    rows += ["", projection(results)]
    return "\n".join(rows)


def projection(results: list[dict], layers: int = 32) -> str:
    """Whole 8B conversion from the 2- and 4-layer runs: per layer = half their difference, fixed = the rest."""
    out = []
    for method in sorted({r["method"] for r in results}):
        runs = {r["n_layers"]: r for r in results if r["shape"] == "llama8b" and r["method"] == method}
        if 2 in runs and 4 in runs:
            per = (runs[4]["wall_s"] - runs[2]["wall_s"]) / 2
            fixed = runs[2]["wall_s"] - 2 * per
            total = fixed + layers * per
            out.append(f"- {method}: {per:.0f} s per layer, {fixed:.0f} s fixed -> {layers} layers "
                       f"{total / 60:.0f} min ({total / 3600:.2f} h)")
    return "\n".join(["Projected 32-layer Llama-3-8B-shaped conversion:"] + out) if out else ""


def _load_avg() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _commit() -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "gguf_moeify"], capture_output=True,
                           text=True).stdout.strip()
    return proc.stdout.strip() + ("+uncommitted" if dirty else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib", help="calibration text (file or folder of .txt); required unless --report")
    p.add_argument("--runs", default="llama8b:2,llama8b:4,llama1b:16,d1536:2,d4864:2",
                   help="SHAPE:LAYERS,... (default: %(default)s)")
    p.add_argument("--methods", default="finegrained,cmoe,moefication")
    p.add_argument("--active", type=float, default=0.5)
    p.add_argument("--outtype", default="f16")
    p.add_argument("--convert-args", default="",
                   help="more convert options, as one string (e.g. '--expert-counts per-token'); recorded per run")
    p.add_argument("--tokenizer", default=str(ROOT / "models" / "smollm2-135m"))
    p.add_argument("--work", default=str(ROOT / "out" / "scaling"))
    p.add_argument("--out", default=None, help="results JSON lines (default: WORK/results.jsonl)")
    p.add_argument("--report", action="store_true", help="only print the table of the results already there")
    args = p.parse_args()
    work = Path(args.work)
    results_path = Path(args.out) if args.out else work / "results.jsonl"
    if args.report:
        print(report(load_results(results_path)))
        return 0
    if not args.calib:
        p.error("--calib is required")
    from gguf_moeify.sizing import expert_layout
    work.mkdir(parents=True, exist_ok=True)
    for spec in [s for s in args.runs.split(",") if s]:
        name, layers = spec.split(":")
        ckpt = write_checkpoint(name, int(layers), work / f"{name}-{layers}L", Path(args.tokenizer))
        for method in [m for m in args.methods.split(",") if m]:
            e, s, k = expert_layout(method, SHAPES[name]["d_ff"], args.active)
            print(f"{name} {layers} layers {method} S{s}A{k}E{e} ...", flush=True)
            load_before = _load_avg()
            out = work / f"{name}-{layers}L-{method}.gguf"
            run = convert(ckpt, method, args.active, args.calib, out, work / "timing.jsonl", args.outtype,
                          args.convert_args.split())
            out.unlink(missing_ok=True)
            rec = {"shape": name, "n_layers": int(layers), "method": method, "esk": f"S{s}A{k}E{e}",
                   "d_ff": SHAPES[name]["d_ff"], "date": time.strftime("%F %T"), "commit": _commit(),
                   "load_before": load_before,
                   "load_after": _load_avg(), **run}
            with results_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            pl = per_layer(rec)
            print(f"  whole {run['wall_s']} s, peak RSS {run['peak_rss_mib']} MiB, per layer {pl}", flush=True)
    print(report(load_results(results_path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
