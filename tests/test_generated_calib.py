"""``--calib generated``: calibration windows the dense model samples itself, seeded and cached."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from gguf_moeify.adapters import adapter_for
from gguf_moeify.calibration import calib_tokens, calibrated_plans
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.generated_calib import cache_key, sample_windows
from gguf_moeify.methods import MethodOptions, get_method


class NextTokenModel(torch.nn.Module):
    """A causal LM whose next-token logits are ``table[previous token]``; counts its forward calls."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.calls = 0

    def forward(self, input_ids, cache=None, use_cache=True):
        self.calls += 1
        return {"logits": self.table[input_ids], "cache": cache}


def test_samples_follow_the_model_and_skip_banned_tokens():
    vocab = 8
    # token t is followed by t + 1 (mod 8) almost surely: the windows are that chain
    chain = torch.full((vocab, vocab), -30.0)
    chain[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab] = 30.0
    model = NextTokenModel(chain)
    ids = sample_windows(model, start=3, banned=[], samples=2, seqlen=6, seed=0, progress=False)
    assert ids.tolist() == [[3, 4, 5, 6, 7, 0]] * 2
    assert model.calls == 6        # one step per token with the cache, not a rerun of the prefix
    # a uniform model: every token but the banned ones, in proportions near uniform; seeded
    uniform = NextTokenModel(torch.zeros(vocab, vocab))
    a = sample_windows(uniform, start=0, banned=[0, 5], samples=64, seqlen=65, seed=1, progress=False)
    b = sample_windows(uniform, start=0, banned=[0, 5], samples=64, seqlen=65, seed=1, progress=False)
    c = sample_windows(uniform, start=0, banned=[0, 5], samples=64, seqlen=65, seed=2, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    body = a[:, 1:].reshape(-1)
    counts = torch.bincount(body, minlength=vocab)
    assert counts[0] == 0 and counts[5] == 0
    share = counts[[1, 2, 3, 4, 6, 7]].double() / len(body)
    assert (share - 1 / 6).abs().max() < 0.03     # 4096 draws: the standard error is 0.006


def test_generated_windows_are_seeded_cached_and_calibrate(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("GGUF_MOEIFY_CACHE", str(tmp_path))
    ckpt = Checkpoint(tiny_models["llama"])
    a = calib_tokens(ckpt, "generated", 3, 24, seed=5, progress=False)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ckpt.path))
    assert a.shape == (3, 24) and (a[:, 0] == tok.bos_token_id).all()
    assert not set(a[:, 1:].reshape(-1).tolist()) & set(tok.all_special_ids)
    assert len({tuple(r) for r in a.tolist()}) == 3          # the windows differ from one another
    cached = list((tmp_path / "calib").glob("generated-*.pt"))
    assert len(cached) == 1
    # the second call reads the cache: no model is loaded
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the cached windows were not reused"))
    assert torch.equal(calib_tokens(ckpt, "generated", 3, 24, seed=5, progress=False), a)
    monkeypatch.undo()
    monkeypatch.setenv("GGUF_MOEIFY_CACHE", str(tmp_path))
    assert not torch.equal(calib_tokens(ckpt, "generated", 3, 24, seed=6, progress=False), a)
    # the pipeline calibrates on exactly these windows
    opts = MethodOptions(experts=4, shared=1, top_k=1, calib="generated", calib_samples=3, calib_seqlen=24, seed=5)
    seen = []
    real = calib_tokens

    def spy(*args, **kw):
        seen.append(real(*args, **kw))
        return seen[-1]
    monkeypatch.setattr("gguf_moeify.calibration.calib_tokens", spy)
    plans = calibrated_plans(ckpt, adapter_for(ckpt.config), get_method("cmoe"), opts, progress=False)
    assert len(plans) == ckpt.n_layers and torch.equal(seen[0], a)


def test_cache_key_follows_weights_edited_in_place(tiny_models, tmp_path):
    model = shutil.copytree(tiny_models["llama"], tmp_path / "m")
    ckpt = Checkpoint(model)
    key = cache_key(ckpt, 3, 24, 5)
    assert cache_key(Checkpoint(model), 3, 24, 5) == key          # the same files: the same windows
    weights = next(model.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))   # same size, rewritten later
    assert cache_key(Checkpoint(model), 3, 24, 5) != key
    assert cache_key(ckpt, 3, 24, 6) != cache_key(ckpt, 4, 24, 5) != cache_key(ckpt, 3, 25, 5)


