"""``python -m hivetrain.swarm --engine docker``: the compose stack, driven by the Docker SDK.

Redis, the bootstrap, N miners and the validator run as containers built from ``services/``,
on one bridge network ``<run_id>-net``, configured by the same ``HIVE_*`` variables as in
docker-compose.yml. Unlike compose replicas, each miner here has a name (``<run_id>-miner-<i>``)
that the network resolves, so it announces ``/dns4/<name>/tcp/31337`` and gets its own volume.

``plan()`` is a pure function: it says what would be built and started (names, env, ports,
volumes), so tests check it without an engine. ``DockerSwarm`` carries the plan out, waits for
the healthchecks, and removes containers and network in reverse order (volumes are kept:
wallets and checkpoints survive a restart of the same run).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from hivetrain import __version__
from hivetrain.log import get_logger
from hivetrain.settings import SERVICE_SETTINGS, SwarmSettings, env_names
from hivetrain.swarm.launcher import PRESET_MINER_DEFAULTS

logger = get_logger(__name__)

REDIS_IMAGE = "redis:7.4.6-alpine"
DHT_PORT, HTTP_PORT, API_PORT, CHALLENGE_PORT = 31337, 8000, 8100, 8200
HEALTH_TIMEOUT_S = {"redis": 60.0, "bootstrap": 180.0, "miner": 900.0, "validator": 600.0}
STOP_TIMEOUT_S = {"redis": 10, "bootstrap": 30, "miner": 90, "validator": 60}
STATUS_EVERY_S = 15.0
LABEL = "hivetrain.run_id"


class EngineUnavailable(RuntimeError):
    """No Docker engine answers; the message carries the reason docker.from_env() gave."""


class DockerSwarmError(RuntimeError):
    """A container failed to build, start or become healthy; the message says which and why."""


@dataclass(frozen=True)
class ImageSpec:
    service: str
    tag: str
    dockerfile: str  # relative to the repo root, which is the build context


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    service: str  # redis, bootstrap, miner or validator
    image: str
    environment: dict[str, str]
    command: list[str] | None = None
    ports: dict[str, int | None] = field(default_factory=dict)  # "8000/tcp" -> host port on 127.0.0.1 (None: any)
    volumes: dict[str, str] = field(default_factory=dict)  # volume name -> mount path
    healthcheck: dict | None = None  # None: the image's HEALTHCHECK
    shm_size: str | None = None

    def run_kwargs(self, network: str, labels: dict[str, str]) -> dict:
        """Keyword arguments of ``client.containers.run`` for this container."""
        kwargs = {
            "image": self.image, "name": self.name, "hostname": self.name, "detach": True,
            "environment": dict(self.environment), "network": network,
            "labels": {**labels, "hivetrain.service": self.service},
            "ports": {port: ("127.0.0.1", host) for port, host in self.ports.items()},
            "volumes": {name: {"bind": path, "mode": "rw"} for name, path in self.volumes.items()},
            "stop_signal": "SIGTERM",
        }
        if self.command is not None:
            kwargs["command"] = list(self.command)
        if self.healthcheck is not None:
            kwargs["healthcheck"] = dict(self.healthcheck)
        if self.shm_size:
            kwargs["shm_size"] = self.shm_size
        return kwargs


@dataclass(frozen=True)
class SwarmPlan:
    network: str
    images: list[ImageSpec]
    containers: list[ContainerSpec]  # in start order; stopped in reverse


def _passthrough(service: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The caller's ``HIVE_*`` variables that ``service`` reads (as the local launcher passes them on)."""
    accepted = env_names(SERVICE_SETTINGS[service])
    return {key: value for key, value in environ.items() if key in accepted}


def _health(test: list[str], start_period_s: float) -> dict:
    seconds = 1_000_000_000  # the Docker API counts nanoseconds
    return {"test": test, "interval": 5 * seconds, "timeout": 5 * seconds, "retries": 5,
            "start_period": int(start_period_s * seconds)}


