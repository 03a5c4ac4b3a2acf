"""The package's import graph: no cycle, and no module importing from a layer above its own.

Every `import` and `from ... import` in every module under lru_jax/ counts, those inside
functions (lazy imports) included. `from lru_jax import x` is an import of the module
lru_jax.x where there is one. The package's own `__init__` is its front door, above every
layer it re-exports, and not counted as imported by its submodules.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")

# Lowest first (docs/design.md, "Layers"). A module may import from its own layer and the
# layers below; a name ending in "." is a package (every module in it).
LAYERS = (
    ("lru_jax._checks", "lru_jax.padding"),  # argument checks, padding helpers
    ("lru_jax.timing", "lru_jax.scan_table"),  # the timing harness; a table of scan times
    ("lru_jax.kernels.",),  # the Pallas scan kernel
    ("lru_jax.scan",),  # the linear recurrence
    ("lru_jax.scan_choices",),  # measuring the scan methods into a table
    (
        "lru_jax.cells",
        "lru_jax.lru",
        "lru_jax.mingru",
        "lru_jax.hgrn",
        "lru_jax.rglru",
        "lru_jax.s5",
        "lru_jax.mamba",
        "lru_jax.attention",
    ),  # pure functions
    ("lru_jax.attention_nn", "lru_jax.nn"),  # Flax layers
    ("lru_jax.models", "lru_jax.nnx"),  # models; the Flax NNX layers (over nn's helpers)
    ("lru_jax.tasks.",),
    ("lru_jax.training.",),
    ("lru_jax.diagnostics", "lru_jax.interop"),  # libraries over the models
    ("lru_jax.diagnose", "lru_jax.attention_maps", "lru_jax.bench."),  # tools
    ("lru_jax",),  # the package's __init__
)


def module_files(root: str) -> dict[str, str]:
    """{module name: path} of every .py file in `root`/lru_jax."""
    modules = {}
    base = os.path.join(root, "lru_jax")
    for directory, _, files in os.walk(base):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(directory, file)
            parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports(path: str, module: str, modules: dict[str, str]) -> set[str]:
    """The package modules `module` (at `path`) imports, anywhere in its code."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    parents = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
    return {m for m in found if m in modules and m != module and m not in parents}


def graph(root: str = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {m: imports(path, m, modules) for m, path in modules.items()}


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        for name in layer:
            if module == name or (name.endswith(".") and module.startswith(name)):
                return index
            if name.endswith(".") and module == name[:-1]:  # the package's __init__
                return index
    raise AssertionError(f"{module}: not in LAYERS; add it to the layer it belongs to")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first walk closes: none exactly when the graph has no cycle."""
    found, state = [], {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path)
        path.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    return found


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in sorted(edges.items())
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_every_module_imports_only_from_its_layer_and_below():
    assert upward_imports(graph()) == []


def test_the_checks_see_lazy_imports_cycles_and_upward_imports(tmp_path):
    """On a made-up package: an import inside a function that closes a cycle, and a low module
    importing a high one, are both found."""
    package = tmp_path / "lru_jax"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scan.py").write_text("def f():\n    from lru_jax import models\n")
    (package / "models.py").write_text("from lru_jax import scan\n")
    edges = graph(str(tmp_path))
    assert edges == {"lru_jax": set(), "lru_jax.scan": {"lru_jax.models"}, "lru_jax.models": {
        "lru_jax.scan"
    }}  # fmt: skip
    assert cycles(edges) == [["lru_jax.models", "lru_jax.scan", "lru_jax.models"]]
    assert upward_imports(edges) == ["lru_jax.scan (layer 3) imports lru_jax.models (layer 7)"]


def test_a_module_missing_from_the_layers_is_named():
    with pytest.raises(AssertionError, match="lru_jax.new_thing: not in LAYERS"):
        layer_of("lru_jax.new_thing")
