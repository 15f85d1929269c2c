"""Hotkeys and signed envelopes: what a service writes for others to trust.

The original HiveMiner signed a timestamp but not the payload, so anyone holding an old
signature could attach it to any loss they liked. Here the signature covers the whole body:
``sign`` encodes ``{hotkey, nonce, payload, timestamp}`` as sorted-keys compact JSON, prefixes
a domain separator and signs it with the sr25519 hotkey. The separator names the protocol (so a
signature made for another one, e.g. bittensor's ``btauth/1`` HTTP headers, can never be replayed
as an envelope) and the ``Domain``: the run id and, on Bittensor, the subnet's netuid. A record
signed in one run or subnet therefore fails verification in every other, even where two runs
share a Redis or a validator. A service builds its ``Domain`` once from its settings
(``hivetrain.settings.domain_of``) and hands it to ``sign`` and to its ``Verifier``s; neither has a default.

``Verifier.verify`` checks, in this order: shape (``MalformedEnvelope``), signature in the
verifier's domain (``InvalidSignature``, also for an authentic record of another run or subnet),
freshness (``StaleRecord``: older than the window or too far in the future) and replay
(``ReplayedNonce``). The signature comes first so a ``StaleRecord`` is
always authentic (an honest peer with a skewed clock, not an attacker), and the nonce store is
written only after the signature verifies, so forged traffic cannot burn a real peer's nonces.

Nonce stores follow bittensor's ``http_auth.NonceStore`` protocol (``check_and_store``), so the
same store can back ``bittensor.http_auth.verify`` in an HTTP API: ``hivetrain.store.RedisNonceStore`` (``SET NX
EX``, shared by every validator process) or ``InMemoryNonceStore`` for unit tests.

Keys, wallets and signatures come from ``bittensor_core`` (through ``hivetrain.wallet``), the native binding the
bittensor SDK is built on, not from the SDK itself: the same keys and bytes, without the half second the SDK
takes to import on every start (only the bittensor chain backend needs it).
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bittensor_core import CRYPTO_SR25519, get_password_from_environment
from bittensor_core import verify as _sr25519_verify
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hivetrain.log import get_logger
from hivetrain.wallet import Wallet

logger = get_logger(__name__)

#: Protocol tag that opens every signed message; bump the version if the encoding ever changes
#: (version 1 had no run id or netuid: its records are refused as forgeries).
ENVELOPE_TAG = "hivetrain-envelope/2"
#: Records older than this (seconds) are stale; nonces are remembered this long plus the skew.
DEFAULT_WINDOW_S = 120.0
#: Records stamped further than this in the future are rejected (clock skew allowance).
DEFAULT_FUTURE_SKEW_S = 5.0
NONCE_BYTES = 16


# --- wallets --------------------------------------------------------------------------------


def load_or_create_wallet(wallet_dir: str, name: str, hotkey: str = "default") -> Wallet:
    """The wallet ``name``/``hotkey`` under ``wallet_dir``, created unencrypted on first start.

    Works offline (key generation is local). A coldkey is created only when the wallet has
    neither a coldkey nor a coldkeypub, so a wallet whose coldkey is kept elsewhere is left
    alone. Concurrent first starts are safe: the loser of the race reads the winner's keys.
    Raises ``ValueError`` if the hotkey is encrypted and its password is not in the environment.
    """
    if not name or not hotkey:
        raise ValueError("wallet name and hotkey name must be non-empty, e.g. name='miner', hotkey='default'")
    wallet = Wallet(name=name, hotkey=hotkey, path=str(Path(wallet_dir).expanduser()))
    created = []
    if not wallet.coldkey_file.exists_on_device() and not wallet.coldkeypub_file.exists_on_device():
        _create(wallet.create_new_coldkey, "coldkey", created)
    if not wallet.hotkey_file.exists_on_device():
        _create(wallet.create_new_hotkey, "hotkey", created)
    wallet = Wallet(name=name, hotkey=hotkey, path=wallet.path)  # drop cached keys after a lost race
    if wallet.hotkey_file.is_encrypted() and not get_password_from_environment(wallet.hotkey_file.env_var_name()):
        raise ValueError(
            f"hotkey {wallet.hotkey_file.path} is encrypted; services need an unencrypted hotkey "
            f"(or set {wallet.hotkey_file.env_var_name()} to its password)"
        )
    if created:
        logger.info(
            f"created {' and '.join(created)} for wallet {name}/{hotkey} in {wallet.path}: hotkey "
            f"{wallet.hotkey.ss58_address}"
        )
    return wallet


def existing_hotkey(wallet_dir: str, name: str, hotkey: str = "default") -> str:
    """The ss58 address of the hotkey ``name``/``hotkey`` under ``wallet_dir``, which must exist (nothing is
    created); raises ``ValueError`` naming the file otherwise."""
    wallet = Wallet(name=name, hotkey=hotkey, path=str(Path(wallet_dir).expanduser()))
    if not wallet.hotkey_file.exists_on_device():
        raise ValueError(f"no hotkey at {wallet.hotkey_file.path}: give the miner's hotkey, or its wallet folder")
    if wallet.hotkey_file.is_encrypted():
        raise ValueError(f"hotkey {wallet.hotkey_file.path} is encrypted: give the miner's hotkey (ss58) instead")
    return wallet.hotkey.ss58_address


def _create(make, what: str, created: list[str]) -> None:
    try:
        make()
        created.append(what)
    except FileExistsError:
        pass  # another process created it between our check and our write


# --- the signature domain -------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """Where a signature is valid: one run (``run_id``) on one chain (``netuid`` on Bittensor, None locally).

    Every signed message starts with ``separator(tag)``, so a signature made under one domain
    verifies under no other. Build it with ``hivetrain.settings.domain_of``: every service of a run reads the
    same ``HIVE_RUN_ID``, ``HIVE_CHAIN`` and ``HIVE_NETUID`` and so derives the same domain.
    """

    run_id: str
    netuid: int | None = None

    def __post_init__(self) -> None:
        run_id, netuid = self.run_id, self.netuid
        if not isinstance(run_id, str) or not run_id or not all(c.isprintable() and not c.isspace() for c in run_id):
            raise ValueError(f"run_id must be a non-empty word without spaces or control characters, got {run_id!r}")
        if netuid is not None and (isinstance(netuid, bool) or not isinstance(netuid, int) or netuid < 0):
            raise ValueError(
                f"netuid must be a subnet uid (an int >= 0) on Bittensor, or None on the local chain; got {netuid!r}"
            )

    def separator(self, tag: str) -> bytes:
        """``{tag}\\n{run_id}\\n{netuid or 'local'}\\n``: what opens every message signed for ``tag`` in this domain."""
        if not tag or "\n" in tag:
            raise ValueError(f"tag must be one non-empty line, got {tag!r}")
        return f"{tag}\n{self.run_id}\n{'local' if self.netuid is None else self.netuid}\n".encode()

    def __str__(self) -> str:
        return f"run {self.run_id}, " + ("the local chain" if self.netuid is None else f"netuid {self.netuid}")


def _domain(domain: Any) -> "Domain":
    if not isinstance(domain, Domain):
        raise ValueError(
            f"pass the service's identity.Domain (settings.domain_of(settings)), not {type(domain).__name__}: "
            "a signature must name its run and subnet"
        )
    return domain


# --- envelopes ------------------------------------------------------------------------------


class VerificationError(Exception):
    """A signed envelope was rejected; subclasses say why."""


class MalformedEnvelope(VerificationError):
    """Not an envelope: wrong fields, types or encodings."""


class InvalidSignature(VerificationError):
    """The signature does not verify against the claimed hotkey for this exact body."""


class StaleRecord(VerificationError):
    """Authentic, but older than the freshness window or too far in the future."""


class ReplayedNonce(VerificationError):
    """Authentic and fresh, but this hotkey already used this nonce inside the window."""


class SignedEnvelope(BaseModel):
    """The wire form: ``{"payload", "hotkey", "timestamp", "nonce", "signature"}``."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    payload: dict[str, Any]
    hotkey: str = Field(min_length=40, max_length=60, description="ss58 address of the signing sr25519 hotkey")
    timestamp: float = Field(description="unix time of signing")
    nonce: str = Field(pattern=r"^[0-9a-f]{16,128}$", description="random hex, unique per hotkey within the window")
    signature: str = Field(
        pattern=r"^0x[0-9a-f]{128}$", description="sr25519 signature of signed_message(domain), 0x-hex"
    )

    @field_validator("timestamp")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("timestamp must be a finite number")
        return value

    def signed_message(self, domain: Domain) -> bytes:
        return signed_message(domain, self.payload, self.hotkey, self.timestamp, self.nonce)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN/Infinity: one byte string per JSON value."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"payload must be JSON (str keys; str/int/float/bool/None/list/dict values, finite floats): {error}"
        ) from None


