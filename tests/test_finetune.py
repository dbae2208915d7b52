"""--finetune lora: training lowers the held-out loss, merging is exact, and the GGUF carries the merged weights."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gguf_moeify.adapters import adapter_for
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.cli import main as cli_main
from gguf_moeify.convert import make_plans
from gguf_moeify.finetune import (LoRALinear, LoRAOptions, LowRankDelta, attach_lora, decoder_layers,
                                  finetune_lora, merge_lora)
from gguf_moeify.methods import MethodOptions
from gguf_moeify.moe_torch import MoEMLP, layer_plans
from gguf_moeify.plan import expert_tensors
from gguf_moeify.reference import load_dense, moeify_
from gguf_moeify.rope_layout import permute_qk

from gguf_moeify.bundled import EVAL_EXCERPT

TEXT = EVAL_EXCERPT


def _plans_and_dense(model_dir, method="cmoe", experts=4, shared=1, top_k=1):
    ckpt = Checkpoint(model_dir)
    adapter = adapter_for(ckpt.config)
    opts = MethodOptions(experts=experts, shared=shared, top_k=top_k, calib=str(TEXT), calib_samples=2,
                         calib_seqlen=48)
    plans = make_plans(ckpt, adapter, method, opts, progress=False)
    model, _ = load_dense(ckpt, tokenizer=False)
    return ckpt, adapter, plans, model


def _moe_model(model_dir):
    ckpt, adapter, plans, model = _plans_and_dense(model_dir)
    moeify_(model, adapter, plans)
    return ckpt, adapter, plans, model


def test_merge_is_exact_and_removes_lora(tiny_models):
    ckpt, adapter, _, model = _moe_model(tiny_models["mistral"])
    layers = decoder_layers(model, adapter, ckpt.n_layers)
    params = attach_lora(model, layers, LoRAOptions(rank=4))
    n_linear = sum(isinstance(m, LoRALinear) for m in model.modules())
    n_expert = sum(len(m.deltas) for m in model.modules() if isinstance(m, MoEMLP))
    assert n_linear == 4 * ckpt.n_layers and n_expert == 6 * ckpt.n_layers     # q,k,v,o; 3 routed + 3 shared
    assert all(p.requires_grad for p in params) and not any(p.requires_grad for p in model.lm_head.parameters())
    ids = torch.randint(0, ckpt.config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = model(input_ids=ids).logits
        for m in model.modules():
            if isinstance(m, LowRankDelta):
                m.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        lora = model(input_ids=ids).logits
    merge_lora(layers)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert not any(isinstance(m, (LoRALinear, LowRankDelta)) for m in model.modules())
    assert (lora - start).abs().max() > 1e-2                  # the update changes the model ...
    assert torch.allclose(merged, lora, atol=1e-5, rtol=1e-5)  # ... and merging keeps exactly that model


def test_training_lowers_held_out_loss_and_the_gguf_carries_the_merged_weights(tiny_models, tmp_path):
    import gguf
    from gguf_moeify.gguf_writer import write_gguf
    from gguf_moeify.finetune import finetuned_overrides
    ckpt, adapter, plans, model = _moe_model(tiny_models["llama"])
    opts = LoRAOptions(rank=4, lr=1e-2, steps=24, samples=9, seqlen=64, data=str(TEXT))
    info = finetune_lora(model, ckpt, adapter, None, opts, progress=False)
    assert info["steps"] == 24 and info["train_windows"] == 8 and info["held_out_windows"] == 1
    assert info["held_out_loss_best"] < info["held_out_loss_start"] - 0.05, info
    out = tmp_path / "tuned.gguf"
    write_gguf(out, ckpt, adapter, replace(plans.with_layers(layer_plans(model)), provenance={"test": True}), "f32",
               progress=False, overrides=finetuned_overrides(model, adapter, ckpt.n_layers))
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    layer = model.model.layers[1]
    q = layer.self_attn.q_proj.weight.detach()
    assert np.array_equal(tensors["blk.1.attn_q.weight"], permute_qk(q, ckpt.config["num_attention_heads"]).numpy())
    assert np.array_equal(tensors["blk.1.attn_output.weight"], layer.self_attn.o_proj.weight.detach().numpy())
    # the file's layout: gate and up merged (gate rows first), the shared expert as the first n experts
    f, n = plans[1].expert_width, plans[1].shared_width // plans[1].expert_width
    down = tensors["blk.1.ffn_down_exps.weight"]
    written = {"gate_exps": tensors["blk.1.ffn_gate_up_exps.weight"][n:, :f],
               "down_shexp": down[:n].transpose(1, 0, 2).reshape(down.shape[1], n * f)}
    for key in ("gate_exps", "down_shexp"):
        tuned = getattr(layer.mlp, key).numpy()
        assert np.array_equal(written[key], tuned)
        orig = expert_tensors(plans[1], *(ckpt.get(n) for n in adapter.mlp_names(1)))[key].numpy()
        assert np.abs(tuned - orig).max() > 1e-4                # training moved the expert weights
    # what LoRA does not touch is the checkpoint's: norms, embeddings, routers
    assert np.array_equal(tensors["blk.1.attn_norm.weight"], ckpt.get("model.layers.1.input_layernorm.weight").numpy())
    assert np.array_equal(tensors["blk.1.ffn_gate_inp.weight"][n:], plans[1].router.tensors["gate"])


@pytest.mark.parametrize("argv, message", [
    (["--method", "mlpmoe", "--finetune", "lora"], "needs text"),
    (["--method", "cmoe", "--calib", str(TEXT), "--finetune", "lora", "--finetune-rank", "0"],
     "--finetune-rank must be >= 1"),
    (["--method", "cmoe", "--calib", str(TEXT), "--finetune", "lora", "--finetune-data", "/nonexistent.txt"],
     "no such file"),
])
def test_bad_finetune_options_are_one_line(tiny_models, tmp_path, capsys, argv, message):
    out = tmp_path / "x.gguf"
    code = cli_main([str(tiny_models["llama"]), str(out), "-q", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


def test_cli_finetune_writes_a_file_with_the_run_in_its_provenance(tiny_models, tmp_path):
    import gguf
    import json
    out = tmp_path / "tuned.gguf"
    code = cli_main([str(tiny_models["llama"]), str(out), "--method", "cmoe", "--config", "S1A1E4", "--calib",
                     str(TEXT), "--calib-samples", "2", "--calib-seqlen", "48", "--finetune", "lora",
                     "--finetune-samples", "4", "--finetune-seqlen", "32", "--finetune-steps", "3", "-q",
                     "--outtype", "f32"])
    assert code == 0 and out.is_file()
    field = gguf.GGUFReader(out).get_field("gguf_moeify.provenance")
    prov = json.loads(bytes(field.parts[field.data[0]]).decode())
    assert prov["finetune"]["method"] == "lora" and prov["finetune"]["steps"] == 3


def _finegrained_model(model_dir):
    return _plans_and_dense(model_dir, "finegrained", experts=8, shared=2, top_k=2)


def test_the_distillation_teacher_is_the_dense_model_and_lora_leaves_it_alone(tiny_models):
    from gguf_moeify.finetune import as_teacher, keeps_every_neuron_once
    ckpt, adapter, plans, model = _finegrained_model(tiny_models["llama"])
    assert all(keeps_every_neuron_once(p) for p in plans)
    ids = torch.randint(0, ckpt.config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        moeify_(model, adapter, plans)
        routed = model(input_ids=ids).logits
        attach_lora(model, decoder_layers(model, adapter, ckpt.n_layers), LoRAOptions(rank=4))
        for m in model.modules():
            if isinstance(m, LowRankDelta):
                m.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        with as_teacher(model):
            teacher = model(input_ids=ids).logits
        tuned = model(input_ids=ids).logits
    assert (routed - dense).abs().max() > 1e-2 and (tuned - routed).abs().max() > 1e-2
    assert torch.allclose(teacher, dense, atol=1e-5, rtol=1e-5)


def test_kd_refuses_plans_that_drop_neurons(tiny_models):
    from gguf_moeify.errors import UserError
    from gguf_moeify.finetune import keeps_every_neuron_once
    ckpt, adapter, plans, model = _finegrained_model(tiny_models["llama"])
    experts = plans[1].experts.copy()
    experts[0, 0] = -1        # one neuron dropped (as pruning or ToMoE's unused neurons do)
    plans = plans.with_layers([plans[0], replace(plans[1], experts=experts)])
    assert keeps_every_neuron_once(plans[0]) and not keeps_every_neuron_once(plans[1])
    moeify_(model, adapter, plans)
    with pytest.raises(UserError, match="layer 1 drops"):
        finetune_lora(model, ckpt, adapter, None, LoRAOptions(steps=1, samples=2, seqlen=16, data=str(TEXT),
                                                             loss="kd"), progress=False)


def test_straight_through_router_keeps_the_hard_forward_and_gets_gradients():
    from gguf_moeify.plan import MoEPlan, Router
    gen = torch.Generator().manual_seed(0)
    d, d_ff = 16, 64
    gate, up, down = torch.randn(d_ff, d, generator=gen), torch.randn(d_ff, d, generator=gen), \
        torch.randn(d, d_ff, generator=gen)
    plan = MoEPlan(layer=0, d_ff=d_ff, experts=np.arange(48).reshape(6, 8), top_k=2, shared=np.arange(48, 64),
                   router=Router("linear", {"weight": np.random.default_rng(0).normal(size=(6, d))}))
    moe = MoEMLP(plan, gate, up, down, F.silu)
    x = torch.randn(40, d, generator=gen)
    with torch.no_grad():
        hard = moe(x)
    params = moe.trainable_router()
    out = moe(x)
    assert torch.allclose(out, hard, atol=1e-5, rtol=1e-5)     # the value is the file's hard top-k sum
    assert moe.router_fit_loss is not None and moe.router_fit_loss.requires_grad  # the norm-regression term
    out.square().sum().backward()
    grad = params[0].grad
    assert grad is not None and bool((grad.abs().sum(1) > 0).all())   # every expert's row learns, chosen or not
    with torch.no_grad():
        params[0].add_(torch.randn(6, d, generator=gen))
    moe.freeze_router()
    assert isinstance(moe.router["weight"], torch.Tensor) and not moe.router["weight"].requires_grad
    assert np.array_equal(moe.plan.router.tensors["weight"], moe.router["weight"].numpy())  # the writer sees it
    assert not np.array_equal(plan.router.tensors["weight"], moe.plan.router.tensors["weight"])  # a new plan


def test_kd_with_router_training_lowers_held_out_loss_and_writes_the_trained_router(tiny_models, tmp_path):
    import gguf
    from gguf_moeify.gguf_writer import write_gguf
    from gguf_moeify.finetune import finetuned_overrides
    ckpt, adapter, plans, model = _finegrained_model(tiny_models["llama"])
    before = plans[1].router.tensors["weight"].copy()
    moeify_(model, adapter, plans)
    opts = LoRAOptions(rank=4, lr=1e-2, steps=24, samples=9, seqlen=64, data=str(TEXT), loss="kd",
                       router="ste")
    info = finetune_lora(model, ckpt, adapter, None, opts, progress=False)
    assert info["loss"] == "kd" and info["router"] == "ste"
    assert info["held_out_loss_best"] < info["held_out_loss_start"] - 0.05, info
    after = layer_plans(model)[1].router.tensors["weight"]   # the trained router, in a new plan
    assert np.abs(after - before).max() > 1e-4
    out = tmp_path / "kd.gguf"
    write_gguf(out, ckpt, adapter, replace(plans.with_layers(layer_plans(model)), provenance={"test": True}), "f32",
               progress=False, overrides=finetuned_overrides(model, adapter, ckpt.n_layers))
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    n = plans[1].shared_width // plans[1].expert_width   # the shared expert's always-selected slots come first
    assert np.array_equal(tensors["blk.1.ffn_gate_inp.weight"][n:], after)


def test_refit_routers_fit_each_layer_on_the_inputs_its_refitted_predecessors_give(tiny_models):
    from gguf_moeify.finetune import refit_routers
    from gguf_moeify.routers import fit_linear_router, log_norm_targets
    ckpt, adapter, plans, model = _finegrained_model(tiny_models["mistral"])
    moeify_(model, adapter, plans)
    moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
    old = [m.router["weight"].clone() for m in moes]
    windows = torch.randint(0, ckpt.config["vocab_size"], (3, 32), generator=torch.Generator().manual_seed(0))
    assert refit_routers(model, moes, windows, lambda: 1.5) == 1.5
    xs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: xs.setdefault(mod.plan.layer, []).append(a[0][0]))
             for m in moes]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w.unsqueeze(0))
    for h in hooks:
        h.remove()
    for moe, w_old in zip(moes, old):
        x = torch.cat(xs[moe.plan.layer])
        names = ("gate_exps", "up_exps", "down_exps")
        norms = moe._all_experts(x, {n: getattr(moe, n) for n in names}).norm(dim=-1)
        assert np.allclose(moe.plan.router.tensors["weight"], fit_linear_router(x, norms), atol=1e-4)
        assert torch.equal(moe.router["weight"], torch.as_tensor(moe.plan.router.tensors["weight"]))
        target = log_norm_targets(norms).float()
        err_new, err_old = ((x @ moe.router["weight"].t() - target) ** 2).mean(), ((x @ w_old.t() - target) ** 2).mean()
        assert err_new <= err_old + 1e-6
    assert any(not torch.allclose(m.router["weight"], w) for m, w in zip(moes, old))
