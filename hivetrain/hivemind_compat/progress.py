"""hivemind's training-progress records in the DHT, read as plain values (what a validator polls).

hivemind.Optimizer's ``ProgressTracker`` (prefix = run_id) stores each peer's ``LocalTrainingProgress``
under ``f"{run_id}_progress"``, signed (RSA) and checked against ``TrainingProgressSchema``. Which
record validators that takes, and how a record is laid out, are hivemind's; the checks on what a
record claims are the validator's (``hivetrain.validator.progress``).
"""

from __future__ import annotations

import functools
import re
import weakref
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from hivetrain.hivemind_compat.pins import follows
from hivetrain.protocol.binding import load_identity, peer_id_of

#: hivemind's owner mark on a signed record's subkey (``RSASignatureValidator.PUBLIC_KEY_FORMAT``).
_OWNER = re.compile(rb"\[owner:(.+?)\]", re.DOTALL)

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


class IdentityKey(RSAPrivateKey):
    """hivemind's RSA signing key, made from the peer's libp2p identity rather than fresh for the process.

    hivemind signs progress records with a key of their own (``RSAPrivateKey.process_wide()``), so a
    record's signer says nothing about the peer id it names. Signed with the identity's key, the
    signer's peer id is the record's own, and a reader can refuse a record that speaks for another
    peer (``progress_signer``).
    """

    @follows(RSAPrivateKey, "__init__", "eaaa16a881cbadc6")  # sign, to_bytes and get_public_key read _private_key
    def __init__(self, key: rsa.RSAPrivateKey):  # no super().__init__(): it would generate a new key
        self._private_key = key


def identity_signing_key(identity: bytes) -> RSAPrivateKey:
    """The signing key for ``ProgressTracker(private_key=...)`` of a libp2p identity file's bytes (RSA: what
    hivemind generates); ``ValueError`` for another key type."""
    key, _ = load_identity(identity)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(
            "progress records are signed with the DHT identity's key, and hivemind signs with RSA only: "
            "this identity is not RSA (delete it and hivemind makes an RSA one at the next start)"
        )
    return IdentityKey(key)


def progress_signer(subkey: Any) -> str | None:
    """The peer id whose key signed the progress record stored under ``subkey`` (hivemind's ``[owner:<key>]``
    mark); None when the subkey carries no RSA key."""
    return _signer_of(subkey) if isinstance(subkey, bytes) else None


@functools.lru_cache(maxsize=4096)  # a validator asks for every record each second: parse each key once
def _signer_of(subkey: bytes) -> str | None:
    found = _OWNER.fullmatch(subkey)
    if found is None:
        return None
    try:
        key = serialization.load_ssh_public_key(found.group(1))
    except (ValueError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, rsa.RSAPublicKey):
        return None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return peer_id_of(crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString())
