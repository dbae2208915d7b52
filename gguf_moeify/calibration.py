"""Calibration data and the layer-sequential pipeline for data-driven methods (CMoE, MoEfication).

Calibration text (``--calib``): a UTF-8 text file, a folder of ``*.txt`` files (sorted by name, joined by blank
lines), ``bundled`` (the package's excerpt), ``generated`` (windows the dense model samples itself:
generated_calib.py) or ``wikitext2`` (WikiText-2 raw train split through the ``datasets`` library; online only), or
several of them joined by commas, which share the windows evenly. A text is tokenised once (no special tokens) and
its windows of ``--calib-seqlen`` tokens are cut at random starts drawn from a generator seeded with ``--seed`` (the
GPTQ/CMoE recipe), so the same options give the same tokens. The window length is capped at the model's
``max_position_embeddings``.

Layer-sequential statistics (AutoAWQ/llm-compressor's "catch the first layer's inputs", CMoE step 6): the HF model
is built on the meta device (no weights), the embedding output of the calibration tokens is computed once, and then
for each decoder layer only that layer is materialised from the checkpoint: its attention part runs on the current
hidden states, the post-attention-norm outputs (the MLP inputs x) go to the method, which returns the layer's
MoEPlan, the MoE MLP is built from the plan, and ``h + moe(x)`` becomes the next layer's input. Memory is one
decoder layer plus the calibration hidden states (samples x seqlen x hidden floats, and the MLP inputs).

With ``calib_outtype`` (q8_0 / q4_0) the hidden states are carried through the layers as that file stores them
(embedding rows, attention matrices and the MoE's experts quantized and dequantized, stored_weights.py), so what a
layer's plan is fitted on is what llama.cpp will give that layer. The methods' statistics still see the source MLP.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import UserError
from .generated_calib import GENERATED, generated_windows
from .stored_weights import ROUND_TRIP_OUTTYPES, as_stored, embedding_outtype, experts_as_stored_, layer_matrices
from .timing import phase, record

WIKITEXT2 = "wikitext2"


@dataclass
class LayerCalib:
    """What a data-driven method gets for one layer: the MLP inputs of every calibration token (T, d), float32,
    exactly as the runtime gives them to the MLP (after the post-attention RMSNorm), the seed, and the MLP's
    activation (``Adapter.act``)."""
    x: torch.Tensor
    act: Callable
    seed: int = 0


BUNDLED = "bundled"             # the package's excerpt of a novel (bundled.CALIB_EXCERPT)
BUNDLED_DOCS = "bundled-docs"   # the package's excerpt of the SQLite documentation (bundled.DOCS_EXCERPT)
KEYWORDS = (GENERATED, BUNDLED, BUNDLED_DOCS, WIKITEXT2)


def source_parts(source: str) -> list[str]:
    """A source is one file, folder or keyword, or several joined by commas (an existing path is taken whole)."""
    if Path(source).expanduser().exists() or "," not in source:
        return [source]
    return [s.strip() for s in source.split(",") if s.strip()]


def part_path(part: str) -> str:
    from .bundled import CALIB_EXCERPT, DOCS_EXCERPT
    return {BUNDLED: str(CALIB_EXCERPT), BUNDLED_DOCS: str(DOCS_EXCERPT)}.get(part, part)


def check_text_source(source: str, flag: str) -> None:
    """A text source (file, folder, keyword, or several of them) that does not exist is one clear error, before
    any work."""
    for part in map(part_path, source_parts(source)):
        if part not in KEYWORDS and not Path(part).expanduser().exists():
            raise UserError(f"{flag} {part}: no such file or folder (give a text file, a folder of .txt files, "
                            f"{', '.join(repr(k) for k in KEYWORDS)}, or several joined by commas)")
        if Path(part).expanduser().is_file():   # not UTF-8 text: refused now, not after loading the model
            from .textfile import read_utf8
            read_utf8(part, f"{flag} file")


def check_calib_options(opts, method: str) -> None:
    """Cheap checks before any work: calibration given, path exists, sizes sane."""
    if not opts.calib:
        raise UserError(f"{method} needs calibration text: give --calib FILE, a folder of .txt files, or {WIKITEXT2}")
    check_text_source(opts.calib, "--calib")
    if opts.calib_samples < 1:
        raise UserError(f"--calib-samples must be >= 1, got {opts.calib_samples}")
    if opts.calib_seqlen < 2:
        raise UserError(f"--calib-seqlen must be >= 2, got {opts.calib_seqlen}")
    if opts.calib_outtype not in (None,) + ROUND_TRIP_OUTTYPES:
        raise UserError(f"calibration through stored weights takes {' or '.join(ROUND_TRIP_OUTTYPES)}, "
                        f"not {opts.calib_outtype!r}")


def read_calib_text(source: str) -> str:
    from .textfile import read_utf8
    if source == WIKITEXT2:
        try:
            from datasets import load_dataset
        except ImportError:
            raise UserError("--calib wikitext2 needs the `datasets` package (pip install datasets) and network "
                            "access; or give a text file or folder")
        try:
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        except Exception as exc:  # offline, hub unreachable, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--calib wikitext2: could not download WikiText-2 ({first}); give a local text file "
                            f"or folder instead")
        return "\n\n".join(ds["text"])
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise UserError(f"--calib {source}: folder has no *.txt files")
        return "\n\n".join(read_utf8(f, "--calib file") for f in files)
    if p.is_file():
        return read_utf8(p, "--calib file")
    raise UserError(f"--calib {source}: no such file or folder (give a text file, a folder of .txt files or "
                    f"'{WIKITEXT2}')")


def calib_tokens(ckpt, source: str, samples: int, seqlen: int, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """(samples, seqlen') int64 token windows, seqlen' = min(seqlen, max_position_embeddings): drawn from the text
    of ``source`` or generated by the model itself; several sources share the windows evenly (the first ones get
    the remainder)."""
    if samples < 1:
        raise UserError(f"--calib-samples must be >= 1, got {samples}")
    if seqlen < 2:
        raise UserError(f"--calib-seqlen must be >= 2, got {seqlen}")
    seqlen = ckpt.window(seqlen)
    parts = source_parts(source)
    out = []
    for i, part in enumerate(parts):
        count = samples // len(parts) + (i < samples % len(parts))
        if count == 0:
            continue
        if part == GENERATED:
            out.append(generated_windows(ckpt, count, seqlen, seed, progress))
        else:
            out.append(draw_windows(tokenize_text(ckpt.path, part), count, seqlen, seed))
    return torch.cat(out)


def corpus_tokens(ckpt, source: str, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """All of ``source`` as one int64 token sequence (for the trainers, which draw their own windows): the texts
    in order, the generated part as ``samples`` windows of ``seqlen`` tokens one after another."""
    return torch.cat([generated_windows(ckpt, samples, seqlen, seed).reshape(-1) if part == GENERATED
                      else tokenize_text(ckpt.path, part) for part in source_parts(source)])


def tokenize_text(model_path: str | Path, source: str) -> torch.Tensor:
    """The whole text of ``source`` (file, folder, bundled or wikitext2) as one int64 token sequence, no special
    tokens."""
    text = read_calib_text(part_path(source))
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(model_path))
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def draw_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int, what: str = "--calib") -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at random starts drawn with ``seed`` (the GPTQ/CMoE recipe)."""
    if len(ids) < seqlen + 1:
        raise UserError(f"{what} text too short: {len(ids)} tokens, need more than {seqlen} (the window length)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (samples,), generator=gen).tolist()
    return torch.stack([ids[s:s + seqlen] for s in starts])


class LayerwiseModel:
    """The HF model as a skeleton on the meta device; one decoder layer at a time is materialised from the
    checkpoint. Works for the llama-like decoder layers (attention norm, attention, MLP norm, MLP: adapter names)."""

    def __init__(self, ckpt, adapter):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        self.ckpt, self.adapter = ckpt, adapter
        self.config = AutoConfig.from_pretrained(str(ckpt.path))
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=ckpt.dtype)
        self.base = self.skeleton.get_submodule(adapter.decoder)
        with torch.device("cpu"):
            self.rotary = type(self.base.rotary_emb)(config=self.config).to(torch.float32)

    def embed(self, ids: torch.Tensor, outtype: str | None = None) -> torch.Tensor:
        """Embedded ids; with ``outtype``, from the rows as a file of that type stores them."""
        w = self.ckpt.get(self.adapter.hf_global("token_embd"))
        out = torch.nn.functional.embedding(ids, w)
        if outtype:   # rows are quantized one by one: rounding the rows taken is rounding the table
            out = as_stored(out, embedding_outtype(self.ckpt, self.adapter, outtype))
        if self.adapter.embed_scale:   # Gemma: sqrt(hidden_size), rounded to the weights' dtype as HF does
            out = out * torch.tensor(self.ckpt.n_embd ** 0.5).to(w.dtype)
        return out

    def layer(self, i: int, outtype: str | None = None):
        """Decoder layer i with its weights read from the checkpoint (MLP included); with ``outtype``, its attention
        matrices as a file of that type stores them (the MLP stays as read: the file stores it as experts)."""
        layer = self.base.layers[i]
        prefix = self.adapter.layer_prefix.format(i=i)
        stored = {f"{mod}.weight" for mod in layer_matrices(self.adapter)}
        sd = {}
        for name, _ in list(layer.named_parameters()) + list(layer.named_buffers()):
            full = prefix + name
            if self.ckpt.has(full):
                sd[name] = self.ckpt.get(full)
                if outtype and name in stored:
                    sd[name] = as_stored(sd[name], outtype)
        missing = [n for n, _ in layer.named_parameters() if n not in sd]
        if missing:
            raise UserError(f"{self.ckpt.path}: layer {i} tensors missing from the checkpoint: {missing[:3]}")
        import copy
        fresh = copy.deepcopy(layer)  # still meta; assign real tensors
        fresh.load_state_dict(sd, strict=False, assign=True)
        return fresh.eval()

    def rope_and_mask(self, seqlen: int, dtype: torch.dtype, i: int):
        pos = torch.arange(seqlen).unsqueeze(0)
        dummy = torch.zeros(1, seqlen, 1, dtype=dtype)
        types = getattr(self.config, "layer_types", None)
        if "layer_type" in inspect.signature(self.rotary.forward).parameters:   # Gemma 3: a rope per layer type
            cos, sin = self.rotary(dummy, pos, types[i])
        else:
            cos, sin = self.rotary(dummy, pos)
        # causal mask: explicit additive mask (exact for sdpa and eager); sliding-window layers get their band
        mask = torch.full((seqlen, seqlen), float("-inf"), dtype=dtype).triu(1)
        window = getattr(self.config, "sliding_window", None)
        if window and types and types[i] == "sliding_attention" and window < seqlen:
            mask = mask.masked_fill(torch.ones(seqlen, seqlen, dtype=torch.bool).tril(-window), float("-inf"))
        return (cos.to(dtype), sin.to(dtype)), pos, mask[None, None]


@torch.no_grad()
def attention_part(layer, adapter, h: torch.Tensor, pe, pos, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual after attention, MLP input x) for hidden states h (B, L, d)."""
    a = layer.get_submodule(adapter.attn_norm)(h)
    a = layer.get_submodule(adapter.attn)(hidden_states=a, attention_mask=mask, position_ids=pos,
                                          position_embeddings=pe)[0]
    if adapter.attn_post_norm:
        a = layer.get_submodule(adapter.attn_post_norm)(a)
    h = h + a
    return h, layer.get_submodule(adapter.mlp_norm)(h)


@torch.no_grad()
def calibrated_plans(ckpt, adapter, method, opts, progress: bool = True, capture: list | None = None):
    """One plan per layer from the layer-sequential pipeline. ``capture`` (optional list) receives the hidden
    states entering each layer and the final ones (for tests)."""
    from .budget import allocate, error_curve, sample_rows
    from .moe_torch import MoEMLP
    if not opts.calib:
        raise UserError("this method needs calibration text: give --calib FILE|FOLDER|wikitext2")
    with phase("tokenize"):
        ids = calib_tokens(ckpt, opts.calib, opts.calib_samples, opts.calib_seqlen, opts.seed, progress)
    with phase("embed"):
        lm = LayerwiseModel(ckpt, adapter)
        dtype = ckpt.dtype
        hidden = lm.embed(ids, opts.calib_outtype).to(dtype)   # (N, L, d)
    record(event="setup")
    n, L, d = hidden.shape
    name = method.NAME
    plans, curves = [], []
    bar = tqdm(range(ckpt.n_layers), desc=f"calibrating {name}", unit="layer", disable=not progress)
    for i in bar:
        if capture is not None:
            capture.append(hidden.clone())
        with phase("load"):
            layer = lm.layer(i, opts.calib_outtype)
        pe, pos, mask = lm.rope_and_mask(L, dtype, i)
        resid = torch.empty_like(hidden)
        xs = torch.empty_like(hidden)
        with phase("attention"):
            for s in range(n):
                resid[s:s + 1], xs[s:s + 1] = attention_part(layer, adapter, hidden[s:s + 1], pe, pos, mask)
        gate, up, down = (layer.get_submodule(a).weight for a in (adapter.mlp_gate, adapter.mlp_up, adapter.mlp_down))
        stats = LayerCalib(x=xs.reshape(-1, d).float(), seed=opts.seed + i, act=adapter.act)
        with phase("plan"):
            plan = method.plan_layer(i, gate, up, down, opts, stats)
            if opts.runtime == "stock":  # the next layer calibrates on what stock llama.cpp will compute
                from .stock import stock_form
                plan = stock_form(plan, adapter.name, stats.x, adapter.act)
        plans.append(plan)
        with phase("moe_forward"):
            moe = MoEMLP(plan, gate, up, down, act=adapter.act)
            if opts.calib_outtype:   # the next layer calibrates on what the file's experts compute
                experts_as_stored_(moe, opts.calib_outtype, plan.expert_width, opts.shared_layout == "experts"
                                   and plan.shared_width % plan.expert_width == 0)
            if opts.layer_budget == "sensitivity":
                rows = sample_rows(n * L, opts.seed + i)
                x_s, r_s = xs.reshape(-1, d)[rows], resid.reshape(-1, d)[rows]
                # the MLP's own output error (before a post-MLP norm: Gemma), a proxy as the rest of budget.py
                dense_out = (adapter.act(x_s @ gate.t()) * (x_s @ up.t())) @ down.t()
                curves.append(error_curve(moe, x_s, r_s, dense_out))
            forward = moe_forward(moe)
            post = layer.get_submodule(adapter.mlp_post_norm) if adapter.mlp_post_norm else (lambda y: y)
            for s in range(n):
                hidden[s] = resid[s] + post(forward(xs[s]))
            del forward
        d_ff = int(gate.shape[0])
        del layer, moe, resid, xs, stats, gate, up, down     # before the next layer is read: one layer at a time
        record(layer=i, method=name, d_ff=d_ff)
    if capture is not None:
        capture.append(hidden.clone())
    record(event="plans_done")
    if curves:
        # bounded to [k/2, 2k]: the proxy compares layers only roughly (see budget.py)
        uniform = plans[0].top_k
        ks = allocate(curves, sum(p.top_k for p in plans), k_min=max(1, uniform // 2), k_max=2 * uniform)
        plans = [replace(p, top_k=k_i, info={**p.info, "uniform_top_k": p.top_k,
                                              "budget_error_curve": [round(float(v), 8) for v in c]})
                 for p, k_i, c in zip(plans, ks, curves)]
    return plans


DENSE_MASKED_WIDTH = 256   # experts narrower than this propagate by masked dense products (moe_forward)


def moe_forward(moe):
    """The function x -> moe(x) used to carry the calibration tokens to the next layer. For narrow experts
    (finegrained's 32 neurons: hundreds of them, ~150 chosen per token) it computes the same sum as three dense
    products with the unchosen experts' activations set to zero: MoEMLP's loop over experts gathers every token
    once per chosen expert (top_k x T x d floats) and took 4x longer (Llama-3-8B-shaped layer, 373 routed experts:
    190 s of CPU against ~50 s). Wide experts (CMoE, MoEfication: a few of hundreds of neurons chosen) keep the
    loop, which computes only the chosen ones."""
    n_exp, width, d = moe.gate_exps.shape
    if width >= DENSE_MASKED_WIDTH or moe.oracle or moe.teacher or moe.deltas or moe.router_trainable:
        return moe
    gate_all, up_all = moe.gate_exps.reshape(-1, d), moe.up_exps.reshape(-1, d)
    down_all = moe.down_exps.transpose(1, 2).reshape(-1, d)             # (E * width, d): one row per neuron

    @torch.no_grad()
    def forward(x: torch.Tensor) -> torch.Tensor:
        idx, weights = moe.select_weighted(x)
        gates = torch.zeros(x.shape[0], n_exp, dtype=x.dtype).scatter_(1, idx, 1.0 if weights is None else weights)
        h = moe.act(x @ gate_all.t()) * (x @ up_all.t())
        out = (h.view(-1, n_exp, width) * gates.unsqueeze(-1)).view(x.shape[0], -1) @ down_all
        if moe.has_shared:
            out += (moe.act(x @ moe.gate_shexp.t()) * (x @ moe.up_shexp.t())) @ moe.down_shexp.t()
        return out
    return forward
