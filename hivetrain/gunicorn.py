"""Serve a service's Flask app with gunicorn as a child process (the bootstrap's and the validator's APIs).

The service process keeps its own work (a DHT peer, a validation loop) and starts
``python -m gunicorn ... '<module>:create_app()'`` next to it. Settings reach the workers as
``HIVE_*`` environment variables, so a value given as a command-line flag to the service is
seen by ``create_app()`` in every worker too. Services do not call these directly:
``hivetrain.runtime.Runtime.serve`` starts gunicorn, restarts it if it dies, and stops it first at shutdown.
"""

from __future__ import annotations

import os
import subprocess
import sys

from pydantic_settings import BaseSettings

from hivetrain.log import get_logger
from hivetrain.settings import service_env

logger = get_logger(__name__)

#: How long gunicorn gets after SIGTERM (its workers finish their requests) before SIGKILL.
STOP_TIMEOUT_S = 10.0
#: Threads per gthread worker: requests wait on Redis, not on the CPU.
THREADS = 4


def gunicorn_argv(app_spec: str, host: str, port: int, workers: int, log_level: str = "INFO") -> list[str]:
    """The command line that serves ``app_spec`` (e.g. ``'hivetrain.bootstrap.app:create_app()'``) on ``host:port``."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    bind_host = f"[{host}]" if ":" in host else host  # IPv6 literals need brackets
    argv = [sys.executable, "-m", "gunicorn", "--bind", f"{bind_host}:{port}",
            "--workers", str(workers), "--worker-class", "gthread", "--threads", str(THREADS),
            "--graceful-timeout", "5", "--timeout", "30", "--no-control-socket", "--log-level", log_level.lower()]
    if os.path.isdir("/dev/shm"):  # worker heartbeats off disk-backed /tmp (containers)
        argv += ["--worker-tmp-dir", "/dev/shm"]
    return argv + [app_spec]


def settings_env(settings: BaseSettings) -> dict[str, str]:
    """This process's environment with ``settings`` as the ``HIVE_*`` variables ``create_app()`` reads.

    Other ``HIVE_*`` variables are dropped, so the workers see exactly these settings.
    """
    prefix = type(settings).model_config.get("env_prefix", "")
    env = {key: value for key, value in os.environ.items() if not (prefix and key.startswith(prefix))}
    env.update(service_env(type(settings), **settings.model_dump()))
    return env


def start_gunicorn(app_spec: str, settings: BaseSettings, host: str, port: int, workers: int) -> subprocess.Popen:
    """Start gunicorn serving ``app_spec`` in our process group, so stopping the group stops it too."""
    argv = gunicorn_argv(app_spec, host, port, workers, getattr(settings, "log_level", "INFO"))
    popen = subprocess.Popen(argv, env=settings_env(settings), stdin=subprocess.DEVNULL)
    logger.info(f"serving {app_spec} on {argv[4]} with gunicorn (pid {popen.pid}, {workers} workers)")
    return popen


def stop_gunicorn(popen: subprocess.Popen | None, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (graceful: workers finish their requests), then SIGKILL after ``timeout`` seconds."""
    if popen is None or popen.poll() is not None:
        return
    popen.terminate()
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning(f"gunicorn (pid {popen.pid}) ignored SIGTERM for {timeout:.0f}s; killing it")
        popen.kill()
        popen.wait()
