"""The package's shape (docs/architecture.md): imports form no cycle, the bottom modules import nothing above
them, and a module longer than MAX_LINES says why in its docstring ("long because ...")."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gguf_moeify"
MAX_LINES = 350
BOTTOM = {"errors", "plan", "adapters", "checkpoint", "sizing", "linalg", "timing", "textfile", "gguf_keys",
          "output_file", "stored_weights", "weight_bytes"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG).with_suffix("").parts)
        out[name.removesuffix(".__init__") if name != "__init__" else ""] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Package-internal imports (module-level and inside functions), by module name relative to the package."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                for cand in [target] + [f"{target}.{a.name}".lstrip(".") for a in node.names]:
                    if cand in mods and cand != name:
                        deps.add(cand)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gguf_moeify"):
                cand = node.module.removeprefix("gguf_moeify").lstrip(".")
                if cand in mods and cand != name:
                    deps.add(cand)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_imports_form_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["convert"] >= {"plan", "gguf_writer"}   # the graph is really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_bottom_modules_import_only_bottom_modules():
    graph = import_graph()
    for name in BOTTOM:
        assert graph[name] <= BOTTOM, f"{name} imports {sorted(graph[name] - BOTTOM)}"


def test_methods_import_no_other_method_and_the_reference_no_method():
    graph = import_graph()
    methods = {"methods.cmoe", "methods.mlpmoe", "methods.moefication", "methods.finegrained", "methods.tomoe"}
    for m in methods:
        assert not graph[m] & (methods - {m}), f"{m} imports {sorted(graph[m] & methods)}"
    for m in ("reference", "moe_torch", "routers", "stock"):
        assert not any(d.startswith("methods") for d in graph[m]), f"{m} imports {sorted(graph[m])}"


def test_long_modules_say_why():
    for name, path in _modules().items():
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert n <= MAX_LINES or "long because" in doc.lower(), f"{path.name}: {n} lines and no reason given"


def test_every_method_is_a_method_with_its_own_options():
    """The registry's modules satisfy the Method protocol, and each names the options dataclass cli/bench read."""
    from gguf_moeify.methods import METHOD_NAMES, OWN_OPTIONS, Method, get_method
    assert set(METHOD_NAMES) == set(OWN_OPTIONS)
    for name in METHOD_NAMES:
        m = get_method(name)
        assert isinstance(m, Method), name
        assert m.NAME == name and m.OPTIONS is OWN_OPTIONS[name] and m.OPTIONS.method == name
        assert m.whole_model == hasattr(m, "plan_model") and m.whole_model != hasattr(m, "plan_layer"), name
