"""The device runtime stays free of the build-time stack and of the other deployables."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import edgeperso

PACKAGE = Path(edgeperso.__file__).parent
FORBIDDEN = (
    "torch",
    "transformers",
    "optimum",
    "peft",
    "onnxscript",
    "onnx",
    "sentence_transformers",
)
UPSTREAM = ("edgeperso_export", "edgeperso_federated")

# Imports every edgeperso module with the forbidden packages made unimportable, so a stray
# `import torch` anywhere (even a lazy one at module level) fails loudly.
GUARD = f"""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {FORBIDDEN + UPSTREAM!r}:
            raise ImportError(f'edgeperso imported {{name}}')
        return None
sys.meta_path.insert(0, Block())
import edgeperso
for mod in pkgutil.walk_packages(edgeperso.__path__, 'edgeperso.'):
    importlib.import_module(mod.name)
print('ok', len(sys.modules))
"""


def test_every_edgeperso_module_imports_without_the_build_time_stack() -> None:
    result = subprocess.run(
        [sys.executable, "-c", GUARD], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_no_edgeperso_source_names_a_forbidden_import() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN + UPSTREAM:
                    offenders.append(f"{path.relative_to(PACKAGE)}: {name}")
    assert offenders == []


def test_only_one_module_imports_cryptography_hazmat_per_concern() -> None:
    users = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "cryptography.hazmat" in p.read_text()
    )
    # The store's sealing and the federation's key agreement each have one room.
    assert all(u.endswith("_crypto.py") for u in users), users
