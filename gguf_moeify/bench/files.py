"""The model files bench measures, kept in the work folder and reused while the recipe they record matches.

- dense references at each outtype, written by llama.cpp's own converter (+ ``llama-quantize``), the recipe in a
  ``.recipe.json`` sidecar;
- MoE files written by ``convert``'s pipeline, the recipe in the ``gguf_moeify.provenance`` key; configurations
  that differ only in outtype share one set of plans (one calibration);
- SYNTHETIC random-weight files, the recipe in the ``gguf_moeify.synthetic_recipe`` key;
- ``--moe FILE``: a configuration read back from a converted file's recorded recipe.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from ..gguf_keys import PLAN, PROVENANCE
from .configs import Config

CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")   # what llama.cpp's converter writes; the rest via llama-quantize


def recorded(path: Path, key: str) -> dict | None:
    """The JSON object a GGUF records under ``key``; None when there is none (a truncated or foreign file too)."""
    import gguf
    try:
        f = gguf.GGUFReader(path).fields.get(key)
        return json.loads(f.contents()) if f is not None else None
    except Exception:  # a truncated or foreign file is simply not reused
        return None


def _recorded_budget(options: dict) -> float:
    """A tomoe file's trained budget from its recorded options (``own``; files of 0.x versions: ``extra``)."""
    own = options.get("own") or options.get("extra") or {}
    return own.get("budget") or 0.5


def config_from_file(path: str) -> Config:
    """A Config for a file written by ``convert`` (--moe), from its recorded recipe (``gguf_moeify.provenance``)."""
    import gguf
    if not Path(path).is_file():
        raise UserError(f"--moe {path}: file not found")
    prov = recorded(Path(path), PROVENANCE)
    if prov is None or "options" not in prov:
        raise UserError(f"--moe {path}: not an MoE file written by gguf_moeify (no readable provenance)")
    o, method, outtype = prov["options"], prov["method"], prov["outtype"]
    if method == "tomoe":
        return Config(method, o["experts"], 0, 1, outtype, path, budget=_recorded_budget(o), path=path)
    top_k = o.get("top_k")
    if top_k is None:   # left to the method's default: what the file's first layer uses
        top_k = json.loads(gguf.GGUFReader(path).fields[PLAN].contents())[0]["top_k"]
    return Config(method, o["experts"], o["shared"], top_k, outtype, path, path=path)


# ---------------------------------------------------------------- dense reference files
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".recipe.json")


def _dense_recipe(model: str, outtype: str) -> dict:
    from ..llama_cpp_source import LLAMA_CPP_COMMIT
    return {"tool": "gguf_moeify bench", "kind": "dense reference", "converter": f"llama.cpp {LLAMA_CPP_COMMIT}",
            "source_model": str(Path(model).resolve()), "outtype": outtype,
            "quantize": outtype not in CONVERTER_OUTTYPES,
            "embedding_output": "q8_0" if outtype == "q4_0" else None}


def dense_gguf(model: str, outtype: str, work: Path, tools) -> tuple[Path, bool]:
    """The dense model at ``outtype``, written by llama.cpp's converter (+ llama-quantize). (path, reused)."""
    out = work / f"dense-{outtype}.gguf"
    recipe = _dense_recipe(model, outtype)
    if out.is_file() and _sidecar(out).is_file() and json.loads(_sidecar(out).read_text()) == recipe:
        return out, True
    from ..llama_cpp_source import llama_cpp_source
    src = llama_cpp_source()
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    env.pop("NO_LOCAL_GGUF", None)
    direct = outtype in CONVERTER_OUTTYPES
    conv_out = work / (f".dense-{outtype}.tmp.gguf" if direct else ".dense-f32-for-quantize.tmp.gguf")
    try:
        proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype",
                               outtype if direct else "f32", "--outfile", str(conv_out)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not conv_out.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise UserError(f"llama.cpp's converter failed on {model}:\n{tail}")
        if direct:
            os.replace(conv_out, out)
        else:
            extra = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"] if outtype == "q4_0" else []
            tmp_q = work / f".dense-{outtype}.tmp.gguf"
            tools.quantize(conv_out, tmp_q, outtype.upper(), extra=extra)
            os.replace(tmp_q, out)
    finally:
        conv_out.unlink(missing_ok=True)
    _sidecar(out).write_text(json.dumps(recipe, sort_keys=True, indent=1) + "\n")
    return out, False


