"""The package's layers: no module imports one above it, and the two roles (hospital, cloud)
never import each other (docs/design.md, "Roles and layers")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medblindtuner"

# lower number = lower layer; a module may import its own layer and the ones below
LAYERS = {
    "errors": 0, "formats": 0, "failpoints": 0, "protocol": 0,
    "data": 1, "he": 1, "features": 1,
    "training": 2,
    "hospital": 3, "cloud": 3, "report": 3,
    "service": 4,
    "experiment": 5, "demo": 5, "api": 5,
    "cli": 6,
}
# The key holder and the untrusted cloud share only the layers below them (and the wire
# protocol): neither package imports the other, and the service (cloud) never imports the
# hospital.
SEPARATE_ROLES = {"hospital": {"cloud", "service"}, "cloud": {"hospital"},
                  "service": {"hospital"}}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


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


def _module_imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(p for p in parts if p != "__init__")
        for target in _imports(path, module):
            if target.startswith("medblindtuner."):
                yield module, target


def test_hospital_and_cloud_never_import_each_other():
    crossing = [f"{module} imports {target}" for module, target in _module_imports()
                if _package(target) in SEPARATE_ROLES.get(_package(module), set())]
    assert not crossing, crossing


def test_shared_training_definitions_import_neither_role():
    assert LAYERS["training"] < min(LAYERS[role] for role in ("hospital", "cloud", "service"))
    role_imports = [f"{module} imports {target}" for module, target in _module_imports()
                    if _package(module) == "training"
                    and _package(target) in ("hospital", "cloud", "service")]
    assert not role_imports, role_imports