def signed_message(domain: Domain, payload: dict, hotkey: str, timestamp: float, nonce: str) -> bytes:
    """The exact bytes an envelope's signature covers: the domain, then the whole body, not just the timestamp."""
    body = canonical_json({"hotkey": hotkey, "nonce": nonce, "payload": payload, "timestamp": float(timestamp)})
    return _domain(domain).separator(ENVELOPE_TAG) + body


def sign(keypair: Any, domain: Domain, payload: dict, timestamp: float | None = None, nonce: str | None = None) -> dict:
    """Sign ``payload`` with a hotkey for ``domain`` (valid in that run and subnet only); returns the JSON-ready
    envelope.

    ``keypair`` is a wallet (its hotkey signs: ``hivetrain.wallet.Wallet`` or the SDK's ``bittensor.Wallet``) or a
    keypair. ``timestamp`` and ``nonce`` are injectable for tests only.
    """
    domain = _domain(domain)
    signer = keypair.hotkey if hasattr(keypair, "hotkey") else keypair
    if getattr(signer, "crypto_type", None) != CRYPTO_SR25519:
        raise ValueError(
            "envelopes are signed with sr25519 hotkeys: pass a wallet or an sr25519 keypair (create the hotkey with "
            "the default crypto type)"
        )
    if not isinstance(payload, dict):
        raise ValueError(f"payload must be a dict, got {type(payload).__name__}")
    payload = json.loads(canonical_json(payload))  # what the reader will see after a JSON round trip
    timestamp = time.time() if timestamp is None else float(timestamp)
    nonce = secrets.token_hex(NONCE_BYTES) if nonce is None else nonce
    hotkey = signer.ss58_address
    signature = bytes(signer.sign(signed_message(domain, payload, hotkey, timestamp, nonce)))
    envelope = SignedEnvelope(
        payload=payload, hotkey=hotkey, timestamp=timestamp, nonce=nonce, signature="0x" + signature.hex()
    )
    return envelope.model_dump()


