"""``python -m hivetrain.swarm``: Redis, the bootstrap and N miners on this machine until Ctrl-C or --duration."""

from __future__ import annotations

import logging
import signal
import threading
import time

from hivetrain.log import get_logger
from hivetrain.settings import SwarmSettings, load_settings
from hivetrain.swarm.launcher import Swarm, SwarmError

logger = get_logger("hivetrain.swarm")
STATUS_EVERY_S = 15.0


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(SwarmSettings, argv)
    logging.getLogger("hivetrain").setLevel(settings.log_level)
    stop = threading.Event()

    def _handle(signum, _frame):
        logger.info(f"{signal.Signals(signum).name}: stopping the swarm (miners checkpoint first)")
        stop.set()

    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)
    if settings.engine == "docker":  # the same services as containers; see docker_engine.py
        from hivetrain.swarm.docker_engine import run_docker

        return run_docker(settings, stop)
    swarm = Swarm(settings)
    code = 0
    try:
        swarm.start()
        _print_where_to_look(swarm)
        code = _watch(swarm, stop)
    except SwarmError as error:
        logger.error(str(error))
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean stop short
        swarm.stop(summary_path=settings.summary or None)
        logger.info(f"swarm stopped; logs in {swarm.logs}")
    return code


def _watch(swarm: Swarm, stop: threading.Event) -> int:
    deadline = time.monotonic() + swarm.settings.duration if swarm.settings.duration else None
    while not stop.wait(STATUS_EVERY_S if deadline is None else max(0.0, min(STATUS_EVERY_S, deadline - time.monotonic()))):
        if deadline is not None and time.monotonic() >= deadline:
            logger.info(f"--duration {swarm.settings.duration:.0f}s reached")
            return 0
        failed = swarm.failed_services()
        if failed:
            for service in failed:
                logger.error(f"{service.name} exited with code {service.popen.returncode}; see {service.log_path}")
            return 1
        dead = [m.name for m in swarm.miners if not m.alive()]
        suffix = f"; exited: {', '.join(dead)}" if dead else ""
        logger.info(swarm.status_line() + suffix)
    return 0


def _print_where_to_look(swarm: Swarm) -> None:
    logger.info("swarm is up:")
    logger.info(f"  initial peers: {swarm.bootstrap_url}/initial_peers")
    logger.info(f"  metrics:       {swarm.bootstrap_url}/metrics")
    if swarm.validator_url:
        logger.info(f"  validator:     {swarm.validator_url}/api/scores  /api/swarm  /api/evals")
    logger.info(f"  redis:         {swarm.redis_url}")
    logger.info(f"  logs:          {swarm.logs}/ (bootstrap.log, miner-N.log, validator.log)")
    logger.info(f"  checkpoints:   {swarm.workdir}/miner-N/")
    logger.info("Ctrl-C stops everything cleanly" + (f"; stopping by itself after {swarm.settings.duration:.0f}s" if swarm.settings.duration else ""))


if __name__ == "__main__":
    raise SystemExit(main())
