"""The ``hivetrain`` console script: a command per service, their flags, the exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "hivetrain"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_the_console_script_is_installed_and_answers_its_version():
    assert SCRIPT.exists(), "make setup installs it: pyproject.toml's [project.scripts]"
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.startswith("hivetrain 0."), version


def test_each_service_is_a_command_with_its_own_flags():
    helped = _run("bootstrap", "--help")
    assert helped.returncode == 0 and "usage: python -m hivetrain.bootstrap" in helped.stdout, helped.stderr[-2000:]
    typo = _run("validator", "--api-prot", "1")
    assert typo.returncode == 2 and "did you mean --api-port?" in typo.stderr, typo.stderr[-2000:]
    refused = _run("swarm", "--miners", "0")
    assert refused.returncode == 2 and "starts a swarm without miners" in refused.stderr, refused.stderr[-2000:]


def test_an_unknown_or_missing_command_exits_2_with_the_usage():
    wrong = _run("minr")
    assert wrong.returncode == 2 and "no command 'minr'; did you mean 'miner'?" in wrong.stderr
    bare = _run()
    assert bare.returncode == 2 and "usage: hivetrain {swarm,miner,validator,bootstrap,status}" in bare.stderr
    listed = _run("--help")
    assert listed.returncode == 0 and all(command in listed.stdout for command in ("swarm", "miner", "validator"))
