"""What a swarm run did, read back from Redis telemetry: rounds with their peers, losses, checkpoints."""

from __future__ import annotations

from pathlib import Path

import redis

from hivetrain.identity import Domain
from hivetrain.protocol.checkpoints import latest_checkpoint, read_trainer_state
from hivetrain.protocol.records import Keys, RoundRecord, StepRecord
from hivetrain.protocol.rounds import rounds_from_records
from hivetrain.store import read_stream


def miners_from_steps(steps: list[StepRecord]) -> dict[str, dict]:
    """Per miner: first and last loss, steps, samples and epochs seen."""
    miners: dict[str, dict] = {}
    for step in steps:
        entry = miners.setdefault(
            step.peer_id,
            {
                "first_loss": step.loss,
                "first_epoch": step.local_epoch,
                "first_time": step.time,
                "last_loss": None,
                "last_epoch": None,
                "steps": 0,
                "samples": 0,
                "tokens_per_s": 0.0,
            },
        )
        entry.update(
            last_loss=step.loss,
            last_epoch=step.local_epoch,
            samples=step.samples,
            tokens_per_s=step.tokens_per_s,
            last_time=step.time,
        )
        entry["steps"] += 1
    return miners


def collect(
    client: redis.Redis,
    keys: Keys,
    domain: Domain,
    since: float = 0.0,
    checkpoint_dirs: list[Path] | None = None,
    last: int | None = None,
) -> dict:
    """The run summary: rounds (with peers), per-miner losses and epochs, latest checkpoints.

    ``last`` reads only that many of the newest records of each stream (for a cheap status line).
    """
    steps = [s for s in read_stream(client, keys, domain, StepRecord, count=last) if s.time >= since]
    records = [r for r in read_stream(client, keys, domain, RoundRecord, count=last) if r.time >= since]
    checkpoints = {}
    for folder in checkpoint_dirs or []:
        latest = latest_checkpoint(folder)
        if latest is not None:
            state = read_trainer_state(latest)
            checkpoints[state.peer_id] = {"path": str(latest), "epoch": state.epoch, "name": Path(folder).name}
    miners = miners_from_steps(steps)
    for peer_id, checkpoint in checkpoints.items():
        miners.setdefault(peer_id, {})["checkpoint"] = checkpoint["path"]
        miners[peer_id]["name"] = checkpoint["name"]
    rounds = rounds_from_records(records)
    return {
        "run_id": keys.run_id,
        "rounds": rounds,
        "rounds_by_size": _count_by_size(rounds),
        "miners": miners,
        "checkpoints": [c["path"] for c in checkpoints.values()],
    }


def _count_by_size(rounds: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in rounds:
        counts[str(entry["group_size"])] = counts.get(str(entry["group_size"]), 0) + 1
    return dict(sorted(counts.items()))
