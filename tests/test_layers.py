"""The import graph of flowtile's modules follows its layers (read from the source with ``ast``; nothing is imported).

Layers, bottom to top; an arrow is "may import"::

                     top: flowtile.cli, flowtile.fuzz, flowtile.oracle, flowtile.reports, flowtile.output_paths,
                          flowtile.area, flowtile.testing.*
                      |   (may import anything)
                      v
                     rtl: flowtile.rtl.*  (the RTL runner)
                      |
            +---------+----------------------------+
            v                                      |
    hdl: flowtile.hdl.*      emulator: flowtile.emulator.*      compiler: flowtile.compiler.*
            |                       |                                |
            +-----------------------+--------------------------------+
                                    v
          spec: flowtile.arch, flowtile.program, flowtile.tile_config, flowtile.host, flowtile.run_limits,
                flowtile.link_format, flowtile.link_faults (and the flowtile package)

* spec imports only spec: the architecture, the program format and the tile registers with their one set of rules
  (``TileConfig.validate``) and derived counts.
* compiler, emulator and hdl each import only spec and themselves: the emulator and the hardware are independent
  models of the spec (neither imports the other), and the compiler uses neither.
* rtl imports spec and hdl (it builds and drives the hardware), never the emulator or the compiler.
* top imports anything (the CLI, the ONNX oracle, reports, test helpers).

And no module imports itself through a cycle of other modules' imports (module level or inside a function alike).
``python -m pytest tests/test_layers.py -s`` prints the graph, layer by layer.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Source folder -> package name (setuptools package-dir: the folders stay at the top of the repository).
PACKAGES = {"flowtile": "flowtile", "compiler": "flowtile.compiler", "emulator": "flowtile.emulator",
            "hdl": "flowtile.hdl", "rtl": "flowtile.rtl"}

SPEC = frozenset({"flowtile", "flowtile.arch", "flowtile.program", "flowtile.tile_config", "flowtile.host",
                  "flowtile.run_limits", "flowtile.link_format", "flowtile.link_faults"})
TOP = frozenset({"flowtile.cli", "flowtile.oracle", "flowtile.reports", "flowtile.output_paths", "flowtile.fuzz",
                 "flowtile.area"})

#: What each layer may import (itself included).
ALLOWED = {
    "spec": {"spec"},
    "compiler": {"spec", "compiler"},
    "emulator": {"spec", "emulator"},
    "hdl": {"spec", "hdl"},
    "rtl": {"spec", "hdl", "rtl"},
    "top": {"spec", "compiler", "emulator", "hdl", "rtl", "top"},
}
ORDER = ("spec", "compiler", "emulator", "hdl", "rtl", "top")


def _module_files() -> dict[str, Path]:
    """Module name -> source file of every module of the packages (a package's ``__init__`` is the package)."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def layer(module: str) -> str:
    if module in SPEC:
        return "spec"
    if module in TOP or module == "flowtile.testing" or module.startswith("flowtile.testing."):
        return "top"
    for name in ("compiler", "emulator", "hdl", "rtl"):
        if module == f"flowtile.{name}" or module.startswith(f"flowtile.{name}."):
            return name
    raise AssertionError(f"module {module} is in no layer: add it to tests/test_layers.py")


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The flowtile modules ``module`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            # ``from package import submodule`` imports the submodule; ``from module import name`` the module
            names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:   # ``import flowtile.hdl.layouts.x``: the longest known prefix
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def describe(graph: dict[str, set[str]]) -> str:
    """The graph, layer by layer: ``module -> imported modules``."""
    lines = []
    for name in ORDER:
        lines.append(f"[{name}]")
        lines += [f"  {module} -> {', '.join(sorted(graph[module])) or '-'}"
                  for module in sorted(graph) if layer(module) == name]
    return "\n".join(lines)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_is_in_a_layer(graph):
    print("\n" + describe(graph))
    assert {"flowtile.tile_config", "flowtile.emulator.path", "flowtile.hdl.layouts", "flowtile.rtl.simulate",
            "flowtile.compiler.emit"} <= set(graph)
    for module in graph:
        layer(module)


def test_no_import_cycle(graph):
    assert _cycles(graph) == [], describe(graph)


def test_no_import_from_a_higher_or_sibling_layer(graph):
    bad = [f"{module} ({layer(module)}) imports {target} ({layer(target)})"
           for module, targets in sorted(graph.items()) for target in sorted(targets)
           if layer(target) not in ALLOWED[layer(module)]]
    assert bad == [], "\n".join(bad)


def test_the_checker_sees_relative_lazy_and_package_imports():
    """The walker resolves ``from .x import``, ``from . import x`` and imports inside functions."""
    modules = _module_files()
    assert "flowtile.emulator.functional" in _imports("flowtile.emulator", modules["flowtile.emulator"], modules)
    assert "flowtile.oracle" in _imports("flowtile.cli", modules["flowtile.cli"], modules)   # inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
