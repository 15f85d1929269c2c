"""hivemind's training-progress records in the DHT, read as plain values (what a validator polls).

hivemind.Optimizer's ``ProgressTracker`` (prefix = run_id) stores each peer's ``LocalTrainingProgress``
under ``f"{run_id}_progress"``, signed (RSA) and checked against ``TrainingProgressSchema``. Which
record validators that takes, and how a record is laid out, are hivemind's; the checks on what a
record claims are the validator's (``hivetrain.validator.progress``).
"""

from __future__ import annotations

import weakref
from typing import Any

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema
from hivemind.p2p import PeerID

_validated: "weakref.WeakKeyDictionary[object, set[str]]" = weakref.WeakKeyDictionary()


def progress_key(run_id: str) -> str:
    """The DHT key hivemind.Optimizer's ProgressTracker (prefix = run_id) writes under."""
    return f"{run_id}_progress"


def install_progress_validators(dht, run_id: str) -> None:
    """Give ``dht`` the record validators ProgressTracker uses, once per run.

    The RSA validator strips the signature ProgressTracker's values carry; the schema validator
    drops records that do not match ``TrainingProgressSchema``.
    """
    runs = _validated.setdefault(dht, set())
    if run_id not in runs:
        dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=run_id), RSASignatureValidator()])
        runs.add(run_id)


def live_progress_records(dht, run_id: str) -> list[tuple[Any, Any]]:
    """(subkey, raw value) of every live progress record for ``run_id``; parse each with ``progress_values``.

    The subkey is the writer's RSA public key (not its peer id); a tracker that shut down stores
    None, which is left out here.
    """
    install_progress_validators(dht, run_id)
    found = dht.get(progress_key(run_id), latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    return [(subkey, entry.value) for subkey, entry in entries.items() if getattr(entry, "value", None) is not None]


def progress_values(raw) -> dict[str, Any]:
    """One raw progress record as plain values (peer id in base58); raises on a malformed record."""
    record = LocalTrainingProgress.parse_obj(raw)
    return dict(
        peer_id=PeerID(record.peer_id).to_base58(),
        epoch=record.epoch,
        samples_accumulated=record.samples_accumulated,
        samples_per_second=float(record.samples_per_second),
        time=float(record.time),
        client_mode=record.client_mode,
    )
