"""A bounded local swarm run, measured from outside: step telemetry from Redis and loopback byte counters.

Used by ``bench.swarm_utilization`` and ``bench.comm_per_sample``. One run: Redis, the bootstrap and
``miners`` tiny miners (no validator) through ``hivetrain.swarm.launcher.Swarm`` on 127.0.0.1 with
``env`` on top of the local swarm's defaults; once every miner has stepped, a window of
``duration`` seconds is measured, then everything is stopped.

Per miner, from its StepRecords in the window: steps, samples, and the interval between consecutive
records. A step whose record shows a new local epoch is an *epoch step* (it may have waited for
matchmaking, all-reduce and the optimizer step); the others are *compute steps*. Utilization is
measured by the miner itself: ``StepRecord.compute_s`` counts the seconds inside forward, backward
and the (inner) optimizer step, not epoch updates (averaging rounds) nor state downloads, so
``utilization = compute seconds / wall seconds`` over the window. (Until 2026-12-07 it was computed
as steps x the median compute-step interval / wall time.)

Loopback bytes come from ``psutil.net_io_counters(pernic=True)['lo']`` over the window (every byte
counted once, as sent), minus the background rate measured over ``idle_s`` just before the swarm
starts: the machine is shared, and other processes' loopback traffic is not ours.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from hivetrain.protocol.records import Keys, RoundRecord, StepRecord
from hivetrain.settings import MinerSettings, SwarmSettings, domain_of
from hivetrain.store import connect_redis, read_stream
from hivetrain.swarm.launcher import Swarm, preset_env

CONFIGS = {
    "default": {},
    "delayed": {
        "HIVE_DELAY_GRAD_AVERAGING": "true",
        "HIVE_DELAY_OPTIMIZER_STEP": "true",
        "HIVE_OFFLOAD_OPTIMIZER": "true",
    },
    "local_updates": {"HIVE_USE_LOCAL_UPDATES": "true"},
}


def lo_bytes() -> int:
    return psutil.net_io_counters(pernic=True)["lo"].bytes_sent


def background_lo_rate(idle_s: float) -> float:
    """Loopback bytes per second other processes send, measured over ``idle_s`` before a run starts."""
    before = lo_bytes()
    time.sleep(idle_s)
    return (lo_bytes() - before) / idle_s


def tiny_swarm(
    kind: str, name: str, miners: int, stop_timeout: float, env: dict[str, str]
) -> tuple[Swarm, SwarmSettings]:
    """A swarm of ``miners`` tiny miners (no validator) in a fresh temporary workdir, not started yet."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-{name}-"))
    run_id = f"{'bench' if kind == 'swarm' else kind}-{name}".replace("_", "-")
    settings = SwarmSettings(
        miners=miners,
        validator=False,
        workdir=str(workdir),
        bootstrap_port=0,
        run_id=run_id,
        preset="tiny",
        stop_timeout=stop_timeout,
    )
    return Swarm(settings, extra_env=env), settings


def per_miner(steps: list[StepRecord]) -> dict:
    """Steps, samples, throughput and compute utilization of one miner's records (oldest first): compute seconds
    (``StepRecord.compute_s``, the miner's own timers) over wall seconds between its first and last record."""
    steps = sorted(steps, key=lambda s: s.step)
    intervals, epoch_intervals = [], []
    for previous, current in zip(steps, steps[1:]):
        (epoch_intervals if current.local_epoch != previous.local_epoch else intervals).append(
            current.time - previous.time
        )
    wall = steps[-1].time - steps[0].time if len(steps) > 1 else 0.0
    step_s = statistics.median(intervals) if intervals else float("nan")
    count = len(steps) - 1  # intervals inside the window
    return {
        "steps": count,
        "samples": steps[-1].samples - steps[0].samples,
        "wall_s": wall,
        "samples_per_s": (steps[-1].samples - steps[0].samples) / wall if wall else 0.0,
        "compute_step_s": step_s,
        "epoch_steps": len(epoch_intervals),
        "epoch_step_s": statistics.median(epoch_intervals) if epoch_intervals else None,
        # measured: the miner's own timer of forward, backward and (inner) optimizer steps over the window's wall time
        "utilization": (steps[-1].compute_s - steps[0].compute_s) / wall if wall else None,
        "epochs": (steps[-1].local_epoch - steps[0].local_epoch),
    }


def run(
    name: str, env: dict[str, str], miners: int = 2, duration: float = 45.0, idle_s: float = 5.0, timeout: float = 120.0
) -> dict:
    """One measured swarm run; returns per-miner figures, rounds and loopback bytes of the window."""
    background_rate = background_lo_rate(idle_s)
    swarm, settings = tiny_swarm("swarm", name, miners, 20, env)
    workdir = swarm.workdir
    try:
        swarm.start()
        client, keys, domain = connect_redis(swarm.redis_url), Keys(settings.run_id), domain_of(settings)
        deadline = time.monotonic() + timeout
        while len({s.peer_id for s in read_stream(client, keys, domain, StepRecord, count=200)}) < miners:
            if time.monotonic() > deadline:
                errors = sorted(
                    {
                        line.strip()
                        for log in (workdir / "logs").glob("miner-*.log")
                        for line in log.read_text(errors="replace").splitlines()
                        if "Error:" in line
                    }
                )
                raise TimeoutError(
                    f"{name}: not every miner stepped within {timeout:.0f}s; miners' errors: {errors[:3]}"
                )
            time.sleep(0.5)
        started, bytes_before = time.time(), lo_bytes()
        time.sleep(duration)
        ended, bytes_after = time.time(), lo_bytes()
        steps = [s for s in read_stream(client, keys, domain, StepRecord) if started <= s.time <= ended]
        rounds = [r for r in read_stream(client, keys, domain, RoundRecord) if started <= r.time <= ended]
    finally:
        swarm.stop()
    by_peer: dict[str, list[StepRecord]] = {}
    for step in steps:
        by_peer.setdefault(step.peer_id, []).append(step)
    figures = {peer: per_miner(records) for peer, records in by_peer.items() if len(records) > 2}
    for peer, records in by_peer.items():  # (seconds into the window, loss, tokens/s) for plots
        if peer in figures:
            figures[peer]["series"] = [
                (round(r.time - started, 2), round(r.loss, 4), round(r.tokens_per_s, 1))
                for r in sorted(records, key=lambda r: r.step)
            ]
    window = ended - started
    raw = bytes_after - bytes_before
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "name": name,
        "env": env,
        "miners": miners,
        "window_s": window,
        "per_miner": figures,
        "rounds": len({(r.kind, r.epoch) for r in rounds if r.success and r.group_size >= 2}),
        "failed_round_reports": sum(1 for r in rounds if not r.success or r.group_size < 2),
        "lo_bytes": raw,
        "lo_background_bytes_per_s": background_rate,
        "lo_bytes_net": max(0.0, raw - background_rate * window),
        "samples": sum(f["samples"] for f in figures.values()),
        "defaults": preset_env(MinerSettings, "tiny"),
    }
