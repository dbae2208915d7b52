"""``eval``: dense vs converted perplexity in the torch reference, one model in memory (swapped in place)."""
from __future__ import annotations

from .convert import make_plans, open_model
from .errors import UserError
from .evaluate import perplexity, read_text, tokenize_for_ppl
from .methods import MethodOptions
from .moe_torch import experts_used_by_layer
from .reference import load_dense, logits_fn, moeify_


def add_bos_of(tokenizer) -> bool:
    return bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None


def evaluate_model(model: str, text_file: str, method: str, opts: MethodOptions, dtype: str = "float32",
                   ctx: int = 512, chunks: int | None = None, oracle: bool = False, finetune=None) -> dict:
    """Dense vs converted perplexity; with ``finetune`` (LoRAOptions) also after LoRA recovery; with ``oracle`` the
    ceilings of the (fine-tuned, if so) plan: experts or neurons chosen by their true outputs, a fixed number per
    token or the same mean number per token (MoEMLP.oracle "expert-var" / "neuron-var")."""
    if finetune is not None:
        finetune.check(opts.calib)
    if ctx < 16 or (chunks is not None and chunks < 1):
        raise UserError(f"--ctx must be >= 16 and --chunks >= 1 (got --ctx {ctx}, --chunks {chunks})")
    ckpt, adapter = open_model(model, dtype)
    text = read_text(text_file)
    plans = make_plans(ckpt, adapter, method, opts)
    hf, tok = load_dense(ckpt)
    bos = tok.bos_token_id if add_bos_of(tok) else None
    tokens = tokenize_for_ppl(tok, text, bos is not None)
    dense = perplexity(logits_fn(hf), tokens, ctx, chunks, bos, desc="dense")
    moeify_(hf, adapter, plans)
    moe = perplexity(logits_fn(hf), tokens, ctx, chunks, bos, desc=method)
    active = sum(p.active_fraction() for p in plans) / len(plans)
    res = {"dense": dense.as_dict(), "moe": moe.as_dict(), "ratio": moe.ppl / dense.ppl,
           "active_fraction": active, "method": method, "plan": plans[0].summary()}
    used = experts_used_by_layer(hf)
    if used is not None:   # per-token counts: what the text actually used, next to the calibrated budget
        res["measured_active_fraction"] = sum(p.active_fraction(u) for p, u in zip(plans, used)) / len(plans)
    if opts.runtime == "stock":  # how often stock's choice is the original router's (held-out calibration tokens)
        res["stock_router_agreement"] = sum(p.info["stock_router_agreement"] for p in plans) / len(plans)
    if finetune is not None:
        from .finetune import finetune_lora
        res["finetune"] = finetune_lora(hf, ckpt, adapter, opts.calib, finetune)
        tuned = perplexity(logits_fn(hf), tokens, ctx, chunks, bos, desc=f"{method} + LoRA")
        res.update(finetuned=tuned.as_dict(), finetuned_ratio=tuned.ppl / dense.ppl)
    if oracle:
        from .moe_torch import MoEMLP
        # fixed count per token, then the same mean count spent where the output norms are largest
        for mode, key in (("expert", "oracle"), ("neuron", "neuron_oracle"), ("expert-var", "oracle_var"),
                          ("neuron-var", "neuron_oracle_var")):
            for mod in hf.modules():
                if isinstance(mod, MoEMLP):
                    mod.oracle = mode
            orc = perplexity(logits_fn(hf), tokens, ctx, chunks, bos, desc=f"{mode} oracle")
            res.update({key: orc.as_dict(), f"{key}_ratio": orc.ppl / dense.ppl})
    return res
