"""Roles stand side by side over the protocol: the import-linter contracts in pyproject.toml hold, and bite."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import hivetrain

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = {c["id"]: c for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]}


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "lint-imports"
    if not binary.exists():
        pytest.fail(f"{binary} is missing; install the dev dependencies: .venv/bin/pip install -r requirements-dev.txt")
    # PYTHONPATH first: the package analysed is the one under ``root``, not the installed checkout
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(binary), "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_every_module_is_a_role_or_shared():
    # a new top-level module must be classified, or the "shared" contract would not look at it
    modules = {f"hivetrain.{info.name}" for info in pkgutil.iter_modules(hivetrain.__path__)}
    roles = set(CONTRACTS["roles"]["modules"])
    shared = set(CONTRACTS["shared"]["source_modules"])
    assert set(CONTRACTS["shared"]["forbidden_modules"]) == roles
    assert not roles & shared
    assert modules == roles | shared, f"unclassified: {sorted(modules - roles - shared)}; stale: {sorted((roles | shared) - modules)}"


@pytest.mark.parametrize("module, planted, broken", [
    ("validator/evaluate.py", "from hivetrain.miner import optim", "No role imports another role"),
    ("swarm/summary.py", "import hivetrain.bootstrap.app", "No role imports another role"),
    ("protocol/rounds.py", "from hivetrain.validator import scoring", "The protocol and the shared modules import no role"),
])
def test_a_planted_cross_import_breaks_a_contract(tmp_path, module, planted, broken):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "hivetrain", tmp_path / "hivetrain", ignore=shutil.ignore_patterns("__pycache__", "sotu", "tokenizer"))
    target = tmp_path / "hivetrain" / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{broken} BROKEN" in result.stdout
    assert f"hivetrain.{module[:-3].replace('/', '.')}" in result.stdout, result.stdout
