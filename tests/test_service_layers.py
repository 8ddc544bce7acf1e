"""The service package keeps its layering: no module imports one above it, the hospital's
client (`hospital/client.py`) needs only the wire protocol, only `app.py` knows the web
framework, no module grows huge.

Static checks (the source is parsed, not imported), plus one import in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import medblindtuner.service

PACKAGE = Path(medblindtuner.service.__file__).parent
PREFIX = "medblindtuner.service."

# Lowest first; a module may import service modules of lower layers only.
LAYERS = [
    {"errors", "limits", "locks"},
    {"store", "blobs", "validate", "manifests", "quotas"},
    {"finalize"},  # the upload protocol's last step, below the uploads that use it
    {"supervisor", "uploads", "views", "refreshes", "consortia"},
    {"jobs", "consortium_jobs"},
    {"consortia_http"},  # the consortium relay's routes, mounted by the app
    {"app", "worker"},
    {"command", "local"},  # the `serve` Typer command; `local` starts it as a process
]
ENTRY_POINTS = {"__init__", "__main__"}  # `python -m medblindtuner.service`: starts the CLI


def layer_of(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if module in names)


def imports_of(path: Path) -> set[str]:
    """Every absolute module name imported anywhere in the file (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def service_modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py"))
            if path.stem not in ENTRY_POINTS}


def test_every_service_module_has_a_layer():
    assert set(service_modules()) == set().union(*LAYERS)


def test_no_module_imports_one_above_it():
    for module, path in service_modules().items():
        for name in imports_of(path):
            if name.startswith(PREFIX):
                imported = name[len(PREFIX):].split(".")[0]
                assert layer_of(imported) < layer_of(module), f"{module} imports {imported}"


CLIENT = PACKAGE.parent / "hospital" / "client.py"


def test_client_needs_only_the_protocol():
    """The hospital's client shares the wire protocol with the service, and nothing else of it."""
    names = imports_of(CLIENT)
    assert "medblindtuner.protocol" in names
    assert not {name for name in names if name.startswith(PREFIX)}


WEB_MODULES = {"app", "consortia_http"}  # the app and the router it mounts


def test_only_the_app_knows_the_web_framework():
    for module, path in service_modules().items():
        frameworks = {n for n in imports_of(path) if n.split(".")[0] in ("fastapi", "starlette")}
        assert module in WEB_MODULES or not frameworks, f"{module} imports {frameworks}"


def test_no_module_over_500_lines():
    for module, path in service_modules().items():
        assert len(path.read_text().splitlines()) <= 500, module


def test_client_import_pulls_neither_the_db_nor_the_web_stack():
    code = ("import sys, medblindtuner.hospital.client; "
            "print(sorted(m for m in ('sqlalchemy', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


PARSERS = ("Deserialize", "looks_like_secret_key", "verify_public_bundle", "CloudCrypto",
           "load_ciphertext", "EncryptedDataset", "EncryptedQueries", "EncryptedResult.load")


def test_only_subprocesses_parse_uploaded_openfhe_bytes():
    """The web process never deserialises what a client sent: a crafted key file could crash
    or exhaust it. Only the validator and the worker (own processes) call OpenFHE parsers."""
    for module, path in service_modules().items():
        if module in ("validate", "worker"):
            continue  # subprocesses
        source = path.read_text()
        found = [name for name in PARSERS if name in source]
        assert not found, f"{module} calls {found}"
