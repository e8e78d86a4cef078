"""Every public function, class and method of ``common/`` and ``methods/`` has a
docstring (issue 24). Public: a name without a leading underscore, defined at a
module's top level or as a method of a public top-level class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "methods")

Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _public(node: ast.AST) -> bool:
    return isinstance(node, Def) and not node.name.startswith("_")


def _overload(node: ast.AST) -> bool:
    """``@overload`` stubs share the implementation's docstring."""
    decorators = getattr(node, "decorator_list", [])
    return any(
        (isinstance(d, ast.Name) and d.id == "overload")
        or (isinstance(d, ast.Attribute) and d.attr == "overload")
        for d in decorators
    )


def missing_docstrings(source: str, filename: str = "<source>") -> list[str]:
    """``"<line> <qualified name>"`` of every public definition without a
    docstring in ``source``."""
    missing = []
    for node in ast.parse(source, filename).body:
        if not _public(node) or _overload(node):
            continue
        assert isinstance(node, Def)
        if ast.get_docstring(node) is None:
            missing.append(f"{node.lineno} {node.name}")
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if not isinstance(item, Def) or not _public(item) or _overload(item):
                    continue
                if ast.get_docstring(item) is None:
                    missing.append(f"{item.lineno} {node.name}.{item.name}")
    return missing


def _package_missing(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT)
        out += [f"{rel}:{m}" for m in missing_docstrings(path.read_text(), str(rel))]
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_definition_has_a_docstring(package):
    missing = _package_missing(package)
    assert not missing, (
        f"{len(missing)} public definition(s) of {package}/ without a docstring "
        "(say in a line what it is or does; NumPy-style sections where the "
        "parameters need naming):\n" + "\n".join(missing)
    )


def test_the_checker_sees_what_it_exists_for():
    """Not vacuous: module functions, classes and public methods are checked;
    private names, dunders, nested functions and overload stubs are not."""
    source = '''
def f(): pass
def _private(): pass
def g():
    """Documented."""
    def inner(): pass
class C:
    def method(self): pass
    def __init__(self): pass
    def _helper(self): pass
    @property
    def prop(self): return 1
class _Hidden:
    def method(self): pass
@overload
def h(x: int) -> int: ...
'''
    assert missing_docstrings(source) == ["2 f", "7 C", "8 C.method", "12 C.prop"]
