"""How records travel signed: the envelopes a writer packs and every reader unpacks.

A registration, a departure and each telemetry entry travel as a ``SignedEnvelope``
(``hivetrain.identity``): the writer's hotkey signs the whole record for the run's ``Domain``.
What is agreed here, for whoever writes or reads them (the miner's reporting client, the
bootstrap's ingest, the registry in Redis, the validator's API and dashboard):

* ``signed_registration`` / ``signed_departure``: a peer's record (or its leaving) as the bytes stored;
* ``STREAMS`` / ``INGEST_STREAMS``: which records go to which telemetry stream, how long each is
  kept, which are signed, and which a miner may post;
* ``stream_fields`` / ``decode_entry``: one stream entry packed and unpacked (checked).

Nothing here talks to Redis or the network.
"""

from __future__ import annotations

import time

from hivetrain.identity import Domain, SignedEnvelope, VerificationError, sign, verify_signature
from hivetrain.log import get_logger
from hivetrain.protocol.records import (
    EVALS_STREAM_MAXLEN,
    MAX_REGISTRATION_BYTES,
    OFFENCES_STREAM_MAXLEN,
    RECEIPTS_STREAM_MAXLEN,
    ROUNDS_STREAM_MAXLEN,
    STEPS_STREAM_MAXLEN,
    Departure,
    EvalRecord,
    Keys,
    OffenceRecord,
    PeerRecord,
    ReceiptRecord,
    Record,
    RoundRecord,
    StepRecord,
)

logger = get_logger(__name__)

#: Each stream's record type -> (its attribute of ``Keys``, its approximate MAXLEN, whether entries are signed).
STREAMS = {
    StepRecord: ("steps", STEPS_STREAM_MAXLEN, True),
    RoundRecord: ("rounds", ROUNDS_STREAM_MAXLEN, True),
    OffenceRecord: ("offences", OFFENCES_STREAM_MAXLEN, True),
    ReceiptRecord: ("receipts", RECEIPTS_STREAM_MAXLEN, True),
    EvalRecord: ("evals", EVALS_STREAM_MAXLEN, False),  # written by the validator for its own API
}

#: Streams a miner may post to the bootstrap (``POST /v1/telemetry``), by their name on the wire.
INGEST_STREAMS: dict[str, type[Record]] = {
    "steps": StepRecord,
    "rounds": RoundRecord,
    "offences": OffenceRecord,
    "receipts": ReceiptRecord,
}


def same_run(keys: Keys, domain: Domain) -> Domain:
    """``domain``, once it is checked to be a ``Domain`` of the run ``keys`` name (a wiring mistake otherwise)."""
    if not isinstance(domain, Domain):
        raise ValueError(f"pass the run's identity.Domain (settings.domain_of(settings)), not {type(domain).__name__}")
    if domain.run_id != keys.run_id:
        raise ValueError(
            f"keys of run {keys.run_id!r} with the signature domain of run {domain.run_id!r}: "
            "build both from the same settings (Keys(s.run_id), domain_of(s))"
        )
    return domain


def _envelope_bytes(signer, domain: Domain, payload: dict, timestamp: float | None = None) -> bytes:
    envelope = sign(signer, domain, payload, timestamp=timestamp)
    return SignedEnvelope.model_validate(envelope).model_dump_json().encode()


def signed_registration(record: PeerRecord, signer, domain: Domain) -> tuple[bytes, float]:
    """(the envelope to store, its time): ``record`` stamped now, with the signer's hotkey, signed for ``domain``."""
    now = time.time()
    record = record.model_copy(update={"last_seen": now, "hotkey": signer.hotkey.ss58_address})
    envelope = _envelope_bytes(signer, domain, record.model_dump(mode="json"), timestamp=now)
    if len(envelope) > MAX_REGISTRATION_BYTES:
        raise ValueError(
            f"registration of {record.peer_id} is {len(envelope)} bytes, over {MAX_REGISTRATION_BYTES}: "
            "readers would drop it; register fewer or shorter addresses"
        )
    return envelope, now


def signed_departure(peer_id: str, signer, domain: Domain) -> bytes:
    """The envelope with which ``signer`` (the hotkey that registered ``peer_id``) takes its registration back."""
    return _envelope_bytes(signer, domain, Departure(peer_id=peer_id).model_dump(mode="json"))


def parse_record(model: type[Record], raw: bytes | None):
    """``raw`` (unsigned JSON, at most ``MAX_REGISTRATION_BYTES``) as a ``model``, or None (logged) when it is not
    one."""
    if raw is None:
        return None
    if len(raw) > MAX_REGISTRATION_BYTES:
        logger.warning(f"dropping a {model.__name__} of {len(raw)} bytes, over {MAX_REGISTRATION_BYTES}")
        return None
    try:
        return model.from_json(raw)
    except ValueError:
        logger.warning(f"dropping a malformed {model.__name__}: {raw[:200]!r}")
        return None


def stream_fields(record: Record, domain: Domain, signer=None) -> dict:
    """The fields of ``record``'s stream entry: its envelope signed by ``signer`` where its stream is signed."""
    _, _, signed = STREAMS[type(record)]
    if signed:
        if signer is None:
            raise ValueError(f"{type(record).__name__} telemetry must be signed: pass the writer's wallet")
        envelope = sign(signer, domain, record.model_dump(mode="json"), timestamp=record.time)
        return {"env": SignedEnvelope.model_validate(envelope).model_dump_json()}
    return {"json": record.to_json()}


def decode_entry(model: type[Record], fields: dict, domain: Domain) -> tuple[Record, str] | None:
    """(record, signer hotkey) of one stream entry, or None when it is malformed or not authentic.

    Signed entries are checked by signature alone (history: freshness is not asked), in ``domain``:
    an entry signed for another run or subnet is not authentic here. A consumer that must read each
    entry once (freshness, nonce) uses a ``Verifier`` instead (``hivetrain.validator.claims``).
    """
    _, _, signed = STREAMS[model]
    if not signed:
        record = parse_record(model, fields.get(b"json"))
        return None if record is None else (record, "")
    raw = fields.get(b"env")
    if raw is None:
        return None
    try:
        envelope = verify_signature(raw, domain)
        return model.model_validate(envelope.payload), envelope.hotkey
    except (VerificationError, ValueError) as error:
        logger.debug(f"dropping a {model.__name__}: {error}")
        return None
