"""The validator's HTTP API as a gunicorn child of the validator service.

The service calls ``start_api(settings)`` once its wallet exists and ``stop_api(popen)`` in its
``finally:``; the workers build ``hivetrain.validator.app:create_app()`` from the ``HIVE_*``
environment that carries ``settings``.
"""

from __future__ import annotations

import subprocess

from hivetrain.gunicorn import gunicorn_argv as _gunicorn_argv
from hivetrain.gunicorn import start_gunicorn, stop_gunicorn
from hivetrain.settings import ValidatorSettings

APP_SPEC = "hivetrain.validator.app:create_app()"


def gunicorn_argv(settings: ValidatorSettings) -> list[str]:
    """The command line that serves the validator API on ``api_host:api_port``."""
    return _gunicorn_argv(APP_SPEC, settings.api_host, settings.api_port, settings.api_workers, settings.log_level)


def start_api(settings: ValidatorSettings) -> subprocess.Popen:
    """Start gunicorn serving the validator API, in our process group (stopping the group stops it)."""
    return start_gunicorn(APP_SPEC, settings, settings.api_host, settings.api_port, settings.api_workers)


def stop_api(popen: subprocess.Popen | None) -> None:
    """Stop the API gracefully (SIGTERM, then SIGKILL after ``hivetrain.gunicorn.STOP_TIMEOUT_S``); None is a no-op."""
    stop_gunicorn(popen)