def test_sources_joined_by_commas_share_the_windows(tiny_models, tmp_path, monkeypatch):
    from gguf_moeify.bundled import CALIB_EXCERPT, DOCS_EXCERPT
    from gguf_moeify.calibration import check_text_source, corpus_tokens, draw_windows, tokenize_text
    from gguf_moeify.errors import UserError
    monkeypatch.setenv("GGUF_MOEIFY_CACHE", str(tmp_path))
    ckpt = Checkpoint(tiny_models["llama"])
    mixed = calib_tokens(ckpt, "generated,bundled", 5, 24, seed=3, progress=False)
    assert torch.equal(mixed[:3], calib_tokens(ckpt, "generated", 3, 24, seed=3, progress=False))
    text = tokenize_text(ckpt.path, str(CALIB_EXCERPT))
    assert torch.equal(mixed[3:], draw_windows(text, 2, 24, seed=3))
    assert torch.equal(calib_tokens(ckpt, "bundled", 2, 24, seed=3), draw_windows(text, 2, 24, seed=3))
    docs = tokenize_text(ckpt.path, str(DOCS_EXCERPT))
    assert torch.equal(calib_tokens(ckpt, "bundled-docs", 2, 24, seed=3), draw_windows(docs, 2, 24, seed=3))
    # three sources: the first ones get the remainder (7 = 3 + 2 + 2)
    three = calib_tokens(ckpt, "generated,bundled,bundled-docs", 7, 24, seed=3, progress=False)
    assert torch.equal(three[:3], calib_tokens(ckpt, "generated", 3, 24, seed=3, progress=False))
    assert torch.equal(three[3:5], draw_windows(text, 2, 24, seed=3))
    assert torch.equal(three[5:], draw_windows(docs, 2, 24, seed=3))
    # the trainers' corpus: the text, then the generated windows one after another
    corpus = corpus_tokens(ckpt, f"{CALIB_EXCERPT},generated", 3, 24, seed=3)
    assert torch.equal(corpus, torch.cat([text, calib_tokens(ckpt, "generated", 3, 24, seed=3).reshape(-1)]))
    check_text_source(f"generated,bundled,{CALIB_EXCERPT}", "--calib")
    with pytest.raises(UserError, match="--calib nope.txt: no such file"):
        check_text_source("generated,nope.txt", "--calib")
    # a path with a comma in its name is one source
    odd = tmp_path / "a,b.txt"
    odd.write_text("some text " * 200)
    check_text_source(str(odd), "--calib")


def test_convert_calibrates_on_the_default_sources_without_calib(tiny_models, tmp_path, monkeypatch):
    import json

    import gguf

    from gguf_moeify.bundled import DEFAULT_CALIB
    from gguf_moeify.cli import main as cli_main
    monkeypatch.setenv("GGUF_MOEIFY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out.gguf"
    assert cli_main([str(tiny_models["llama"]), str(out), "--method", "finegrained", "--calib-samples", "2",
                     "--calib-seqlen", "32", "-q"]) == 0
    field = gguf.GGUFReader(str(out)).fields["gguf_moeify.provenance"]
    recorded = json.loads(bytes(field.parts[field.data[0]]).decode())
    assert recorded["options"]["calib"] == DEFAULT_CALIB == "generated,bundled,bundled-docs"
    assert len(list((tmp_path / "cache" / "calib").glob("generated-*.pt"))) == 1   # one window generated


def test_generation_runs_in_the_stored_16_bit_type():
    from gguf_moeify.generated_calib import generation_dtype

    class Stored:
        def __init__(self, stored, dtype):
            self.stored, self.dtype = stored, dtype

        def names(self):
            return ["w"]

        def header_dtype(self, name):
            return self.stored
    assert generation_dtype(Stored("BF16", torch.float32)) == torch.bfloat16
    assert generation_dtype(Stored("F16", torch.float32)) == torch.float16
    assert generation_dtype(Stored("F32", torch.float32)) == torch.float32
    assert generation_dtype(Stored("BF16", torch.float16)) == torch.float16   # an explicit --dtype wins
