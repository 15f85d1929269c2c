"""Averaging rounds as the swarm saw them, read back from the miners' RoundRecord telemetry.

Every member of a round reports it, so one round arrives as several records; the validator's
API and the launcher's summary both need them merged the same way.
"""

from __future__ import annotations

from hivetrain.protocol.records import RoundRecord


def rounds_from_records(records: list[RoundRecord]) -> list[dict]:
    """Successful rounds, one entry per (kind, epoch, group), however many members reported it.

    Gradient rounds name their peers; state rounds (local-updates mode) only know their size.
    """
    rounds: dict[tuple, dict] = {}
    for record in records:
        if not record.success or record.group_size < 2:
            continue
        group = tuple(sorted(record.group))
        key = (record.kind, record.epoch, group) if group else (record.kind, record.epoch, record.group_size)
        entry = rounds.setdefault(
            key,
            {
                "kind": record.kind,
                "epoch": record.epoch,
                "group_size": record.group_size,
                "peers": list(group),
                "reported_by": [],
                "duration_s": 0.0,
                "time": record.time,
            },
        )
        entry["reported_by"].append(record.peer_id)
        entry["duration_s"] = max(entry["duration_s"], record.duration_s)
        entry["time"] = min(entry["time"], record.time)
    for entry in rounds.values():
        entry["reported_by"].sort()
    return sorted(rounds.values(), key=lambda r: (r["time"], r["epoch"]))
