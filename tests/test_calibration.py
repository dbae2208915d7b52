"""Calibration data and the layer-sequential pipeline: deterministic windows, clear errors, and hidden states that
flow through the converted layers exactly as the torch reference model computes them."""
from __future__ import annotations

import pytest
import torch

from gguf_moeify.adapters import adapter_for
from gguf_moeify.calibration import calib_tokens, calibrated_plans, read_calib_text
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.errors import UserError
from gguf_moeify.methods import MethodOptions, get_method
from gguf_moeify.reference import load_dense, moeify_

from gguf_moeify.bundled import EVAL_EXCERPT

CALIB = EVAL_EXCERPT


def _opts(**kw) -> MethodOptions:
    base = dict(experts=4, shared=1, calib=str(CALIB), calib_samples=2, calib_seqlen=48)
    return MethodOptions(**{**base, **kw})


def test_windows_are_seeded_and_capped(tiny_models):
    ckpt = Checkpoint(tiny_models["llama"])
    a = calib_tokens(ckpt, str(CALIB), 3, 32, seed=5)
    b = calib_tokens(ckpt, str(CALIB), 3, 32, seed=5)
    c = calib_tokens(ckpt, str(CALIB), 3, 32, seed=6)
    assert a.shape == (3, 32) and torch.equal(a, b) and not torch.equal(a, c)
    ckpt.config = {**ckpt.config, "max_position_embeddings": 16}
    capped = calib_tokens(ckpt, str(CALIB), 1, 64)
    assert capped.shape == (1, 16)


def test_folder_and_errors(tmp_path, tiny_models):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert read_calib_text(str(tmp_path)) == "first\n\nsecond"
    with pytest.raises(UserError, match="no such file"):
        read_calib_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.txt"):
        read_calib_text(str(tmp_path / "empty"))
    ckpt = Checkpoint(tiny_models["llama"])
    with pytest.raises(UserError, match="too short"):
        calib_tokens(ckpt, str(tmp_path / "a.txt"), 1, 64)


def test_wikitext2_offline_is_a_user_error(monkeypatch):
    import sys
    import types

    def offline(*a, **k):
        raise ConnectionError("offline")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(UserError, match="could not download WikiText-2"):
        read_calib_text("wikitext2")
    monkeypatch.setitem(sys.modules, "datasets", None)      # not installed
    with pytest.raises(UserError, match="needs the `datasets` package"):
        read_calib_text("wikitext2")


def test_methods_need_calibration(tiny_models):
    from gguf_moeify.convert import make_plans
    ckpt = Checkpoint(tiny_models["llama"])
    for method in ("cmoe", "moefication"):
        with pytest.raises(UserError, match="--calib"):
            make_plans(ckpt, adapter_for(ckpt.config), method, MethodOptions(experts=4), progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_propagation_through_converted_layers(tiny_models, arch, monkeypatch):
    """The states captured before each layer are the hidden states of the HF model whose earlier MLPs were swapped
    for the MoE MLPs of the plans: with all experts active they equal the dense model's; with sparse routing
    they equal the sparse reference model's (so layer i+1 was calibrated on layer i's converted output)."""
    ckpt = Checkpoint(tiny_models[arch])
    adapter = adapter_for(ckpt.config)
    if arch == "llama":
        ids = calib_tokens(ckpt, str(CALIB), 2, 48, seed=0)
    else:  # random tokens for the models with the tiny SentencePiece tokenizer
        ids = torch.randint(0, ckpt.config["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
        monkeypatch.setattr("gguf_moeify.calibration.calib_tokens", lambda *a, **k: ids)
    # Gemma's GELU is evaluated through ggml's f16 table (adapters.ggml_gelu): an input difference of float rounding
    # that crosses an f16 rounding boundary becomes a step of one f16 ulp in the output (~5e-4 relative)
    tol = 2e-4 if arch == "gemma3" else 1e-5
    for top_k in (3, 1):
        captured: list[torch.Tensor] = []
        plans = calibrated_plans(ckpt, adapter, get_method("cmoe"), _opts(top_k=top_k), progress=False,
                                 capture=captured)
        model, _ = load_dense(ckpt, tokenizer=False)
        if top_k == 3:
            dense = model(input_ids=ids, output_hidden_states=True).hidden_states
        moeify_(model, adapter, plans)
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        for i in range(ckpt.n_layers):
            assert (captured[i] - ref[i]).abs().max() < tol
            if top_k == 3:
                assert (captured[i] - dense[i]).abs().max() < tol
        # the state after the last layer (HF reports it after the final norm)
        assert (model.model.norm(captured[-1]) - ref[-1]).abs().max() < tol
