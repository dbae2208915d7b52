"""ToMoE: training lowers its loss and moves the active ratio toward the budget, resuming from a checkpoint takes the
same steps as an uninterrupted run, the export is exactly the trained model at inference (hard masks, argmax
routing) in the torch reference and in the patched llama.cpp, and its stock form computes the same in unmodified
llama.cpp."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gguf_moeify.adapters import adapter_for
from gguf_moeify.calibration import tokenize_text
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.cli import main as cli_main
from gguf_moeify.convert import make_plans
from gguf_moeify.llama_cpp import relative_difference
from gguf_moeify.methods import MethodOptions, ToMoEOptions
from gguf_moeify.methods.tomoe import PAD, plans_from_masks
from gguf_moeify.moe_torch import MoEMLP
from gguf_moeify.reference import load_dense, moeify_
from gguf_moeify.tomoe_train import ToMoEModel, TrainOptions, budget_penalty, fingerprint, step_window, train

from gguf_moeify.bundled import EVAL_EXCERPT

TEXT = EVAL_EXCERPT


def _trained(model_dir, steps: int, budget: float = 0.25, state=None, experts: int = 4, budget_on: str = "widest"):
    ckpt = Checkpoint(model_dir)
    adapter = adapter_for(ckpt.config)
    model, _ = load_dense(ckpt, tokenizer=False)
    opts = TrainOptions(experts=experts, budget=budget, budget_on=budget_on, steps=steps, seqlen=48, seed=3,
                        state=None if state is None else str(state))
    tm = ToMoEModel(model, adapter, ckpt.n_layers, opts)
    ids = tokenize_text(ckpt.path, str(TEXT))
    run = train(tm, ids, fingerprint(str(ckpt.path), "test text", opts), progress=False) if steps else None
    return ckpt, adapter, tm, ids, run


def _inference_ratio(tm, ids) -> float:
    tm.logits(step_window(ids, 48, 99, 0))
    return float(np.mean([float(m.record["active"]) for m in tm.layers]))


def test_training_lowers_loss_and_moves_ratio_to_budget(tiny_models):
    _, _, untrained, ids, _ = _trained(tiny_models["llama"], 0)
    before = _inference_ratio(untrained, ids)
    _, _, tm, ids, _ = _trained(tiny_models["llama"], 60, budget=0.25)
    after = _inference_ratio(tm, ids)
    # the run starts from (nearly) the dense model: masks all-on, far from the budget
    assert before > 0.9
    assert abs(after - 0.25) < 0.5 * abs(before - 0.25), (before, after)
    losses = [step["loss"] for step in tm.history]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])


@pytest.mark.parametrize("budget_on", ["widest", "layer"])
def test_budget_on_the_widest_expert(tiny_models, budget_on):
    """``widest`` holds the mean over layers of each layer's widest expert to the budget, ``layer`` each layer's."""
    _, _, tm, _, _ = _trained(tiny_models["llama"], 60, budget=0.25, budget_on=budget_on)
    masks = tm.hard_masks()
    widest = (masks.sum(-1).amax(-1) / masks.shape[-1]).tolist()
    assert abs(np.mean(widest) - 0.25) < 0.1, widest
    if budget_on == "layer":
        assert max(abs(w - 0.25) for w in widest) < 0.1, widest
    # one wide and one narrow layer meet the budget on average, not in each layer
    unequal, ratio = torch.tensor([0.4, 0.1]), torch.tensor(0.25)
    penalty = budget_penalty(budget_on, 0.25, unequal, ratio)
    assert (penalty > 0.3) if budget_on == "layer" else penalty.abs() < 1e-6, penalty
    assert budget_penalty("tokens", 0.25, unequal, ratio).abs() < 1e-6


def test_resume_takes_the_same_steps(tiny_models, tmp_path, monkeypatch):
    """A run interrupted after its checkpoint at step 3 (and one unsaved step) resumes there and ends where an
    uninterrupted run of the same options ends."""
    import gguf_moeify.tomoe_train as tomoe_train
    state = tmp_path / "run.pt"
    _, _, whole, _, _ = _trained(tiny_models["mistral"], 6)
    monkeypatch.setattr(tomoe_train, "SAVE_EVERY", 3)
    real_window = tomoe_train.step_window

    def interrupted(ids, seqlen, seed, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_window(ids, seqlen, seed, step)
    monkeypatch.setattr(tomoe_train, "step_window", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _trained(tiny_models["mistral"], 6, state=state)
    assert torch.load(state, weights_only=False)["step"] == 3
    monkeypatch.setattr(tomoe_train, "step_window", real_window)
    _, _, resumed, _, run = _trained(tiny_models["mistral"], 6, state=state)
    assert run["resumed_at"] == 3
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the same state with other options is refused, not silently overwritten
    from gguf_moeify.errors import UserError
    with pytest.raises(UserError, match="other options"):
        _trained(tiny_models["mistral"], 6, budget=0.5, state=state)


def test_export_layout_and_math():
    """Hand-made masks: neurons in every expert become the shared expert in whole blocks of PAD, overlapping
    neurons are duplicated, unequal experts are padded with zero neurons, unused neurons are dropped; and the plan's
    MoE MLP computes exactly the masked dense MLP with argmax routing."""
    d_ff, d, E = 160, 24, 3
    m = torch.zeros(1, E, d_ff, dtype=torch.bool)
    m[0, :, :40] = True                  # 40 in every expert: 32 shared, 8 stay in each expert
    m[0, 0, 40:100] = True               # expert 0: 8 + 60 neurons
    m[0, 1, 90:110] = True               # expert 1: 8 + 20, overlapping expert 0 on 90..99
    m[0, 2, 150:151] = True              # expert 2: 8 + 1; neurons 110..149 and 151..159 unused
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(E, d, generator=gen)
    (plan,) = plans_from_masks(m, [w])
    assert plan.shared_width == PAD and set(plan.shared.tolist()) == set(range(32))
    assert plan.info["expert_sizes"] == [68, 28, 9]
    assert plan.expert_width == 96 and plan.expert_width % PAD == 0
    assert plan.info["dropped_neurons"] == 49
    assert set(plan.experts[1][plan.experts[1] >= 0].tolist()) == set(range(32, 40)) | set(range(90, 110))
    assert (plan.experts[2] == -1).sum() == 96 - 9
    gate, up = torch.randn(d_ff, d, generator=gen), torch.randn(d_ff, d, generator=gen)
    down = torch.randn(d, d_ff, generator=gen)
    x = torch.randn(200, d, generator=gen)
    choice = (x @ w.t()).argmax(-1)
    assert len(set(choice.tolist())) == E
    h = torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())
    want = (h * m[0, choice].float()) @ down.t()
    moe = MoEMLP(plan, gate, up, down, F.silu)
    torch.testing.assert_close(moe(x), want, rtol=1e-4, atol=1e-4)
    # the neuron oracle counts each used neuron once (not its copies, not padding): here its budget (shared +
    # width = 128) exceeds the 111 used neurons, so it keeps exactly those
    moe.oracle = "neuron"
    used = m[0].any(0).float()
    torch.testing.assert_close(moe(x), (h * used) @ down.t(), rtol=1e-4, atol=1e-4)


def _trained_plans(model_dir, steps=30, budget=0.3):
    ckpt, adapter, tm, ids, _ = _trained(model_dir, steps, budget=budget)
    plans = plans_from_masks(tm.hard_masks(), tm.router_weights())
    return ckpt, adapter, tm, ids, plans


def test_export_equals_the_trained_model(tiny_models):
    """The torch reference of the exported plans is the ToMoE model as training left it, at inference."""
    ckpt, adapter, tm, ids, plans = _trained_plans(tiny_models["llama"])
    assert any(len(set(p.info["expert_sizes"])) > 1 for p in plans)   # unequal experts, so padding is exercised
    window = step_window(ids, 48, 5, 0)
    trained = tm.logits(window)
    model, _ = load_dense(ckpt, tokenizer=False)
    moeify_(model, adapter, plans)
    with torch.no_grad():
        exported = model(input_ids=window, use_cache=False).logits
    torch.testing.assert_close(exported, trained, rtol=1e-4, atol=1e-4)
    # and routing matters: the dense model is far from both
    dense, _ = load_dense(ckpt, tokenizer=False)
    with torch.no_grad():
        assert (dense(input_ids=window, use_cache=False).logits - trained).abs().max() > 100 * 1e-4


def test_tomoe_file_matches_torch_in_llama_cpp(tools, tiny_models, eval_excerpt, tmp_path):
    from test_llama_cpp_parity import CHUNKS, CTX, F32_KV, _torch_and_llama_cpp, _write
    out = tmp_path / "tomoe.gguf"
    opts = MethodOptions(experts=4, calib=str(TEXT), own=ToMoEOptions(budget=0.3, train_steps=30, seqlen=48))
    ckpt, adapter, plans = _write(tiny_models["llama"], lambda c, a: make_plans(c, a, "tomoe", opts, progress=False),
                                  out, opts)
    assert [p.top_k for p in plans] == [1, 1] and plans[0].router.kind == "linear"
    # the file records the effective training options (defaults included), not only those given
    run = plans[0].info["training"]
    assert (run["budget"], run["budget_on"], run["steps"], run["seqlen"]) == (0.3, "widest", 30, 48)
    ref, cpp = _torch_and_llama_cpp(tools, out, ckpt, adapter, plans, eval_excerpt, tmp_path)
    assert relative_difference(ref.ppl, cpp.ppl) < 1e-3, (ref.ppl, cpp.ppl)
    full = tools.perplexity(out, eval_excerpt, ctx=CTX, chunks=CHUNKS, threads=2,
                            extra=F32_KV + ["--override-kv", f"{adapter.gguf_arch}.expert_used_count=int:4"])
    assert abs(ref.ppl - cpp.ppl) < 0.1 * abs(full.ppl - cpp.ppl)


@pytest.mark.parametrize("argv, message", [
    (["--method", "cmoe", "--budget", "0.5"], "--budget is an option of --method tomoe, not cmoe"),
    (["--method", "tomoe", "--budget", "1.5"], "--budget must be in"),
    (["--method", "tomoe", "--top-k", "2"], "top-1"),
    (["--method", "tomoe", "--train-steps", "0"], "--train-steps must be"),
    (["--method", "tomoe", "--shared", "1"], "no --shared option"),
])
def test_cli_errors(tiny_models, tmp_path, capsys, argv, message):
    out = tmp_path / "x.gguf"
    code = cli_main([str(tiny_models["llama"]), str(out), "--calib", str(TEXT), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_file_bytes_do_not_depend_on_the_output_name(tiny_models, tmp_path):
    """The training state's path (OUT + .tomoe-state.pt) is not part of what the file records: two outputs of the
    same conversion are the same bytes, and the provenance lists tomoe's own options with their defaults."""
    import gguf
    import json
    files = []
    for name in ("a.gguf", "other-name.gguf"):
        out = tmp_path / name
        code = cli_main([str(tiny_models["llama"]), str(out), "--calib", str(TEXT), "--method", "tomoe", "-E", "4",
                         "--train-steps", "2", "--seqlen", "32", "--calib-samples", "1", "-q"])
        assert code == 0 and (tmp_path / (name + ".tomoe-state.pt")).is_file()
        files.append(out.read_bytes())
    assert files[0] == files[1]
    prov = json.loads(gguf.GGUFReader(tmp_path / "a.gguf").get_field("gguf_moeify.provenance").contents())
    assert prov["options"]["own"] == {"budget": 0.5, "budget_on": "widest", "train_steps": 2, "lr": 5e-3, "seqlen": 32}


