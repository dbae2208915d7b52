"""The conversion pipeline: checkpoint -> per-layer MoEPlans -> GGUF (temp file, renamed at the end)."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .adapters import Adapter, adapter_for
from .checkpoint import Checkpoint
from .errors import UserError
from .finetune import LoRAOptions
from .gguf_writer import KQUANT_OUTTYPES, OUTTYPES, write_gguf
from .output_file import output_temp_path
from .methods import FinegrainedOptions, MethodOptions, get_method, resolve_options
from .stored_weights import ROUND_TRIP_OUTTYPES
from .plan import ModelPlan, MoEPlan


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


def calibrated_for_outtype(method: str, opts: MethodOptions, outtype: str) -> MethodOptions:
    """``opts`` for a file of ``outtype``. Per-token expert counts compare absolute router scores with thresholds,
    which quantization moves (q4_0 files calibrated on the source weights used 46-48% of a 50% budget), so for
    q8_0 / q4_0 files they are calibrated through the weights as the file stores them. Fixed counts rank each
    token's own experts and keep the source weights (through q4_0 weights they measured no better)."""
    own = opts.own
    if (method == "finegrained" and isinstance(own, FinegrainedOptions) and own.expert_counts == "per-token"
            and outtype in ROUND_TRIP_OUTTYPES):
        return replace(opts, calib_outtype=outtype)
    return opts


def make_plans(ckpt: Checkpoint, adapter: Adapter, method_name: str, opts: MethodOptions,
               progress: bool = True, provenance: dict | None = None) -> ModelPlan:
    """The file's plan: one plan per decoder layer (only that layer's MLP weights in memory at a time; methods that
    need calibration go through the layer-sequential pipeline), the target runtime, the shared layout and the
    router dtype from ``opts``. Routers are rounded to ``opts.router_dtype`` last (calibration runs with f32
    routers; fine-tuning, which comes after, and the file with the rounded ones)."""
    method = get_method(method_name)
    opts = resolve_options(method_name, opts, ckpt.d_ff)
    method.validate(opts, ckpt.d_ff)
    target = "patched"
    if opts.runtime == "stock":
        from .stock import check_stock_options, stock_file_target
        check_stock_options(opts, ckpt.config, adapter.name)
    layers = _method_plans(ckpt, adapter, method_name, method, opts, progress)
    if opts.runtime == "stock":
        target = stock_file_target(adapter.name, layers[0].shared_width > 0)
    return ModelPlan.build(layers, target, opts.shared_layout, opts.router_dtype, provenance)


def _method_plans(ckpt: Checkpoint, adapter: Adapter, method_name: str, method, opts: MethodOptions,
                  progress: bool) -> list[MoEPlan]:
    if method.whole_model:  # trained on the whole model at once (ToMoE)
        return method.plan_model(ckpt, adapter, opts, progress)
    if method.needs_calibration:
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
            "source_model_type": ckpt.config.get("model_type"), "method": method, "options": opts.recorded(),
            "outtype": outtype, "dtype": dtype}


def write_model_file(ckpt: Checkpoint, adapter: Adapter, plan: ModelPlan | None, out: str | os.PathLike,
                     outtype: str, provenance: dict | None = None, progress: bool = True,
                     make_plans_fn=None, finetune_fn=None) -> Path:
    """The file's plan -> GGUF at ``out`` via a temporary file in the same folder, renamed only when complete.
    ``make_plans_fn`` (optional) computes the plan after the output was checked to be writable; ``finetune_fn(plan)``
    (optional) returns the fine-tuned plan and the tensors that replace the checkpoint's (see ``write_gguf``).
    ``provenance`` replaces the plan's."""
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    out = Path(out)
    check_output_path(out, ckpt.path)
    tmp = output_temp_path(out)
    try:
        if make_plans_fn is not None:
            plan = make_plans_fn()
        if provenance is not None:
            plan = replace(plan, provenance=provenance)
        overrides = None
        if finetune_fn is not None:
            plan, overrides = finetune_fn(plan)
        float_type = "f16" if outtype in KQUANT_OUTTYPES else outtype
        fallbacks = write_gguf(tmp, ckpt, adapter, plan, float_type, progress, overrides)
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


def finetune_fn(ckpt: Checkpoint, adapter: Adapter, calib: str | None, lora: LoRAOptions, progress: bool = True):
    """``finetune_fn`` for write_model_file: build the torch reference from the plan, fine-tune it with LoRA
    (merged), and return the plan with the trained routers and the run in its provenance, and the changed
    tensors."""
    def run(plan: ModelPlan) -> tuple[ModelPlan, dict]:
        from .finetune import finetune_lora, finetuned_overrides
        from .moe_torch import layer_plans
        from .reference import load_dense, moeify_
        model, _ = load_dense(ckpt, tokenizer=False)
        moeify_(model, adapter, plan)
        run = {"method": "lora", **finetune_lora(model, ckpt, adapter, calib, lora, progress)}
        tuned = replace(plan.with_layers(layer_plans(model)), provenance={**plan.provenance, "finetune": run})
        return tuned, finetuned_overrides(model, adapter, ckpt.n_layers)
    return run


def convert(model: str, out: str | os.PathLike, method: str = "mlpmoe", opts: MethodOptions | None = None,
            outtype: str = "f16", dtype: str = "float32", progress: bool = True,
            finetune: LoRAOptions | None = None) -> Path:
    opts = opts or MethodOptions()
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ckpt, adapter = open_model(model, dtype)
    opts = calibrated_for_outtype(method, resolve_options(method, opts, ckpt.d_ff), outtype)
    get_method(method).validate(opts, ckpt.d_ff)
    prov = provenance(ckpt, method, opts, outtype, dtype)
    tune = None
    if finetune is not None:
        finetune.check(opts.calib)
        tune = finetune_fn(ckpt, adapter, opts.calib, finetune, progress)
    return write_model_file(ckpt, adapter, None, out, outtype, None, progress,
                            make_plans_fn=lambda: make_plans(ckpt, adapter, method, opts, progress, prov),
                            finetune_fn=tune)