class NonceStore(Protocol):
    """bittensor's ``http_auth.NonceStore``: True (and remember) if unseen, False if seen."""

    def check_and_store(self, hotkey_ss58: str, nonce: Any) -> bool: ...


class InMemoryNonceStore:
    """A ``NonceStore`` for one process that forgets a nonce ``retention`` seconds after its first use (as
    ``bittensor.http_auth.InMemoryNonceStore``, without importing the SDK)."""

    def __init__(self, retention: float):
        self.retention = float(retention)
        self._seen: set[tuple[str, Any]] = set()
        self._expiry: deque[tuple[float, tuple[str, Any]]] = deque()
        self._lock = threading.Lock()

    def check_and_store(self, hotkey_ss58: str, nonce: Any) -> bool:
        key, now = (hotkey_ss58, nonce), time.monotonic()
        with self._lock:
            while self._expiry and self._expiry[0][0] <= now:
                self._seen.discard(self._expiry.popleft()[1])
            if key in self._seen:
                return False
            self._seen.add(key)
            self._expiry.append((now + self.retention, key))
            return True


def verify_signature(envelope: SignedEnvelope | dict | str | bytes, domain: Domain) -> SignedEnvelope:
    """The envelope if its hotkey signed exactly this body in ``domain``; no freshness or nonce check.

    For records read again long after they were written (telemetry history, a saved state).
    Raises ``MalformedEnvelope`` or ``InvalidSignature`` (also for a record signed in another run or subnet).
    """
    domain = _domain(domain)
    env = _parse(envelope)
    try:
        valid = _sr25519_verify(
            env.signed_message(domain), bytes.fromhex(env.signature[2:]), env.hotkey, CRYPTO_SR25519
        )
    except ValueError as error:  # undecodable ss58 address
        raise MalformedEnvelope(f"bad hotkey address: {error}") from None
    if not valid:
        raise InvalidSignature(f"signature does not match the body for hotkey {env.hotkey} in {domain}")
    return env


