"""The MoE file contract of the patched llama.cpp (patches/README.md), checked on a GGUF's keys and tensors.

The rules are the ones the patched loader enforces (patch 0016 turns each of them into a load error), so
``inspect --check`` refuses every file llama.cpp would refuse, and says why in llama.cpp's terms: keys by their
GGUF name, layers by index, shapes in ggml order (``ne``, the reverse of numpy's). A few checks go further than the
loader can before it reads the weights (the always-selected experts' bias values).

Key and tensor names come from gguf_keys, as the writers'.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .gguf_keys import (ALWAYS_SELECTED_BIAS, ALWAYS_SELECTED_EXPERTS, ARCH, BLOCK_COUNT,  # noqa: F401
                        EMBEDDING_LENGTH, EXPERT_COUNT, EXPERT_COUNT_PER_TOKEN, EXPERT_FEED_FORWARD_LENGTH,
                        EXPERT_ROUTER_TYPE, EXPERT_SHARED_FEED_FORWARD_LENGTH, EXPERT_USED_COUNT, EXPERT_WEIGHTS_UNIT,
                        FEED_FORWARD_LENGTH, GATE_UP_EXPS, PROVENANCE, ROUTER_TENSOR_NAMES, SELECTION_BIAS,
                        expert_tensor_name)
from .plan import LLAMA_MAX_EXPERTS, ROUTER_TYPE_IDS

# architectures whose MoE FFN the patch series builds (the others: key checks only)
PATCHED_ARCHS = ("llama", "qwen3")
_U32 = 0xFFFFFFFF


@dataclass
class ContractReport:
    arch: str
    n_expert: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Keys:
    """Typed reads of a GGUFReader's fields, each type error recorded as a problem (as the loader throws)."""

    def __init__(self, reader, arch: str, problems: list[str]):
        import gguf
        self.fields, self.arch, self.problems, self.vt = reader.fields, arch, problems, gguf.GGUFValueType

    def name(self, key: str) -> str:
        return key.format(arch=self.arch)

    def has(self, key: str) -> bool:
        return self.name(key) in self.fields

    def scalar(self, key: str, vtype, default=None):
        """The value of a scalar key of exactly ``vtype`` (llama.cpp reads scalars by their exact type)."""
        name = self.name(key)
        if name not in self.fields:
            return default
        f = self.fields[name]
        if f.types != [vtype]:
            self.problems.append(f"{name} has type {_type_str(f.types)}, expected {vtype.name.lower()}")
            return default
        return f.contents()

    def per_layer(self, key: str, n_layer: int) -> list[int] | None:
        """A u32 scalar or an i32/u32 array of n_layer values, as llama.cpp's get_key_or_arr reads it (array values
        as u32: -1 is 4294967295); None when absent or unreadable (a problem is recorded)."""
        name = self.name(key)
        if name not in self.fields:
            return None
        f = self.fields[name]
        if f.types and f.types[0] == self.vt.ARRAY:
            if f.types[-1] not in (self.vt.INT32, self.vt.UINT32):
                self.problems.append(f"{name} has type {_type_str(f.types)}, expected uint32 or an array of "
                                     "int32/uint32")
                return None
            values = [int(v) & _U32 for v in f.contents()]
            if len(values) != n_layer:
                self.problems.append(f"{name} has {len(values)} values, expected one per layer ({n_layer})")
                return None
            return values
        value = self.scalar(key, self.vt.UINT32)
        return None if value is None else [int(value)] * n_layer


def _type_str(types) -> str:
    return " of ".join(t.name.lower() for t in types)   # "uint32", "array of int32"


