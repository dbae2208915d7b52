"""The conversion pipeline: checkpoint -> per-layer MoEPlans -> GGUF (temp file, renamed at the end)."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .adapters import Adapter, adapter_for
from .checkpoint import Checkpoint
from .errors import UserError
from .finetune import LoRAOptions
from .gguf_writer import KQUANT_OUTTYPES, OUTTYPES, output_temp_path, write_gguf
from .methods import MethodOptions, get_method, resolve_options
from .plan import MoEPlan


def open_model(model: str, dtype: str = "float32") -> tuple[Checkpoint, Adapter]:
    """The checkpoint and its adapter, with every tensor's shape and dtype checked against config.json from the
    safetensors headers (no weights read), so a bad checkpoint fails in seconds, not after planning."""
    ckpt = Checkpoint(model, dtype)
    adapter = adapter_for(ckpt.config)
    ckpt.check_tensors(adapter.expected_shapes(ckpt.config, ckpt.has))
    return ckpt, adapter


def check_output_path(out: Path, model_dir: Path) -> None:
    """Never write into the source model's folder, and never replace a file that is not a GGUF (a mistyped
    argument must not destroy a checkpoint, a text or anything else)."""
    if out.is_dir():
        raise UserError(f"output {out} is a folder; give a file name such as {out / 'model-moe.gguf'}")
    if out.resolve().is_relative_to(model_dir.resolve()):
        raise UserError(f"output {out} is inside the model folder {model_dir}; write it elsewhere")
    if out.exists():
        try:
            with open(out, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise UserError(f"cannot write {out}: {exc.strerror or exc}")
        if magic != b"GGUF":
            raise UserError(f"output {out} exists and is not a GGUF file; refusing to replace it")


def make_plans(ckpt: Checkpoint, adapter: Adapter, method_name: str, opts: MethodOptions,
               progress: bool = True) -> list[MoEPlan]:
    """One plan per decoder layer; only that layer's MLP weights are in memory at a time. Methods that need
    calibration go through the layer-sequential pipeline (one decoder layer plus the calibration states).
    Routers are rounded to ``opts.router_dtype`` last (calibration runs with f32 routers; fine-tuning, which comes
    after, and the file with the rounded ones)."""
    plans = _method_plans(ckpt, adapter, method_name, opts, progress)
    for plan in plans:
        plan.router.dtype = opts.router_dtype
    return plans


def _method_plans(ckpt: Checkpoint, adapter: Adapter, method_name: str, opts: MethodOptions,
                  progress: bool) -> list[MoEPlan]:
    method = get_method(method_name)
    opts = resolve_options(method_name, opts, ckpt.d_ff)
    method.validate(opts, ckpt.d_ff)
    if opts.runtime == "stock":
        from .stock import check_stock_options
        check_stock_options(opts, ckpt.config, adapter.name)
    if hasattr(method, "plan_model"):  # trained on the whole model at once (ToMoE)
        return method.plan_model(ckpt, adapter, opts, progress)
    if getattr(method, "needs_calibration", False):
        from .calibration import calibrated_plans
        return calibrated_plans(ckpt, adapter, method, opts, progress)
    plans = []
    for i in tqdm(range(ckpt.n_layers), desc=f"planning {method_name}", unit="layer", disable=not progress):
        gate, up, down = (ckpt.get(n) for n in adapter.mlp_names(i))
        plan = method.plan_layer(i, gate, up, down, opts)
        if opts.runtime == "stock":
            from .stock import stock_form
            plan = stock_form(plan, adapter.name, None)
        plans.append(plan)
        del gate, up, down
    return plans


def provenance(ckpt: Checkpoint, method: str, opts: MethodOptions, outtype: str, dtype: str) -> dict:
    source = ckpt.config.get("_name_or_path") or ckpt.path.name
    return {"tool": "gguf_moeify", "version": __version__, "source_model": str(source),
            "source_model_type": ckpt.config.get("model_type"), "method": method, "options": asdict(opts),
            "outtype": outtype, "dtype": dtype}


def write_model_file(ckpt: Checkpoint, adapter: Adapter, plans: list[MoEPlan], out: str | os.PathLike,
                     outtype: str, provenance: dict, progress: bool = True,
                     make_plans_fn=None, overrides_fn=None, shared_as_routed: bool = True) -> Path:
    """Plans -> GGUF at ``out`` via a temporary file in the same folder, renamed only when complete.
    ``make_plans_fn`` (optional) computes the plans after the output was checked to be writable;
    ``overrides_fn(plans)`` (optional) returns tensors that replace the checkpoint's (see ``write_gguf``)."""
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    out = Path(out)
    check_output_path(out, ckpt.path)
    tmp = output_temp_path(out)
    try:
        if make_plans_fn is not None:
            plans = make_plans_fn()
        overrides = overrides_fn(plans) if overrides_fn is not None else None
        float_type = "f16" if outtype in KQUANT_OUTTYPES else outtype
        fallbacks = write_gguf(tmp, ckpt, adapter, plans, float_type, provenance, progress, overrides,
                               shared_as_routed)
        if fallbacks:
            print(f"note: {len(fallbacks)} tensors kept at f16 (last dimension not a multiple of 32), "
                  f"e.g. {fallbacks[0]}", file=sys.stderr)
        if outtype in KQUANT_OUTTYPES:
            from .llama_cpp import find_llama_cpp
            quantized = tmp.with_name(tmp.name + ".q")
            try:
                find_llama_cpp().quantize(tmp, quantized, outtype.upper())
                os.replace(quantized, tmp)
            finally:
                quantized.unlink(missing_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def finetuned_overrides_fn(ckpt: Checkpoint, adapter: Adapter, calib: str | None, lora: LoRAOptions,
                           prov: dict, progress: bool = True):
    """``overrides_fn`` for write_model_file: build the torch reference from the plans, fine-tune it with LoRA
    (merged), record the run in the provenance, and hand over the changed tensors."""
    def run(plans: list[MoEPlan]) -> dict:
        from .finetune import finetune_lora, finetuned_overrides
        from .reference import load_dense, moeify_
        model, _ = load_dense(ckpt, tokenizer=False)
        moeify_(model, adapter, plans)
        prov["finetune"] = {"method": "lora", **finetune_lora(model, ckpt, adapter, calib, lora, progress)}
        return finetuned_overrides(model, adapter, ckpt.n_layers)
    return run


def convert(model: str, out: str | os.PathLike, method: str = "mlpmoe", opts: MethodOptions | None = None,
            outtype: str = "f16", dtype: str = "float32", progress: bool = True,
            finetune: LoRAOptions | None = None) -> Path:
    opts = opts or MethodOptions()
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ckpt, adapter = open_model(model, dtype)
    opts = resolve_options(method, opts, ckpt.d_ff)
    get_method(method).validate(opts, ckpt.d_ff)
    prov = provenance(ckpt, method, opts, outtype, dtype)
    overrides_fn = None
    if finetune is not None:
        finetune.check(opts.calib)
        overrides_fn = finetuned_overrides_fn(ckpt, adapter, opts.calib, finetune, prov, progress)
    return write_model_file(ckpt, adapter, [], out, outtype, prov, progress,
                            make_plans_fn=lambda: make_plans(ckpt, adapter, method, opts, progress),
                            overrides_fn=overrides_fn, shared_as_routed=opts.shared_layout == "experts")