class Verifier:
    """Checks envelopes of one ``Domain``: signature over the whole body, freshness window, one use per nonce."""

    def __init__(
        self,
        nonces: NonceStore,
        domain: Domain,
        window_s: float = DEFAULT_WINDOW_S,
        future_skew_s: float = DEFAULT_FUTURE_SKEW_S,
    ):
        self.domain = _domain(domain)
        if window_s <= 0 or future_skew_s < 0:
            raise ValueError(f"need window_s > 0 and future_skew_s >= 0, got {window_s} and {future_skew_s}")
        retention = getattr(nonces, "retention", None)
        if retention is not None and retention < window_s + future_skew_s:
            raise ValueError(
                f"the nonce store forgets after {retention:g}s but records stay fresh for "
                f"{window_s + future_skew_s:g}s; "
                "replays in the gap would pass: give the store retention >= window_s + future_skew_s"
            )
        self.nonces, self.window_s, self.future_skew_s = nonces, float(window_s), float(future_skew_s)

    @classmethod
    def in_memory(
        cls, domain: Domain, window_s: float = DEFAULT_WINDOW_S, future_skew_s: float = DEFAULT_FUTURE_SKEW_S
    ) -> "Verifier":
        """A verifier for ``domain`` whose nonce memory is this process only (tests, single-process tools)."""
        return cls(InMemoryNonceStore(retention=window_s + future_skew_s), domain, window_s, future_skew_s)

    def verify(self, envelope: SignedEnvelope | dict | str | bytes, now: float | None = None) -> dict:
        """The payload of an authentic, fresh, first-seen envelope; ``VerificationError`` otherwise."""
        env = self.authenticate(envelope, now=now)
        if not self.nonces.check_and_store(env.hotkey, env.nonce):
            raise ReplayedNonce(f"nonce {env.nonce} of {env.hotkey} was already used")
        return env.payload

    def authenticate(
        self, envelope: SignedEnvelope | dict | str | bytes, now: float | None = None, fresh: bool = True
    ) -> SignedEnvelope:
        """The envelope if its signature verifies in this domain (and, with ``fresh``, is inside the window); uses up
        no nonce.

        For records that are read again and again (a registration refreshed by heartbeats, a
        telemetry history), where a second read is not a replay.
        """
        env = verify_signature(envelope, self.domain)
        if not fresh:
            return env
        now = time.time() if now is None else now
        if now - env.timestamp > self.window_s:
            raise StaleRecord(f"record from {env.hotkey} is {now - env.timestamp:.1f}s old (window {self.window_s:g}s)")
        if env.timestamp - now > self.future_skew_s:
            raise StaleRecord(
                f"record from {env.hotkey} is {env.timestamp - now:.1f}s in the future (skew {self.future_skew_s:g}s)"
            )
        return env


def _parse(envelope: SignedEnvelope | dict | str | bytes) -> SignedEnvelope:
    if isinstance(envelope, SignedEnvelope):
        return envelope
    try:
        if isinstance(envelope, (str, bytes)):
            return SignedEnvelope.model_validate_json(envelope)
        return SignedEnvelope.model_validate(envelope)
    except ValidationError as error:
        raise MalformedEnvelope(
            f"not a signed envelope: {error.error_count()} problem(s): {error.errors()[0]['msg']}"
        ) from None