def test_per_layer_expert_widths_in_llama_cpp(tools, tiny_models, eval_excerpt, tmp_path):
    """Layers whose experts differ in width (written as a per-layer expert_feed_forward_length array) load in the
    patched llama.cpp and match the torch reference."""
    import gguf
    from test_llama_cpp_parity import _torch_and_llama_cpp, _write
    rng = np.random.default_rng(0)
    masks = torch.zeros(2, 4, 256, dtype=torch.bool)
    for e in range(4):   # layer 0: 40..60 neurons an expert (padded to 64), layer 1: 10..30 (padded to 32)
        masks[0, e, rng.choice(256, 40 + 5 * e, replace=False)] = True
        masks[1, e, rng.choice(256, 10 + 5 * e, replace=False)] = True

    def make(ckpt, adapter):
        return plans_from_masks(masks, [torch.as_tensor(rng.standard_normal((4, ckpt.n_embd))) for _ in range(2)])
    out = tmp_path / "widths.gguf"
    ckpt, adapter, plans = _write(tiny_models["llama"], make, out)
    assert [p.expert_width for p in plans] == [64, 32]
    assert gguf.GGUFReader(out).fields[f"{adapter.gguf_arch}.expert_feed_forward_length"].contents() == [64, 32]
    ref, cpp = _torch_and_llama_cpp(tools, out, ckpt, adapter, plans, eval_excerpt, tmp_path)
    assert relative_difference(ref.ppl, cpp.ppl) < 1e-3, (ref.ppl, cpp.ppl)


