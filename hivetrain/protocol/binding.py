"""A registration's proof that its hotkey controls the libp2p key behind the peer id it names.

A peer id is the hash of a libp2p public key; anyone can write any peer id into a record, but only
the holder of the private key (the DHT's identity file) can sign with it. A registration carries
that public key and its signature over (the signature domain: run id and, on Bittensor, netuid;
peer id; hotkey): a reader recomputes the peer id from the key, checks the signature, and so knows
that this hotkey speaks for this peer in this run and subnet. A hijacker who copies a victim's key
and signature under its own hotkey fails the signature; one who signs with its own key names a
different peer id.

Both key types libp2p uses for identities are understood: RSA (what hivemind generates; peer ids
``Qm...``, the key hashed with SHA-256) and Ed25519 (``12D3KooW...``, the key inlined).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

import base58
import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from google.protobuf.message import DecodeError
from hivemind.proto import crypto_pb2

from hivetrain.identity import Domain, canonical_json

#: Protocol tag of a binding's signed message (``Domain.separator``); version 1 named the run only.
BINDING_TAG = "hivetrain-peer-binding/2"
#: libp2p inlines public keys up to this size in the peer id (the "identity" multihash); larger ones are hashed.
MAX_INLINE_KEY_BYTES = 42
#: Encoded sizes a reader accepts before decoding anything (an RSA-4096 key and signature fit).
MAX_KEY_CHARS, MAX_SIGNATURE_CHARS = 1200, 800


def binding_message(domain: Domain, peer_id: str, hotkey: str) -> bytes:
    """The exact bytes the libp2p key signs: valid in ``domain`` (its run and subnet) only."""
    if not isinstance(domain, Domain):
        raise ValueError(f"pass the service's identity.Domain (domain_of(settings)), not {type(domain).__name__}")
    return domain.separator(BINDING_TAG) + canonical_json({"hotkey": hotkey, "peer_id": peer_id})


def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id of a protobuf-encoded public key."""
    if len(public_key) <= MAX_INLINE_KEY_BYTES:  # the identity multihash: code 0x00, length, the key itself
        digest = bytes([0x00, len(public_key)]) + public_key
    else:
        digest = multihash.encode(hashlib.sha256(public_key).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


def load_identity(identity: bytes):
    """(private key, protobuf-encoded public key) from a libp2p identity file's bytes."""
    try:
        proto = crypto_pb2.PrivateKey.FromString(identity)
    except DecodeError as error:
        raise ValueError(f"not a libp2p private key: {error}") from None
    if proto.key_type == crypto_pb2.RSA:
        key = serialization.load_der_private_key(proto.data, password=None)
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif proto.key_type == crypto_pb2.Ed25519:
        key = ed25519.Ed25519PrivateKey.from_private_bytes(proto.data[:32])
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raise ValueError(f"libp2p key type {proto.key_type} is not supported: use RSA (hivemind's default) or Ed25519")
    return key, crypto_pb2.PublicKey(key_type=proto.key_type, data=public).SerializeToString()


def bind(identity_path: str | Path, domain: Domain, peer_id: str, hotkey: str) -> tuple[str, str]:
    """(peer_key, peer_signature) for ``PeerRecord``: the DHT identity in ``identity_path`` vouching for ``hotkey``.

    Raises ``ValueError`` if the file is not the identity of ``peer_id``.
    """
    return bind_identity(Path(identity_path).read_bytes(), domain, peer_id, hotkey, where=str(identity_path))


def bind_identity(
    identity: bytes, domain: Domain, peer_id: str, hotkey: str, where: str = "the identity"
) -> tuple[str, str]:
    """``bind`` for an identity file's bytes."""
    key, public = load_identity(identity)
    if peer_id_of(public) != peer_id:
        raise ValueError(f"{where} is the identity of {peer_id_of(public)}, not of {peer_id}")
    message = binding_message(domain, peer_id, hotkey)
    signature = (
        key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        if isinstance(key, rsa.RSAPrivateKey)
        else key.sign(message)
    )
    return base64.b64encode(public).decode(), base64.b64encode(signature).decode()


def binding_problem(domain: Domain, peer_id: str, hotkey: str, peer_key: str, peer_signature: str) -> str | None:
    """Why this registration does not prove that ``hotkey`` controls ``peer_id`` in ``domain``; None when it does."""
    if not peer_key or not peer_signature:
        return "no peer-key binding"
    if len(peer_key) > MAX_KEY_CHARS or len(peer_signature) > MAX_SIGNATURE_CHARS:
        return "peer-key binding too large"
    try:
        public = base64.b64decode(peer_key, validate=True)
        signature = base64.b64decode(peer_signature, validate=True)
        proto = crypto_pb2.PublicKey.FromString(public)
    except (binascii.Error, ValueError, DecodeError):
        return "peer-key binding is not base64 protobuf"
    if peer_id_of(public) != peer_id:
        return f"peer key is the key of {peer_id_of(public)[:16]}..., not of this peer id"
    message = binding_message(domain, peer_id, hotkey)
    try:
        if proto.key_type == crypto_pb2.RSA:
            key = serialization.load_der_public_key(proto.data)
            if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
                return "peer key is not an RSA key of at least 2048 bits"
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif proto.key_type == crypto_pb2.Ed25519:
            ed25519.Ed25519PublicKey.from_public_bytes(proto.data).verify(signature, message)
        else:
            return f"peer key type {proto.key_type} is not supported"
    except InvalidSignature:
        return "the peer key did not sign this hotkey for this run and subnet"
    except ValueError as error:
        return f"peer key unreadable: {error}"
    return None


def identity_peer_id(identity: bytes) -> str:
    """The peer id of an identity file's bytes."""
    return peer_id_of(load_identity(identity)[1])


def new_ed25519_identity() -> bytes:
    """A fresh libp2p identity (Ed25519, protobuf-encoded, as an identity file holds it): for tests and tools."""
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=seed + public).SerializeToString()
