"""What the router study scripts share: their common options, the dense model with the texts tokenised, and the
finegrained conversion with the default calibration (32 x 512) applied in place."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_moeify.bundled import DEFAULT_CALIB, EVAL_EXCERPT, NONFICTION_EXCERPT  # noqa: E402
from gguf_moeify.convert import make_plans, open_model  # noqa: E402
from gguf_moeify.eval_cmd import add_bos_of  # noqa: E402
from gguf_moeify.evaluate import read_text, tokenize_for_ppl  # noqa: E402
from gguf_moeify.methods import FinegrainedOptions, MethodOptions  # noqa: E402
from gguf_moeify.moe_torch import MoEMLP  # noqa: E402
from gguf_moeify.reference import load_dense, moeify_  # noqa: E402
from gguf_moeify.sizing import expert_layout  # noqa: E402



def study_parser(doc: str) -> argparse.ArgumentParser:
    """The options every study takes: MODEL, --fraction, --texts, --chunks, --ctx, --seed."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--fraction", type=float, default=0.5, help="active fraction of the MLP (default 0.5)")
    p.add_argument("--texts", default=f"{EVAL_EXCERPT},{NONFICTION_EXCERPT}",
                   help="evaluation texts, comma-separated (default: the bundled novel and Python excerpts)")
    p.add_argument("--chunks", type=int, default=8, help="windows per text (default 8)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_study(args):
    """(ckpt, adapter, dense model, bos id or None, {text name: token ids})."""
    ckpt, adapter = open_model(args.model, "float32")
    model, tok = load_dense(ckpt)
    bos = tok.bos_token_id if add_bos_of(tok) else None
    texts = {Path(t).stem.replace("_excerpt", ""): tokenize_for_ppl(tok, read_text(t), bos is not None)
             for t in args.texts.split(",")}
    return ckpt, adapter, model, bos, texts


def convert_finegrained(model, ckpt, adapter, args, expert_counts: str = "fixed"
                        ) -> tuple[list[MoEMLP], tuple[int, int, int], MethodOptions]:
    """Convert ``model`` in place (finegrained at ``args.fraction``, default calibration, ``expert_counts``): its
    MoE layers, (E, S, K) and the options used."""
    e, s, k = expert_layout("finegrained", ckpt.d_ff, args.fraction, None)
    opts = MethodOptions(experts=e, shared=s, top_k=k, calib=DEFAULT_CALIB, seed=args.seed,   # default windows
                         own=FinegrainedOptions(expert_counts=expert_counts))
    moeify_(model, adapter, make_plans(ckpt, adapter, "finegrained", opts))
    return [m for m in model.modules() if isinstance(m, MoEMLP)], (e, s, k), opts