@pytest.mark.parametrize("arch, stock_arch", [("llama", "llama"), ("qwen3", "qwen3moe")])
def test_stock_file_computes_the_unit_gate_plans_in_unpatched_llama_cpp(stock_tools, tiny_models, eval_excerpt,
                                                                         tmp_path, arch, stock_arch):
    """--runtime stock: the shared expert folded into every expert and every layer padded to the widest, written as
    a Mixtral-path llama / qwen3moe file. The torch model equals the unit-gate plans' (top-1 renormalised weighs
    exactly 1) and unmodified llama.cpp equals torch."""
    import gguf
    from gguf_moeify.methods.tomoe import stock_plans
    from test_llama_cpp_parity import _torch_and_llama_cpp, _write
    rng = np.random.default_rng(1)
    masks = torch.zeros(2, 4, 256, dtype=torch.bool)
    masks[:, :, :40] = True   # in every expert: 32 of them become the shared expert
    for e in range(4):        # layer 0: 40..70 more neurons an expert, layer 1: 10..40
        masks[0, e, 40 + rng.choice(216, 40 + 10 * e, replace=False)] = True
        masks[1, e, 40 + rng.choice(216, 10 + 10 * e, replace=False)] = True
    ckpt = Checkpoint(tiny_models[arch])
    routers = [torch.as_tensor(rng.standard_normal((4, ckpt.n_embd))) for _ in range(2)]
    unit = plans_from_masks(masks, routers)
    assert [p.shared_width for p in unit] == [32, 32] and [p.expert_width for p in unit] == [96, 64]
    out = tmp_path / "stock.gguf"
    ckpt, adapter, plans = _write(tiny_models[arch], lambda c, a: stock_plans(unit, a.name), out)
    shapes = [(p.shared_width, p.expert_width, p.gating, p.norm_weights) for p in plans]
    assert shapes == [(0, 128, "softmax", True)] * 2
    fields = gguf.GGUFReader(out).fields
    assert fields["general.architecture"].contents() == stock_arch
    assert not any(k.endswith(("expert_weights_unit", "expert_router_type")) for k in fields)
    tokens = torch.randint(0, ckpt.config["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    logits = []
    for p in (unit, plans):
        model, _ = load_dense(ckpt, tokenizer=False)
        moeify_(model, adapter, p)
        with torch.no_grad():
            logits.append(model(input_ids=tokens, use_cache=False).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    ref, cpp = _torch_and_llama_cpp(stock_tools, out, ckpt, adapter, plans, eval_excerpt, tmp_path)
    assert relative_difference(ref.ppl, cpp.ppl) < 1e-3, (ref.ppl, cpp.ppl)


def test_make_plans_for_the_stock_runtime(tiny_models):
    opts = MethodOptions(experts=4, calib=str(TEXT), runtime="stock",
                         own=ToMoEOptions(budget=0.3, train_steps=5, seqlen=48))
    ckpt = Checkpoint(tiny_models["llama"])
    plans = make_plans(ckpt, adapter_for(ckpt.config), "tomoe", opts, progress=False)
    assert len({p.expert_width for p in plans}) == 1 and all(p.shared_width == 0 for p in plans)
    assert all(p.gating == "softmax" and p.norm_weights and p.top_k == 1 for p in plans)
    # a stock file has one expert width, so by default the budget holds in every layer
    assert plans[0].info["training"]["steps"] == 5 and plans[0].info["training"]["budget_on"] == "layer"
