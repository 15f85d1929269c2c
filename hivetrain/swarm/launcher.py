"""A local swarm of processes: embedded Redis, the bootstrap and N miners, each its own process group.

Every service is configured the way its container is: by ``HIVE_*`` environment variables. The
launcher's own environment passes through, so ``HIVE_TARGET_BATCH_SIZE=... python -m hivetrain.swarm``
reaches every miner. Tests drive the same ``Swarm`` class (add a miner late, SIGKILL one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import requests

from hivetrain import procs
from hivetrain.protocol.records import Keys
from hivetrain.log import get_logger
from hivetrain.redis_server import start_redis
from hivetrain.settings import SwarmSettings
from hivetrain.store import Registry, connect_redis

logger = get_logger(__name__)

#: Miner settings for a local swarm of a preset, used where the environment sets nothing else.
#: tiny: epochs of a few seconds on a laptop CPU, long next to matchmaking (see hivemind note in README).
PRESET_MINER_DEFAULTS: dict[str, dict[str, str]] = {
    "tiny": {
        "HIVE_BATCH_SIZE": "4",
        "HIVE_TARGET_BATCH_SIZE": "96",
        "HIVE_MATCHMAKING_TIME": "3",
        "HIVE_AVERAGING_TIMEOUT": "20",
        "HIVE_LR": "0.003",
        "HIVE_WARMUP_EPOCHS": "2",
        "HIVE_NUM_SHARDS": "16",
        "HIVE_SAVE_EVERY": "5",
    },
    "seed": {},
}


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
        self.redis_url = settings.redis_url
        self.bootstrap_url = self.validator_url = ""
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

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"HIVE_RUN_ID": self.settings.run_id, "HIVE_REDIS_URL": self.redis_url,
                    "HIVE_LOG_LEVEL": self.settings.log_level, "PYTHONUNBUFFERED": "1"})
        env.setdefault("HIVE_HOST_MADDRS", '["/ip4/127.0.0.1/tcp/0"]')
        env.update(self.extra_env)
        return env

    def _start_redis(self) -> None:
        if self.settings.external_redis:
            logger.info(f"using external Redis at {self.redis_url}")
            return
        self.redis, self.redis_url = start_redis(self.workdir / "redis", port=self.settings.redis_port)
        logger.info(f"Redis at {self.redis_url} (data in {self.workdir / 'redis'})")

    def _start_bootstrap(self) -> None:
        port = self.settings.bootstrap_port or procs.free_port()
        env = self._base_env()
        env.update({"HIVE_HTTP_HOST": "127.0.0.1", "HIVE_HTTP_PORT": str(port),
                    "HIVE_IDENTITY_PATH": str(self.workdir / "bootstrap" / "identity.key")})
        self.bootstrap = procs.start("bootstrap", [sys.executable, "-m", "hivetrain.bootstrap"], env=env,
                                     log_path=self.logs / "bootstrap.log", cwd=self.workdir)
        self.bootstrap_url = f"http://127.0.0.1:{port}"
        self._wait_ready(self.bootstrap, f"{self.bootstrap_url}/readyz", timeout=90)
        logger.info(f"bootstrap ready: {self.bootstrap_url}/initial_peers")

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

    def _peer_env(self, name: str) -> dict[str, str]:
        """Environment of a swarm member: the preset's local defaults under whatever the user set."""
        env = self._base_env()
        for key, value in PRESET_MINER_DEFAULTS[self.settings.preset].items():
            env.setdefault(key, value)
        env.update({"HIVE_PRESET": self.settings.preset, "HIVE_BOOTSTRAP_URL": self.bootstrap_url,
                    "HIVE_WALLET_DIR": str(self.workdir / name / "wallets")})
        return env

    def _start_validator(self) -> None:
        port = self.settings.validator_port or procs.free_port()
        env = self._peer_env("validator")
        env.update({"HIVE_API_HOST": "127.0.0.1", "HIVE_API_PORT": str(port)})
        env.setdefault("HIVE_TORCH_THREADS", "1")
        self.validator = procs.start("validator", [sys.executable, "-m", "hivetrain.validator"], env=env,
                                     log_path=self.logs / "validator.log", cwd=self.workdir)
        self.validator_url = f"http://127.0.0.1:{port}"
        self._wait_ready(self.validator, f"{self.validator_url}/healthz", timeout=120)
        logger.info(f"validator API up: {self.validator_url}/api/scores")

    def miner_env(self, index: int) -> dict[str, str]:
        env = self._peer_env(f"miner-{index}")
        if "HIVE_TORCH_THREADS" not in env:  # miners sharing one CPU should not oversubscribe it
            env["HIVE_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, self.settings.miners)))
        env.update({"HIVE_CHECKPOINT_DIR": str(self.workdir / f"miner-{index}"), "HIVE_CHALLENGE_HOST": "127.0.0.1"})
        return env

    def add_miner(self, env: dict[str, str] | None = None, argv: list[str] | None = None) -> procs.Service:
        """Start one more miner (a late joiner when the swarm already runs); ``argv`` replaces the command."""
        index = len(self.miners)
        miner_env = self.miner_env(index)
        miner_env.update(env or {})
        service = procs.start(f"miner-{index}", argv or [sys.executable, "-m", "hivetrain.miner"], env=miner_env,
                              log_path=self.logs / f"miner-{index}.log", cwd=self.workdir)
        self.miners.append(service)
        return service

    # --- watch ------------------------------------------------------------------------------
    def registry(self) -> Registry:
        return Registry(connect_redis(self.redis_url), Keys(self.settings.run_id))

    def status_line(self) -> str:
        """One line for the console: live miners, epochs, rounds so far."""
        from hivetrain.swarm.summary import collect

        try:
            live = self.registry().live_peers(role="miner")
            summary = collect(connect_redis(self.redis_url), Keys(self.settings.run_id), since=self.started_at, last=2000)
        except Exception as error:  # Redis boundary: the status line is best effort
            return f"status unavailable ({error!r})"
        epochs = [m["last_epoch"] for m in summary["miners"].values() if m["last_epoch"] is not None]
        losses = [m["last_loss"] for m in summary["miners"].values() if m["last_loss"] is not None]
        loss = f", mean loss {sum(losses) / len(losses):.3f}" if losses else ""
        return (f"{len(live)} live miners, epoch {max(epochs, default=0)}, "
                f"{len(summary['rounds'])} averaging rounds{loss}")

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

        return collect(connect_redis(self.redis_url), Keys(self.settings.run_id), since=self.started_at,
                       checkpoint_dirs=[self.workdir / f"miner-{i}" for i in range(len(self.miners))])

    def write_summary(self, path: str | Path) -> dict:
        summary = self.summary()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=1))
        return summary

    def __enter__(self) -> "Swarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
