"""``python -m hivetrain.swarm``: Redis, the bootstrap and N miners on this machine until Ctrl-C or --duration.

Once stopping, further Ctrl-Cs are ignored: the miners checkpoint and deregister before their
processes go, and a second Ctrl-C must not cut that short.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from hivetrain.log import get_logger
from hivetrain.runtime import Runtime, run_service
from hivetrain.settings import SwarmSettings

if TYPE_CHECKING:
    from hivetrain.swarm.launcher import Swarm

logger = get_logger("hivetrain.swarm")
STATUS_EVERY_S = 15.0


def main(argv: list[str] | None = None) -> int:
    """Run the swarm until Ctrl-C, SIGTERM or --duration; return the exit code (1 if a service failed)."""
    return run_service(SwarmSettings, _run, argv, name="swarm", repeat_sigint="ignore")


def _run(runtime: Runtime[SwarmSettings]) -> int | None:
    settings = runtime.settings
    if settings.miners == 0:  # the launcher can (tests add miners later); from the command line it is a mistake
        raise ValueError("--miners 0 (HIVE_MINERS=0) starts a swarm without miners: give 1 to 64")
    if settings.engine == "docker":  # the same services as containers; see docker_engine.py
        from hivetrain.swarm.docker_engine import run_docker

        return run_docker(settings, runtime.stop)
    from hivetrain.swarm.launcher import Swarm, SwarmError  # hivemind loads here: not before --help and --version

    swarm = Swarm(settings)
    runtime.on_cleanup(lambda: _stop(swarm))
    try:
        swarm.start()
    except SwarmError as error:
        runtime.fail(str(error))
        return None
    _print_where_to_look(swarm)
    _watch(swarm, runtime)
    return None


def _stop(swarm: Swarm) -> None:
    swarm.stop(summary_path=swarm.settings.summary or None)
    logger.info(f"swarm stopped; logs in {swarm.logs}")


def _watch(swarm: Swarm, runtime: Runtime) -> None:
    """Log a status line every STATUS_EVERY_S until stopped or --duration; fail the run if a service died."""
    deadline = time.monotonic() + swarm.settings.duration if swarm.settings.duration else None
    while not runtime.stop.wait(
        STATUS_EVERY_S if deadline is None else max(0.0, min(STATUS_EVERY_S, deadline - time.monotonic()))
    ):
        if deadline is not None and time.monotonic() >= deadline:
            logger.info(f"--duration {swarm.settings.duration:.0f}s reached")
            return
        failed = swarm.failed_services()
        if failed:
            for service in failed:
                logger.error(f"{service.name} exited with code {service.popen.returncode}; see {service.log_path}")
            runtime.fail(f"{', '.join(s.name for s in failed)} exited")
            return
        dead = [m.name for m in swarm.miners if not m.alive()]
        suffix = f"; exited: {', '.join(dead)}" if dead else ""
        logger.info(swarm.status_line() + suffix)


def _print_where_to_look(swarm: Swarm) -> None:
    from hivetrain.store import redacted

    if swarm.validator_url:
        logger.info(f"swarm is up: open the dashboard at {swarm.validator_url}/")
    else:
        logger.info("swarm is up (no validator, so no dashboard):")
    logger.info(f"  initial peers: {swarm.bootstrap_url}/initial_peers")
    if swarm.validator_url:
        logger.info(f"  validator API: {swarm.validator_url}/api/dashboard  /api/scores  /api/swarm  /api/evals")
    logger.info(
        f"  metrics:       {swarm.bootstrap_url}/metrics"
        + (f"  {swarm.validator_url}/metrics" if swarm.validator_url else "")
        + "  and each miner's challenge port /metrics"
    )
    logger.info(
        f"  redis:         {redacted(swarm.redis_url)}"
        + (f" (with its password: {swarm.workdir}/redis/url)" if swarm.redis is not None else "")
    )
    logger.info(f"  logs:          {swarm.logs}/ (bootstrap.log, miner-N.log, validator.log)")
    logger.info(f"  checkpoints:   {swarm.workdir}/miner-N/")
    logger.info(
        "Ctrl-C stops everything cleanly"
        + (f"; stopping by itself after {swarm.settings.duration:.0f}s" if swarm.settings.duration else "")
    )


if __name__ == "__main__":
    raise SystemExit(main())
