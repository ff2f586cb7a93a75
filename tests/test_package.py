"""The package's structure: no import cycle, no private name imported across subpackages."""

from pathlib import Path

import sparse_attn
from utils import import_cycles, import_graph

GRAPH = import_graph(Path(sparse_attn.__file__).parent)


def _subpackage(module: str) -> str:
    """The first component under sparse_attn (a subpackage, or a top-level module)."""
    return module.split(".")[1] if module.count(".") else module


def test_no_import_cycle_anywhere_in_the_package():
    """Counting imports inside functions too."""
    assert "sparse_attn.backends.triton.ops" in GRAPH["sparse_attn.backends.triton"][0]  # lazy imports seen
    assert not import_cycles(GRAPH)


def test_no_private_name_crosses_a_subpackage_boundary():
    crossing = [(module, target, name) for module, (_, names) in GRAPH.items() for target, name in names
                if target.startswith("sparse_attn.") and _subpackage(target) != _subpackage(module)
                and (name.startswith("_") or "._" in f".{target}")]
    assert not crossing, crossing


def test_no_package_name_shadows_one_of_its_submodules():
    """A function named like a submodule of its package flips to the module once the submodule is
    imported: ``from package import name`` then depends on import order."""
    import ast
    import pkgutil

    root = Path(sparse_attn.__file__).parent
    clashes = []
    for init in root.rglob("__init__.py"):
        submodules = {info.name for info in pkgutil.iter_modules([str(init.parent)])}
        tree = ast.parse(init.read_text())
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        defined |= {target.id for node in tree.body if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
        clashes += [(str(init.relative_to(root)), name) for name in sorted(defined & submodules)]
    assert not clashes, clashes