def check_reader(reader) -> ContractReport:
    """Every rule of the contract that applies to the file; ``problems`` empty means the patched llama.cpp loads it."""
    import gguf
    vt = gguf.GGUFValueType
    arch_field = reader.fields.get(ARCH)
    arch = arch_field.contents() if arch_field is not None and arch_field.types == [vt.STRING] else "?"
    report = ContractReport(arch)
    p = report.problems
    if arch == "?":
        p.append(f"{ARCH} missing or not a string")
        return report
    keys = _Keys(reader, arch, p)
    n_layer = keys.scalar(BLOCK_COUNT, vt.UINT32)
    if not n_layer:
        p.append(f"{keys.name(BLOCK_COUNT)} missing or 0")
        return report

    n_expert = keys.scalar(EXPERT_COUNT, vt.UINT32, 0)
    used = keys.per_layer(EXPERT_USED_COUNT, n_layer) or [0] * n_layer
    router_type = keys.scalar(EXPERT_ROUTER_TYPE, vt.UINT32, 0)
    unit = keys.scalar(EXPERT_WEIGHTS_UNIT, vt.BOOL, False)
    n_always = keys.scalar(ALWAYS_SELECTED_EXPERTS, vt.UINT32, 0)
    per_token = keys.scalar(EXPERT_COUNT_PER_TOKEN, vt.BOOL, False)
    report.n_expert = n_expert
    if p:   # a key llama.cpp cannot read: it stops there, and the values above are defaults
        return report
    _check_counts(keys, n_expert, used, n_always, p)
    if router_type not in ROUTER_TYPE_IDS.values():
        p.append(f"{keys.name(EXPERT_ROUTER_TYPE)} = {router_type}: unknown router type "
                 f"({', '.join(f'{v} {k}' for k, v in ROUTER_TYPE_IDS.items())})")
    if unit and not n_expert:
        p.append(f"{keys.name(EXPERT_WEIGHTS_UNIT)} is true, but the file has no experts")
    if per_token and not unit:
        p.append(f"{keys.name(EXPERT_COUNT_PER_TOKEN)} is true, but {keys.name(EXPERT_WEIGHTS_UNIT)} is not: "
                 "per-token counts leave experts out of a unit-weight sum")
    if arch not in PATCHED_ARCHS:
        report.notes.append(f"architecture {arch}: the expert keys are checked, the tensors only by llama.cpp")
        return report

    # llama/qwen3 read these keys whether or not the file has experts (patch 0002)
    widths = keys.per_layer(EXPERT_FEED_FORWARD_LENGTH, n_layer)
    shared = keys.scalar(EXPERT_SHARED_FEED_FORWARD_LENGTH, vt.UINT32, 0)
    if not n_expert:
        moe = sorted(t.name for t in reader.tensors if _is_moe_tensor(t.name))
        if moe:
            p.append(f"{len(moe)} MoE tensors ({moe[0]}, ...) in a file without experts")
        return report
    if widths is None:   # the Mixtral convention: experts as wide as the dense FFN
        widths = keys.per_layer(FEED_FORWARD_LENGTH, n_layer) or [0] * n_layer
    elif 0 in widths:
        p.append(f"{keys.name(EXPERT_FEED_FORWARD_LENGTH)} is 0 in layer {widths.index(0)}: experts need a width > 0")
    if p:   # tensor shapes follow from the keys: only meaningful once the keys hold
        return report
    d = keys.scalar(EMBEDDING_LENGTH, vt.UINT32, 0)
    _check_tensors(reader, arch, n_layer, d, n_expert, widths, shared, router_type, n_always, per_token, p)
    return report


def _check_counts(keys: _Keys, n_expert: int, used: list[int], n_always: int, p: list[str]) -> None:
    count, used_key, always_key = keys.name(EXPERT_COUNT), keys.name(EXPERT_USED_COUNT), ALWAYS_SELECTED_EXPERTS
    if n_expert > LLAMA_MAX_EXPERTS:
        p.append(f"{count} = {n_expert} exceeds llama.cpp's LLAMA_MAX_EXPERTS ({LLAMA_MAX_EXPERTS})")
        return
    if n_always and n_always >= n_expert:
        p.append(f"{always_key} = {n_always}: must be less than {count} ({n_expert})")
        return
    for il, k in enumerate(used):
        if not n_expert and k:
            p.append(f"{used_key} = {k} in layer {il}, but {count} is absent or 0 (the file has no experts)")
            return
        if n_expert and not 1 <= k <= n_expert:
            p.append(f"{used_key} = {k} in layer {il}: must be in 1..{count} ({n_expert})")
            return
        if n_always > k:
            p.append(f"{always_key} = {n_always}, but {used_key} is {k} in layer {il}: always-selected experts "
                     "count in it")
            return


