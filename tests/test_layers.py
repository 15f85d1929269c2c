"""The package is one stack (roles side by side on top), hivemind behind one door: the import-linter contracts
in pyproject.toml hold, and bite."""

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
CONTRACTS = {
    c["id"]: c for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
}


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "lint-imports"
    if not binary.exists():
        pytest.fail(f"{binary} is missing; install the dev dependencies: .venv/bin/pip install -r requirements-dev.txt")
    # PYTHONPATH first: the package analysed is the one under ``root``, not the installed checkout
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(binary), "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


STACK, DOOR = CONTRACTS["layers"]["name"], CONTRACTS["hivemind"]["name"]


def _layer_modules() -> list[str]:
    """Every module the layers contract places, top to bottom, as ``hivetrain.<name>``."""
    return [f"hivetrain.{name.strip()}" for layer in CONTRACTS["layers"]["layers"] for name in layer.split("|")]


def test_import_contracts_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_every_module_has_a_layer_and_only_the_door_imports_hivemind():
    # exhaustive: import-linter itself fails on a module the layers leave out; the hivemind contract must
    # then cover it too, or a new module could reach into hivemind unseen
    modules = {f"hivetrain.{info.name}" for info in pkgutil.iter_modules(hivetrain.__path__)}
    layered = _layer_modules()
    assert CONTRACTS["layers"]["exhaustive"] is True
    assert sorted(layered) == sorted(set(layered)), "a module stands in two layers"
    assert set(layered) == modules, (
        f"unplaced: {sorted(modules - set(layered))}; stale: {sorted(set(layered) - modules)}"
    )
    door = CONTRACTS["hivemind"]
    assert door["forbidden_modules"] == ["hivemind"]
    assert set(door["source_modules"]) == modules - {"hivetrain.hivemind_compat"}


@pytest.mark.parametrize(
    "module, planted, broken",
    [
        # roles side by side
        ("validator/evaluate.py", "from hivetrain.miner import optim", STACK),
        ("swarm/summary.py", "import hivetrain.bootstrap.app", STACK),
        # no shared module imports a role, nor a module above it
        ("protocol/rounds.py", "from hivetrain.validator import scoring", STACK),
        ("identity.py", "from hivetrain.protocol.records import Keys", STACK),
        ("protocol/records.py", "from hivetrain.hivemind_compat import RoundInfo", STACK),
        ("store.py", "from hivetrain.discovery import BootstrapUnavailable", STACK),
        ("dht.py", "from hivetrain.settings import DHTSettings", STACK),
        # hivemind's internals only through the door
        ("validator/progress.py", "from hivemind.optim.progress_tracker import LocalTrainingProgress", DOOR),
        ("miner/train.py", "import hivemind.averaging.allreduce", DOOR),
    ],
)
def test_a_planted_import_breaks_a_contract(tmp_path, module, planted, broken):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(
        ROOT / "hivetrain", tmp_path / "hivetrain", ignore=shutil.ignore_patterns("__pycache__", "sotu", "tokenizer")
    )
    target = tmp_path / "hivetrain" / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{broken} BROKEN" in result.stdout, result.stdout
    assert f"hivetrain.{module[:-3].replace('/', '.')}" in result.stdout, result.stdout
