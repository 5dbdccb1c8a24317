"""The shape of the package, checked so that it cannot drift back (issue 9).

Short functions, modules a reader can hold, one `Interrupted`, and no registration through
import strings (a reader of the imports must see every edge).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "partrain"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450
# Functions allowed to be longer, each with its reason (numerical kernels only).
LONG_FUNCTIONS: dict[str, str] = {}


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE)): n for p in modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_too_long():
    long = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                key = f"{path.relative_to(PACKAGE)}:{node.name}"
                if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long[key] = n
    assert long == {}


def test_one_class_named_interrupted_and_no_import_strings():
    interrupted, import_calls = [], []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == "Interrupted":
                interrupted.append(str(path.relative_to(PACKAGE)))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "__import__"):
                import_calls.append(str(path.relative_to(PACKAGE)))
    assert len(interrupted) == 1, interrupted
    assert import_calls == []
