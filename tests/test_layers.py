"""Data flows down: no module of fastcl imports a layer above its own.

The imports are read from the source with ``ast`` (at module level and inside functions
alike), so the check follows the code as it is; every module must be placed in a layer
(docs/design.md, section 2, draws the same order).
"""

from __future__ import annotations

import ast
import fnmatch
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fastcl"

#: Top to bottom. A module may import modules of its own layer and of the layers below.
LAYERS = [
    ("face", ["fastcl"]),  # the package's __init__: the public names
    ("applications", ["fastcl.train", "fastcl.train.*", "fastcl.evaluate", "fastcl.ops.compile_report"]),
    ("inference", ["fastcl.encoder", "fastcl.saved_model", "fastcl.metrics", "fastcl.plots", "fastcl.sts_data"]),
    ("models", ["fastcl.sentence_model"]),
    ("integrations", ["fastcl.sentence_transformers", "fastcl.moco", "fastcl.optim"]),
    ("module", ["fastcl.loss", "fastcl.nt_xent", "fastcl.token_level", "fastcl.distributed"]),
    ("plan", ["fastcl.plan", "fastcl.backends", "fastcl.guide", "fastcl.directions", "fastcl.checks",
              "fastcl.numerics", "fastcl.gaussian"]),
    ("autograd", ["fastcl.ops.function", "fastcl.ops.ring"]),
    ("dispatch", ["fastcl.ops.dispatch"]),
    ("operators and launchers", ["fastcl.ops.operators", "fastcl.ops.infonce_fwd", "fastcl.ops.infonce_bwd_slab",
                                 "fastcl.ops.infonce_bwd_workspace", "fastcl.ops.infonce_one_pass", "fastcl.ops.chunked",
                                 "fastcl.reference"]),
    ("kernel support", ["fastcl.ops", "fastcl.ops.launch", "fastcl.ops.tiles", "fastcl.ops.normalize",
                        "fastcl.ops.group_ranges", "fastcl.ops.configs", "fastcl.ops.layout", "fastcl.ops.utils"]),
    ("loader", ["fastcl.native", "fastcl.native_build"]),
    ("utilities", ["fastcl.paths", "fastcl.interrupts"]),  # no fastcl imports: usable by every layer
]

#: Upward imports that are known and owned elsewhere. Each must still exist (delete its
#: line when it goes).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    base = root / relative
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module of the package under ``root`` -> the modules of the package it imports."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        name = _module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:  # `from package import module` imports the module
                    candidate = f"{module}.{alias.name}"
                    targets.add(candidate if _is_module(candidate, root) else module)
        found[name] = {t for t in targets if (t == root.name or t.startswith(root.name + ".")) and t != name}
    return found


def layer_of(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The (importer, imported) pairs where the imported module stands in a higher layer."""
    return {(a, b) for a, targets in graph.items() for b in targets if layer_of(b) < layer_of(a)}


def test_every_module_has_a_layer():
    for module in imports():
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    found = upward_imports(imports())
    unexpected = sorted(found - KNOWN_UPWARD)
    assert not unexpected, "imports that climb up a layer: " + ", ".join(f"{a} -> {b}" for a, b in unexpected)
    assert KNOWN_UPWARD <= found, f"no longer imported, delete from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - found)}"


def test_a_planted_upward_import_is_caught(tmp_path):
    # The check itself: a copy of the package with one function-level import that climbs
    # from the dispatch table up to the module layer.
    copy = tmp_path / "fastcl"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.json"))
    dispatch = copy / "ops" / "dispatch.py"
    dispatch.write_text(dispatch.read_text() + "\n\ndef _planted():\n    from ..loss import info_nce\n")
    assert upward_imports(imports(copy)) - KNOWN_UPWARD == {("fastcl.ops.dispatch", "fastcl.loss")}
