"""The scripts outside the package (benchmarks, model builders) are not imported by any test: at least they must
parse, so a refactoring that breaks one is caught here rather than by the next person who runs it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("models/*.py")])


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(ROOT)) for s in SCRIPTS])
def test_script_parses_and_imports_only_what_exists(script):
    tree = ast.parse(script.read_text(), filename=str(script))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowtile"):
            module = __import__(node.module, fromlist=[alias.name for alias in node.names])
            for alias in node.names:
                assert hasattr(module, alias.name) or alias.name == "*", \
                    f"{script.name}: {node.module} has no {alias.name}"
