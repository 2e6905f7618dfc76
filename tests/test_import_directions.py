"""Import directions between our packages, and which packages stay free of torch.

    shared     imports nothing of ours (the leaf: protocol, SDK, config, logging)
    kernels    only itself
    scheduler  shared
    worker     shared, kernels
    frontend   shared
    launcher   anything (the entry point, above the roles; no role imports it)
    bench      anything (benchmarks, started through the launcher)

shared/ and scheduler/ import neither torch, triton nor transformers, anywhere in
their files (statically, function-level imports included) or when imported.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = {"shared", "kernels", "scheduler", "worker", "frontend", "launcher", "bench"}
ALLOWED = {
    "shared": {"shared"},
    "kernels": {"kernels"},
    "scheduler": {"scheduler", "shared"},
    "worker": {"worker", "shared", "kernels"},
    "frontend": {"frontend", "shared"},
    "launcher": OURS,
    "bench": OURS,
}
HEAVY = {"torch", "triton", "transformers"}
TORCH_FREE = ("shared", "scheduler")


def _modules(package: str) -> list[str]:
    found = []
    for directory, _, files in os.walk(os.path.join(ROOT, package)):
        found += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return sorted(found)


def _imported_tops(path: str) -> set[str]:
    """The top-level package of every absolute import in the file (anywhere in it)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_directions(package):
    wrong = {}
    for path in _modules(package):
        bad = (_imported_tops(path) & OURS) - ALLOWED[package]
        if bad:
            wrong[os.path.relpath(path, ROOT)] = sorted(bad)
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"


@pytest.mark.parametrize("package", TORCH_FREE)
def test_no_torch_in_the_source(package):
    wrong = {os.path.relpath(p, ROOT): sorted(_imported_tops(p) & HEAVY) for p in _modules(package)
             if _imported_tops(p) & HEAVY}
    assert not wrong, f"{package} must not import {sorted(HEAVY)}: {wrong}"


def test_no_torch_when_imported():
    modules = [os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
               for package in TORCH_FREE for p in _modules(package)]
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            f"heavy = sorted(set({sorted(HEAVY)!r}) & set(sys.modules))\nassert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The test above can fail: a file importing a role from shared/ is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from worker.loop import run_worker\n    import torch\n")
    assert _imported_tops(str(bad)) == {"worker", "torch"}
