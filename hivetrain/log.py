"""One logging setup for the whole repo: ``logger = get_logger(__name__)``."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s [%(name)s] %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"
_configured = False


def _configure() -> None:
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
    root = logging.getLogger("hivetrain")
    root.addHandler(handler)
    root.setLevel(os.environ.get("HIVE_LOG_LEVEL", "INFO").upper())
    root.propagate = False
    _configured = True


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``hivetrain`` hierarchy with the repo-wide format."""
    _configure()
    if not name.startswith("hivetrain"):
        name = f"hivetrain.{name}"
    return logging.getLogger(name)