# ---------------------------------------------------------------- MoE files
def _opts_for(c: Config, args, work: Path | None = None):
    from ..method_args import own_options_from_args
    from ..methods import MethodOptions, ToMoEOptions
    if c.method == "tomoe":  # its training state in the work folder: every outtype (and a rerun) reuses it
        state = str(work / f"{c.slug}.tomoe-state.pt") if work is not None else None
        return MethodOptions(experts=c.experts, shared=0, top_k=None, calib=args.calib, seed=args.seed,
                             router_dtype=args.router_dtype, own=ToMoEOptions(budget=c.budget, state=state))
    own = own_options_from_args(c.method, args, strict=False) if c.method != "mlpmoe" else None
    calib = None if c.method == "mlpmoe" else args.calib
    budget = "uniform" if c.method == "mlpmoe" else args.layer_budget
    return MethodOptions(experts=c.experts, shared=c.shared, top_k=c.top_k, calib=calib,
                         calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                         layer_budget=budget, router_dtype=args.router_dtype, own=own)


class MoEFiles:
    """Converts configurations, reusing files with the same recorded recipe and plans across outtypes."""

    def __init__(self, model: str, work: Path, args):
        from ..convert import open_model
        self.ckpt, self.adapter = open_model(model, "float32")
        self.work, self.args = work, args
        self._plans: dict[str, list] = {}

    def get(self, c: Config) -> tuple[Path, bool]:
        from ..convert import calibrated_for_outtype, make_plans, provenance, write_model_file
        from ..methods import get_method
        opts = calibrated_for_outtype(c.method, _opts_for(c, self.args, self.work), c.outtype)
        if c.method != "mlpmoe" and not opts.calib:
            raise UserError(f"{c.method} needs calibration text: --calib FILE")
        get_method(c.method).validate(opts, self.ckpt.d_ff)
        prov = provenance(self.ckpt, c.method, opts, c.outtype, "float32")
        out = self.work / f"{c.slug}-{c.outtype}.gguf"
        if out.is_file() and recorded(out, PROVENANCE) == json.loads(json.dumps(prov, sort_keys=True)):
            return out, True
        key = json.dumps({"method": c.method, "opts": asdict(opts)}, sort_keys=True)
        if key not in self._plans:
            self._plans = {key: make_plans(self.ckpt, self.adapter, c.method, opts, progress=False)}
        write_model_file(self.ckpt, self.adapter, self._plans[key], out, c.outtype, prov, progress=False)
        return out, False


# ---------------------------------------------------------------- synthetic files
def synthetic_file(shape, c: Config, work: Path, seed: int, router_dtype: str = "f32") -> tuple[Path, bool]:
    from ..synthetic import synthetic_recipe, write_synthetic
    experts, top_k = (0, 0) if c.method == "dense" else (c.experts, c.top_k)
    if c.shared:
        raise UserError("synthetic MoE files have no shared expert: use S0 (e.g. moe:S0A4E16:q4_0)")
    router_dtype = router_dtype if experts else "f32"
    tag = "" if router_dtype == "f32" else f"-router_{router_dtype}"
    out = work / f"SYNTHETIC-{shape.name}-{c.slug}{tag}-{c.outtype}.gguf"
    want = synthetic_recipe(shape, c.outtype, experts, top_k, seed, router_dtype)
    if out.is_file() and recorded(out, "gguf_moeify.synthetic_recipe") == want:
        return out, True
    return write_synthetic(out, shape, c.outtype, experts, top_k, seed, router_dtype=router_dtype), False