def _is_moe_tensor(name: str) -> bool:
    kind = name.split(".")[2] if name.count(".") >= 2 else ""
    return name.startswith("blk.") and (kind.endswith(("_exps", "_shexp", "_inp", "_inp_out")) or
                                        kind == "exp_probs_b")


def _check_tensors(reader, arch, n_layer, d, n_expert, widths, shared, router_type, n_always, per_token, p) -> None:
    """Each layer's MoE tensors: present, with the shapes the keys imply, and no others (llama.cpp refuses a file
    with tensors it does not read). Shapes in ggml order."""
    import gguf
    f32 = gguf.GGMLQuantizationType.F32
    tensors = {t.name: t for t in reader.tensors}
    expected: set[str] = set()

    def need(name: str, ne: tuple, required: bool = True, bias: bool = False) -> bool:
        t = tensors.get(name)
        if t is None:
            if required:
                p.append(f"tensor {name} missing")
            return False
        expected.add(name)
        got = tuple(int(x) for x in t.shape)
        if got + (1,) * (4 - len(got)) != tuple(ne) + (1,) * (4 - len(ne)):
            p.append(f"tensor {name} has shape {_ne(got)}, expected {_ne(ne)}")
        elif bias and t.tensor_type != f32:
            p.append(f"tensor {name} has type {t.tensor_type.name}, must be F32")
        return True

    kind = {v: k for k, v in ROUTER_TYPE_IDS.items()}[router_type]
    for il in range(n_layer):
        blk, F, E = f"blk.{il}.", widths[il], n_expert
        names = ROUTER_TENSOR_NAMES[kind]
        if kind == "mlp":
            w1 = tensors.get(blk + names["w1"])
            hidden = int(w1.shape[1]) if w1 is not None and len(w1.shape) > 1 else 1
            need(blk + names["w1"], (d, hidden))
            need(blk + names["b1"], (hidden,), bias=True)
            need(blk + names["w2"], (hidden, E))
            need(blk + names["b2"], (E,), bias=True)
        else:
            for name in names.values():
                need(blk + name, (d, E))
        bias_name = blk + SELECTION_BIAS
        if not need(bias_name, (E,), required=False, bias=True) and (n_always or per_token):
            why = (f"{ALWAYS_SELECTED_EXPERTS} = {n_always} declares always-selected experts" if n_always else
                   f"{EXPERT_COUNT_PER_TOKEN.format(arch=arch)} thresholds the biased scores")
            p.append(f"tensor {bias_name} missing, but {why}")
        elif n_always and bias_name in tensors and tensors[bias_name].tensor_type == f32:
            values = tensors[bias_name].data[:n_always]
            if values.shape == (n_always,) and not (values >= ALWAYS_SELECTED_BIAS).all():
                p.append(f"tensor {bias_name}: the first {n_always} values must be at least 2^100 "
                         "(the always-selected experts)")
        if not need(f"{blk}{GATE_UP_EXPS}.weight", (d, 2 * F, E), required=False):
            # llama reads ffn_gate_exps as optional (Mixtral-style files without a gate), qwen3 does not
            need(expert_tensor_name(il, "gate_exps"), (d, F, E), required=arch != "llama")
            need(expert_tensor_name(il, "up_exps"), (d, F, E))
        need(expert_tensor_name(il, "down_exps"), (F, d, E))
        if shared:
            need(expert_tensor_name(il, "gate_shexp"), (d, shared))
            need(expert_tensor_name(il, "up_shexp"), (d, shared))
            need(expert_tensor_name(il, "down_shexp"), (shared, d))
    for name in sorted(n for n in tensors if _is_moe_tensor(n) and n not in expected):
        p.append(f"tensor {name} is not read by llama.cpp with these keys (it refuses files with extra tensors)")


def _ne(shape) -> str:
    return "{" + ", ".join(str(x) for x in shape) + "}"


def check_file(path: str) -> ContractReport:
    import gguf
    return check_reader(gguf.GGUFReader(path))
