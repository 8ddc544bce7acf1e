"""The package's layers: no module imports one above it (docs/design.md, "Roles and layers")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medblindtuner"

# lower number = lower layer; a module may import its own layer and the ones below
LAYERS = {
    "errors": 0, "formats": 0, "failpoints": 0,
    "data": 1, "he": 1, "features": 1,
    "training": 2,
    "hospital": 3, "service": 3, "report": 3,
    "experiment": 4, "demo": 4, "api": 4,
    "cli": 5,
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else 0


def _imports(path: Path, module: str):
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_no_module_imports_a_layer_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(p for p in parts if p != "__init__")
        if module == "medblindtuner":
            continue  # the top-level package re-exports the API lazily
        mine = _layer(module)
        assert mine is not None, f"{module}: not in a layer; add it to LAYERS and the design"
        for target in _imports(path, module):
            theirs = _layer(target) if target.startswith("medblindtuner.") else None
            if theirs is not None and theirs > mine:
                upward.append(f"{module} imports {target}")
    assert not upward, upward