def plan(settings: SwarmSettings, environ: Mapping[str, str] | None = None, redis_password: str = "hivetrain-local") -> SwarmPlan:
    """Images and containers of a swarm for ``settings``; the environment's ``HIVE_*`` variables
    reach the services that read them, after what the swarm itself must set."""
    environ = dict(os.environ if environ is None else environ)
    run = settings.run_id
    images = [ImageSpec(name, f"hivetrain-{name}:{__version__}", f"services/{name}/Dockerfile")
              for name in ("bootstrap", "miner", "validator")]
    tag = {image.service: image.tag for image in images}
    containers: list[ContainerSpec] = []
    if settings.external_redis:
        redis_url = settings.redis_url
        if any(host in redis_url for host in ("@127.0.0.1", "//127.0.0.1", "@localhost", "//localhost")):
            raise ValueError("containers cannot reach the host's 127.0.0.1: set HIVE_REDIS_URL to an address "
                             "they can (e.g. host.docker.internal), or drop --external-redis")
    else:
        redis_url = f"redis://:{redis_password}@{run}-redis:6379/0"
        containers.append(ContainerSpec(
            f"{run}-redis", "redis", REDIS_IMAGE, {"REDISCLI_AUTH": redis_password},
            command=["sh", "-c", 'exec redis-server --requirepass "$REDISCLI_AUTH" --appendonly yes'],
            volumes={f"{run}-redis": "/data"},
            healthcheck=_health(["CMD-SHELL", "redis-cli ping | grep -q PONG"], 5)))
    shared = {"HIVE_RUN_ID": run, "HIVE_REDIS_URL": redis_url, "HIVE_LOG_LEVEL": settings.log_level,
              "HIVE_HOST_MADDRS": f'["/ip4/0.0.0.0/tcp/{DHT_PORT}"]'}
    bootstrap = f"{run}-bootstrap"
    peer = {"HIVE_BOOTSTRAP_URL": f"http://{bootstrap}:{HTTP_PORT}", "HIVE_PRESET": settings.preset}

    def announce(name: str) -> dict[str, str]:
        return {"HIVE_ANNOUNCE_MADDRS": f'["/dns4/{name}/tcp/{DHT_PORT}"]'}

    containers.append(ContainerSpec(
        bootstrap, "bootstrap", tag["bootstrap"],
        {**_passthrough("bootstrap", environ), **shared, **announce(bootstrap),
         "HIVE_HTTP_PORT": str(HTTP_PORT), "HIVE_IDENTITY_PATH": "/data/identity.key"},
        ports={f"{HTTP_PORT}/tcp": settings.bootstrap_port or None}, volumes={bootstrap: "/data"}))
    threads = str(max(1, (os.cpu_count() or 1) // max(1, settings.miners)))
    for index in range(settings.miners):
        name = f"{run}-miner-{index}"
        env = {"HIVE_TORCH_THREADS": threads, **PRESET_MINER_DEFAULTS[settings.preset], **_passthrough("miner", environ),
               **shared, **peer, **announce(name), "HIVE_CHALLENGE_PORT": str(CHALLENGE_PORT),
               "HIVE_CHALLENGE_URL": f"http://{name}:{CHALLENGE_PORT}"}
        containers.append(ContainerSpec(name, "miner", tag["miner"], env, volumes={name: "/data"}, shm_size="2g"))
    validator = f"{run}-validator"
    validator_names = env_names(SERVICE_SETTINGS["validator"])  # e.g. HIVE_NUM_SHARDS: the miners' data layout
    preset = {key: value for key, value in PRESET_MINER_DEFAULTS[settings.preset].items() if key in validator_names}
    containers.append(ContainerSpec(
        validator, "validator", tag["validator"],
        {**preset, **_passthrough("validator", environ), **shared, **peer, **announce(validator),
         "HIVE_API_PORT": str(API_PORT), "HIVE_WALLET_DIR": "/data/wallets", "HIVE_IDENTITY_PATH": "/data/identity.key"},
        ports={f"{API_PORT}/tcp": None}, volumes={validator: "/data"}, shm_size="1g"))
    return SwarmPlan(f"{run}-net", images, containers)


def connect():
    """A client of the local Docker engine, or ``EngineUnavailable`` with the reason."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as error:  # engine boundary: any failure here means "no engine"
        raise EngineUnavailable(f"no Docker engine reachable ({type(error).__name__}: {error}); "
                                "start Docker (or set DOCKER_HOST), or use --engine local") from error
    return client


def repo_root() -> Path:
    """The checkout that holds services/ (the build context); images are built from source."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "services").is_dir():
        raise DockerSwarmError(f"no services/ next to the hivetrain package (looked in {root}); "
                               "run --engine docker from a checkout of the repository")
    return root


class DockerSwarm:
    """Build, start, watch and stop a swarm of containers. Use as a context manager or call ``stop()``."""

    def __init__(self, settings: SwarmSettings, client=None, environ: Mapping[str, str] | None = None,
                 interrupt: threading.Event | None = None):
        self.settings = settings
        self.interrupt = interrupt or threading.Event()  # set (Ctrl-C) = stop waiting for health
        self.client = client if client is not None else connect()
        password = (environ or os.environ).get("REDIS_PASSWORD") or secrets.token_urlsafe(16)
        self.plan = plan(settings, environ, redis_password=password)
        self.labels = {LABEL: settings.run_id}
        self.logs = Path(settings.workdir).resolve() / "logs"
        self.containers: dict[str, object] = {}  # name -> docker Container, in start order
        self.service_of = {spec.name: spec.service for spec in self.plan.containers}
        self.network = None

    def build_images(self) -> None:
        """Build the three images from services/<name>/Dockerfile (slow the first time: torch)."""
        from docker.errors import BuildError

        root = repo_root()
        for image in self.plan.images:
            logger.info(f"building {image.tag} from {image.dockerfile} (the first build takes minutes)")
            try:
                self.client.images.build(path=str(root), dockerfile=image.dockerfile, tag=image.tag, rm=True)
            except BuildError as error:
                tail = "".join(str(line.get("stream", line.get("error", ""))) for line in list(error.build_log)[-15:])
                raise DockerSwarmError(f"building {image.tag} failed: {error}\n{tail}") from error

    def start(self) -> "DockerSwarm":
        """Network, then each container in order; waits for each service's healthcheck like compose's depends_on."""
        self._remove_leftovers()
        try:
            self.network = self.client.networks.create(self.plan.network, driver="bridge", labels=self.labels)
            for spec in self.plan.containers:
                if spec.service == "redis":
                    self._pull(spec.image)
                logger.info(f"starting {spec.name}")
                self.containers[spec.name] = self.client.containers.run(**spec.run_kwargs(self.plan.network, self.labels))
                if spec.service in ("redis", "bootstrap"):
                    self.wait_healthy(spec.name)
            for spec in self.plan.containers:
                if spec.service in ("miner", "validator"):
                    self.wait_healthy(spec.name)
        except BaseException:
            self.stop()
            raise
        return self

    def _pull(self, image: str) -> None:
        from docker.errors import ImageNotFound

        try:
            self.client.images.get(image)
        except ImageNotFound:
            logger.info(f"pulling {image}")
            self.client.images.pull(image)

    def _remove_leftovers(self) -> None:
        """Containers and network of an earlier run with this run id that did not stop cleanly."""
        for container in self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.settings.run_id}"}):
            logger.warning(f"removing leftover container {container.name}")
            container.remove(force=True)
        for network in self.client.networks.list(names=[self.plan.network]):
            if network.name == self.plan.network:
                network.remove()

    def health(self, name: str) -> str:
        """starting, healthy, unhealthy, or the container's state when it has no healthcheck or stopped."""
        container = self.containers[name]
        container.reload()
        state = container.attrs["State"]
        if state.get("Status") != "running":
            return state.get("Status", "unknown")
        return state.get("Health", {}).get("Status", "running")

    def wait_healthy(self, name: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or HEALTH_TIMEOUT_S[self.service_of[name]])
        while time.monotonic() < deadline:
            if self.interrupt.is_set():
                raise DockerSwarmError(f"interrupted while waiting for {name}")
            status = self.health(name)
            if status in ("healthy", "running"):
                logger.info(f"{name} is {status}")
                return
            if status in ("exited", "dead", "unhealthy"):
                break
            time.sleep(2)
        tail = self.containers[name].logs(tail=20).decode(errors="replace")
        raise DockerSwarmError(f"{name} is {self.health(name)}, not healthy; its last log lines:\n{tail}")

    def host_url(self, name: str, port: int) -> str:
        """http://127.0.0.1:<published port> of a container's port."""
        container = self.containers[name]
        container.reload()
        binding = container.attrs["NetworkSettings"]["Ports"][f"{port}/tcp"][0]
        return f"http://127.0.0.1:{binding['HostPort']}"

    def failed(self) -> list[str]:
        """Containers that are no longer running."""
        return [name for name in self.containers if self.health(name) in ("exited", "dead")]

    def stop(self) -> None:
        """Reverse start order: validator, miners (together: each checkpoints), bootstrap, Redis; then the network."""
        from docker.errors import APIError, NotFound

        self.logs.mkdir(parents=True, exist_ok=True)
        groups: list[list[ContainerSpec]] = []
        for spec in reversed(self.plan.containers):
            if groups and groups[-1][0].service == spec.service == "miner":
                groups[-1].append(spec)
            else:
                groups.append([spec])
        for group in groups:
            with ThreadPoolExecutor(max_workers=max(1, len(group))) as pool:
                list(pool.map(self._stop_one, group))
        if self.network is not None:
            try:
                self.network.remove()
            except (APIError, NotFound):
                logger.exception(f"could not remove network {self.plan.network}")
            self.network = None

    def _stop_one(self, spec: ContainerSpec) -> None:
        from docker.errors import APIError, NotFound

        container = self.containers.pop(spec.name, None)
        if container is None:
            return
        try:
            container.stop(timeout=STOP_TIMEOUT_S[spec.service])
            (self.logs / f"{spec.name}.log").write_bytes(container.logs())
            container.remove()
            logger.info(f"stopped {spec.name}; log in {self.logs / (spec.name + '.log')}")
        except (APIError, NotFound):
            logger.exception(f"could not stop {spec.name} cleanly")

    def __enter__(self) -> "DockerSwarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_docker(settings: SwarmSettings, stop: threading.Event) -> int:
    """The docker engine's main: build, start, watch until ``stop`` or --duration, stop. Exit code."""
    try:
        swarm = DockerSwarm(settings, interrupt=stop)
    except EngineUnavailable as error:
        logger.error(str(error))
        return 1
    if settings.summary:
        logger.warning("--summary is written by the local engine only; ignored with --engine docker")
    try:
        swarm.build_images()
        if stop.is_set():
            return 0
        swarm.start()
        logger.info(f"swarm is up: {swarm.host_url(f'{settings.run_id}-bootstrap', HTTP_PORT)}/initial_peers, "
                    f"validator API {swarm.host_url(f'{settings.run_id}-validator', API_PORT)}/api/scores")
        return _watch(swarm, stop)
    except DockerSwarmError as error:
        logger.error(str(error))
        return 1
    finally:
        swarm.stop()
        logger.info(f"swarm stopped; container logs in {swarm.logs}")


def _watch(swarm: DockerSwarm, stop: threading.Event) -> int:
    duration = swarm.settings.duration
    deadline = time.monotonic() + duration if duration else None
    while not stop.wait(STATUS_EVERY_S if deadline is None else max(0.0, min(STATUS_EVERY_S, deadline - time.monotonic()))):
        if deadline is not None and time.monotonic() >= deadline:
            logger.info(f"--duration {duration:.0f}s reached")
            return 0
        failed = swarm.failed()
        if any(swarm.service_of[name] != "miner" for name in failed):
            logger.error(f"stopped unexpectedly: {', '.join(failed)}; see `docker logs <name>`")
            return 1
        statuses = [swarm.health(name) for name in swarm.containers if swarm.service_of[name] == "miner"]
        logger.info(f"{statuses.count('healthy')}/{len(statuses)} miners healthy" + (f"; exited: {', '.join(failed)}" if failed else ""))
    return 0
