"""Arrows point down: every omct module imports only packages below its own layer (or its own package), and
the frontends never import each other. Read from the source with ast, function-local imports included."""

import ast
from pathlib import Path

import omct

ROOT = Path(omct.__file__).parent

#: lowest first; a module may import its own package and anything in a lower layer
LAYERS = [
    ("omct.errors", "omct.examples", "omct._version"),
    ("omct.ui", "omct.fileio"),
    ("omct.core",),
    ("omct.formats",),
    ("omct.graph",),
    ("omct.algorithms",),
    ("omct.feeds",),
    ("omct.quantize", "omct.frontend"),
    ("omct.workflow",),
    ("omct.analysis",),
    ("omct.auto",),
    ("omct.decompose",),
    ("omct.onnx", "omct.pytorch", "omct.tensorflow", "omct.caffe"),
    ("omct.cli",),
    ("omct.__main__",),
]


def _package(module: str) -> tuple[int, str]:
    for level, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return level, name
    if module == "omct":
        return len(LAYERS), "omct"
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py: add its package to LAYERS")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "omct" or m.startswith("omct.")}


def test_imports_point_down_only():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        level, package = _package(module)
        for imported in _imports(path):
            their_level, their_package = _package(imported)
            if their_package == package:
                continue
            if their_level >= level:
                bad.append(f"{module} imports {imported}")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_core_is_numpy_only():
    for path in sorted((ROOT / "core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        foreign = {m for m in names if m.split(".")[0] not in {"numpy", "omct", "__future__", "math", "os", "threading",
                                                               "collections", "concurrent", "contextlib", "dataclasses",
                                                               "typing", "abc", "functools", "itertools",
                                                               "threadpoolctl", "ctypes"}}
        outside = {m for m in names if m.startswith("omct") and not m.startswith("omct.core")}
        assert not foreign and not outside, f"{path.name} imports {sorted(foreign | outside)}"
