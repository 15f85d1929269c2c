"""A local swarm of processes: embedded Redis, the bootstrap and N miners, each its own process group.

Every service is configured the way its container is: by ``HIVE_*`` environment variables,
written here from typed values with ``service_env`` (a misspelt setting or a bad value raises
instead of becoming a variable nobody reads). The launcher's own environment passes through,
so ``HIVE_TARGET_BATCH_SIZE=... python -m hivetrain.swarm`` reaches every miner. Tests drive the
same ``Swarm`` class (add a miner late, SIGKILL one).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.parse
from pathlib import Path

import requests
from pydantic_settings import BaseSettings

from hivetrain.admission import admission_mode
from hivetrain.chain import LocalChain
from hivetrain.identity import load_or_create_wallet
from hivetrain.log import get_logger
from hivetrain.protocol.records import Keys
from hivetrain.settings import (
    BootstrapSettings,
    DHTSettings,
    MinerSettings,
    ServiceSettings,
    SwarmSettings,
    ValidatorSettings,
    domain_of,
    service_env,
)
from hivetrain.store import Registry, connect_redis, redacted
from hivetrain.swarm import procs
from hivetrain.swarm.redis_server import ROLES, acl_file, role_url, start_redis

logger = get_logger(__name__)

#: The settings that say which wallet a miner loads (``load_or_create_wallet``'s arguments, in order).
WALLET_FIELDS = ("wallet_dir", "wallet_name", "wallet_hotkey")

#: Miner settings (``MinerSettings`` field -> value) of a swarm of a preset, used where the
#: environment sets nothing else; the docker engine uses them too (``preset_env``).
#: tiny: epochs of a few seconds on a laptop CPU, long next to matchmaking (see hivemind note in README).
PRESET_MINER_DEFAULTS: dict[str, dict[str, object]] = {
    "tiny": {
        "batch_size": 4,
        "target_batch_size": 96,
        "matchmaking_time": 3.0,
        "averaging_timeout": 20.0,
        "lr": 0.003,
        "warmup_epochs": 2,
        "num_shards": 16,
        "save_every": 5,
    },
    "seed": {},
}


def preset_env(model: type[BaseSettings], preset: str) -> dict[str, str]:
    """The environment of ``preset``'s defaults that ``model`` reads (the validator: only ``num_shards``).

    Every preset names every setting any preset sets (the settings model's default where the table has none), so
    that no other preset's value shows through: docker-compose.yml's CPU defaults are the tiny preset's. Every
    default is checked against ``MinerSettings`` first, so a typo in the table raises here.
    """
    named = {name for values in PRESET_MINER_DEFAULTS.values() for name in values}
    values = {name: MinerSettings.model_fields[name].default for name in sorted(named)}
    values.update(PRESET_MINER_DEFAULTS[preset])
    service_env(MinerSettings, **values)
    return service_env(model, **{name: value for name, value in values.items() if name in model.model_fields})


def miner_threads(cpus: int | None, miners: int) -> int:
    """Torch threads per miner, so that miners sharing one machine's CPUs do not oversubscribe them."""
    return max(1, (cpus or 1) // max(1, miners))


def _set_defaults(env: dict[str, str], defaults: dict[str, str]) -> None:
    """Add ``defaults`` where ``env`` has no value yet: what the user (or a test) set wins."""
    for key, value in defaults.items():
        env.setdefault(key, value)


class SwarmError(RuntimeError):
    """The swarm could not be brought up; the message says which part and where its log is."""


class Swarm:
    """Start, watch and stop a local swarm. Use as a context manager or call ``stop()``."""

    def __init__(self, settings: SwarmSettings, extra_env: dict[str, str] | None = None):
        self.settings = settings
        self.workdir = Path(settings.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.extra_env = dict(extra_env or {})
        self.redis: procs.Service | None = None
        self.bootstrap: procs.Service | None = None
        self.miners: list[procs.Service] = []
        self.validator: procs.Service | None = None
        self.redis_url = settings.redis_url  # the admin's (default user); each role gets its own below
        self.role_urls: dict[str, str] = {}
        self.bootstrap_url = self.validator_url = ""
        self._redis_start: dict | None = None  # how the embedded Redis was started, to start it again the same way
        self._bootstrap_port = 0
        self._bootstrap_maddrs: list[str] = []  # where its DHT listened, to listen there again after a restart
        self.started_at = time.time()

    # --- start ------------------------------------------------------------------------------
    def start(self) -> "Swarm":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        try:
            self._start_redis()
            self._start_bootstrap()
            for _ in range(self.settings.miners):
                self.add_miner()
            if self.settings.validator:
                self._start_validator()
        except BaseException:
            self.stop()
            raise
        return self

    def _base_env(self, role: str) -> dict[str, str]:
        """This process's environment, the swarm's run id, ``role``'s Redis URL and log level, then ``extra_env`` on
        top."""
        env = dict(os.environ)
        # every service derives the same signature domain from these (hivetrain.settings.domain_of)
        redis_url = self.role_urls.get(role, self.redis_url)  # an external Redis: the URL given, for every role
        env.update(
            service_env(
                ServiceSettings,
                run_id=self.settings.run_id,
                redis_url=redis_url,
                log_level=self.settings.log_level,
                chain=self.settings.chain,
                netuid=self.settings.netuid,
                admission=self.settings.admission,
            )
        )
        env["PYTHONUNBUFFERED"] = "1"
        # loopback only, on a free port: the whole swarm is on this machine
        _set_defaults(env, service_env(DHTSettings, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        env.update(self.extra_env)
        return env

    def _start_redis(self) -> None:
        if self.settings.external_redis:
            logger.info(f"using external Redis at {redacted(self.redis_url)}")
            return
        # fresh passwords each run: another local user cannot read or write the swarm's registry, and each
        # role gets a user of its own (a miner's only reads: hivetrain.swarm.redis_server.role_rules)
        folder = self.workdir / "redis"
        admin, passwords = secrets.token_urlsafe(18), {role: secrets.token_urlsafe(18) for role in ROLES}
        self.redis, self.redis_url = start_redis(
            folder,
            port=self.settings.redis_port,
            password=admin,
            users=acl_file(admin, passwords, self.settings.run_id),
        )
        self._redis_start = {
            "workdir": folder,
            "port": urllib.parse.urlsplit(self.redis_url).port,
            "password": admin,
            "users": acl_file(admin, passwords, self.settings.run_id),
        }
        self.role_urls = {role: role_url(self.redis_url, role, password) for role, password in passwords.items()}
        url_file = folder / "url"
        url_file.touch(mode=0o600)
        url_file.chmod(0o600)
        url_file.write_text(self.redis_url + "\n")
        logger.info(f"Redis at {redacted(self.redis_url)} (data in {folder}; its URL with the password in {url_file})")

    def bootstrap_env(self, port: int) -> dict[str, str]:
        """Environment of the bootstrap, its HTTP API on 127.0.0.1:``port``."""
        env = self._base_env("bootstrap")
        env.update(
            service_env(
                BootstrapSettings,
                http_host="127.0.0.1",
                http_port=port,
                identity_path=str(self.workdir / "bootstrap" / "identity.key"),
            )
        )
        return env

    def _start_bootstrap(self) -> None:
        port = self._bootstrap_port or self.settings.bootstrap_port or procs.free_port()
        env = self.bootstrap_env(port)
        if self._bootstrap_maddrs:
            env.update(service_env(DHTSettings, host_maddrs=self._bootstrap_maddrs))
        self.bootstrap = procs.start(
            "bootstrap",
            [sys.executable, "-m", "hivetrain.bootstrap"],
            env=env,
            log_path=self.logs / "bootstrap.log",
            cwd=self.workdir,
        )
        self._bootstrap_port = port
        self.bootstrap_url = f"http://127.0.0.1:{port}"
        self._wait_ready(self.bootstrap, f"{self.bootstrap_url}/readyz", timeout=90)
        if not self._bootstrap_maddrs:
            self._bootstrap_maddrs = self._bootstrap_listen_addrs()
        logger.info(f"bootstrap ready: {self.bootstrap_url}/initial_peers")

    def _bootstrap_listen_addrs(self) -> list[str]:
        """Where the (ready, so published) bootstrap's DHT listens, without its /p2p/ part; [] if Redis cannot say."""
        try:
            records = self.registry().bootstraps()  # the launcher runs one bootstrap: these are its addresses
        except (
            Exception
        ):  # Redis boundary: a restarted bootstrap then listens on a fresh port, which /initial_peers hands out
            logger.warning(
                "could not read where the bootstrap's DHT listens; a restart gets a fresh port", exc_info=True
            )
            return []
        return sorted({addr.split("/p2p/")[0] for record in records for addr in record.multiaddrs})

    @staticmethod
    def _wait_ready(service: procs.Service, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not service.alive():
                raise SwarmError(f"{service.name} exited with code {service.popen.returncode}; see {service.log_path}")
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise SwarmError(f"{service.name} not ready at {url} after {timeout:.0f}s; see {service.log_path}")

    def _peer_env(self, name: str, model: type[MinerSettings | ValidatorSettings]) -> dict[str, str]:
        """Environment of a swarm member: the preset's local defaults under whatever the user set."""
        env = self._base_env("miner" if model is MinerSettings else "validator")
        _set_defaults(env, preset_env(model, self.settings.preset))
        env.update(
            service_env(
                model,
                preset=self.settings.preset,
                bootstrap_url=self.bootstrap_url,
                wallet_dir=str(self.workdir / name / "wallets"),
            )
        )
        return env

    def validator_env(self, port: int) -> dict[str, str]:
        """Environment of the validator (once the bootstrap is up), its API on 127.0.0.1:``port``."""
        env = self._peer_env("validator", ValidatorSettings)
        env.update(service_env(ValidatorSettings, api_host="127.0.0.1", api_port=port))
        # every miner of a local swarm serves on loopback
        _set_defaults(env, service_env(ValidatorSettings, torch_threads=1, spot_check_private_urls=True))
        return env

    def _start_validator(self) -> None:
        port = self.settings.validator_port or procs.free_port()
        self.validator = procs.start(
            "validator",
            [sys.executable, "-m", "hivetrain.validator"],
            env=self.validator_env(port),
            log_path=self.logs / "validator.log",
            cwd=self.workdir,
        )
        self.validator_url = f"http://127.0.0.1:{port}"
        self._wait_ready(self.validator, f"{self.validator_url}/healthz", timeout=120)
        logger.info(f"validator API up: {self.validator_url}/api/scores")

    def miner_env(self, index: int) -> dict[str, str]:
        """Environment of miner ``index`` (once the bootstrap is up: it carries the bootstrap's URL)."""
        env = self._peer_env(f"miner-{index}", MinerSettings)
        _set_defaults(
            env, service_env(MinerSettings, torch_threads=miner_threads(os.cpu_count(), self.settings.miners))
        )
        env.update(
            service_env(MinerSettings, checkpoint_dir=str(self.workdir / f"miner-{index}"), challenge_host="127.0.0.1")
        )
        return env

    def add_miner(
        self, env: dict[str, str] | None = None, argv: list[str] | None = None, admit: bool = True
    ) -> procs.Service:
        """Start one more miner (a late joiner when the swarm already runs); ``argv`` replaces the command.

        With ``HIVE_ADMISSION=chain`` on the local chain the launcher, as the operator, makes the miner's wallet
        and admits its hotkey first (``admit=False``: a stranger, whom the swarm refuses)."""
        index = len(self.miners)
        miner_env = self.miner_env(index)
        miner_env.update(env or {})
        if admit and self.settings.chain == "local" and admission_mode(self.settings) == "chain":
            self.admit_miner(miner_env)
        service = procs.start(
            f"miner-{index}",
            argv or [sys.executable, "-m", "hivetrain.miner"],
            env=miner_env,
            log_path=self.logs / f"miner-{index}.log",
            cwd=self.workdir,
        )
        self.miners.append(service)
        return service

    def admit_miner(self, miner_env: dict[str, str]) -> str:
        """Make the wallet the miner with ``miner_env`` will load, admit its hotkey to the run; the hotkey."""
        fields, prefix = MinerSettings.model_fields, MinerSettings.model_config.get("env_prefix", "")
        wallet = load_or_create_wallet(
            *(miner_env.get(f"{prefix}{name}".upper(), fields[name].default) for name in WALLET_FIELDS)
        )
        hotkey = wallet.hotkey.ss58_address
        LocalChain(connect_redis(self.redis_url), self.settings.run_id).admit(hotkey)
        return hotkey

    # --- faults: a service down, then back as it was ----------------------------------------
    def stop_redis(self, crash: bool = False) -> None:
        """Stop the embedded Redis: SIGTERM (it writes its files and exits) or, with ``crash``, SIGKILL."""
        if self.redis is None:
            raise SwarmError("no embedded Redis to stop (external Redis, or not started)")
        if crash:
            self.redis.kill()
        self.redis.stop(timeout=10)

    def restart_redis(self) -> None:
        """Start the embedded Redis again on the same port, users and data directory: every URL the services hold
        stays valid, and what it persisted (``hivetrain.swarm.redis_server.PERSIST_ARGS``) is back."""
        if self._redis_start is None:
            raise SwarmError("the embedded Redis was never started: nothing to restart")
        if self.redis is not None and self.redis.alive():
            raise SwarmError("the embedded Redis still runs: stop_redis() first")
        self.redis, _ = start_redis(**self._redis_start)
        logger.info(f"Redis restarted at {redacted(self.redis_url)}")

    def stop_bootstrap(self) -> None:
        """Stop the bootstrap (SIGTERM: it withdraws its record and shuts its DHT down)."""
        if self.bootstrap is None:
            raise SwarmError("no bootstrap to stop")
        self.bootstrap.stop(timeout=self.settings.stop_timeout)

    def restart_bootstrap(self) -> None:
        """Start the bootstrap again: the same HTTP port and identity key (``bootstrap_env``), its DHT on the same
        addresses, so its URL and the multiaddrs peers hold stay valid. Waits until it is ready."""
        if self.bootstrap is not None and self.bootstrap.alive():
            raise SwarmError("the bootstrap still runs: stop_bootstrap() first")
        self._start_bootstrap()

    # --- watch ------------------------------------------------------------------------------
    def registry(self) -> Registry:
        return Registry(connect_redis(self.redis_url), Keys(self.settings.run_id), domain_of(self.settings))

    def status_line(self) -> str:
        """One line for the console: live miners, epochs, rounds so far."""
        from hivetrain.swarm.summary import collect

        try:
            live = self.registry().live_peers(role="miner")
            summary = collect(
                connect_redis(self.redis_url),
                Keys(self.settings.run_id),
                domain_of(self.settings),
                since=self.started_at,
                last=2000,
            )
        except Exception as error:  # Redis boundary: the status line is best effort
            return f"status unavailable ({error!r})"
        epochs = [m["last_epoch"] for m in summary["miners"].values() if m["last_epoch"] is not None]
        losses = [m["last_loss"] for m in summary["miners"].values() if m["last_loss"] is not None]
        loss = f", mean loss {sum(losses) / len(losses):.3f}" if losses else ""
        return (
            f"{len(live)} live miners, epoch {max(epochs, default=0)}, {len(summary['rounds'])} averaging rounds{loss}"
        )

    def failed_services(self) -> list[procs.Service]:
        return [s for s in [self.redis, self.bootstrap, self.validator] if s is not None and not s.alive()]

    # --- stop -------------------------------------------------------------------------------
    def stop(self, summary_path: str | Path | None = None) -> dict | None:
        """Miners first (they checkpoint and deregister), then the bootstrap, then Redis.

        With ``summary_path``, the summary is written once training has stopped and before Redis goes.
        """
        timeout = self.settings.stop_timeout
        procs.stop_all([s for s in [self.validator, *self.miners] if s is not None], timeout=timeout)
        if self.bootstrap is not None:
            self.bootstrap.stop(timeout=timeout)
        summary = None
        if summary_path:
            try:
                summary = self.write_summary(summary_path)
                logger.info(f"summary written to {summary_path}")
            except Exception:
                logger.exception("could not write the summary")
        if self.redis is not None:
            self.redis.stop(timeout=10)
        return summary

    def summary(self) -> dict:
        """Rounds, losses and checkpoints of this swarm so far (Redis must be up)."""
        from hivetrain.swarm.summary import collect

        return collect(
            connect_redis(self.redis_url),
            Keys(self.settings.run_id),
            domain_of(self.settings),
            since=self.started_at,
            checkpoint_dirs=[self.workdir / f"miner-{i}" for i in range(len(self.miners))],
        )

    def write_summary(self, path: str | Path) -> dict:
        summary = self.summary()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=1))
        return summary

    def __enter__(self) -> "Swarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
