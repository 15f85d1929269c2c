"""Registrations as real miners make them: each with its own libp2p identity (Ed25519, fast to make)
and the binding that proves its hotkey controls it (``hivetrain.protocol.binding``)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from bittensor.sp_core import Keypair

from hivetrain.identity import Domain
from hivetrain.protocol.binding import bind, identity_peer_id, new_ed25519_identity
from hivetrain.protocol.records import PeerRecord

_FOLDER = Path(tempfile.mkdtemp(prefix="hive-test-identities-"))
atexit.register(shutil.rmtree, _FOLDER, ignore_errors=True)


@functools.cache
def identity(name: str) -> Path:
    """The identity file of the test peer called ``name`` (the same one for the whole session)."""
    path = _FOLDER / f"{len(list(_FOLDER.iterdir()))}.key"
    path.write_bytes(new_ed25519_identity())
    return path


@functools.cache
def peer_id(name: str) -> str:
    """The real peer id of the test peer called ``name``."""
    return identity_peer_id(identity(name).read_bytes())


def bound(record: PeerRecord, hotkey: str, domain: Domain, name: str | None = None) -> PeerRecord:
    """``record`` as the peer called ``name`` (default: its peer_id) registers it for ``hotkey`` in ``domain``."""
    name = record.peer_id if name is None else name
    real = peer_id(name)
    key, signature = bind(identity(name), domain, real, hotkey)
    return record.model_copy(update={"peer_id": real, "hotkey": hotkey, "peer_key": key, "peer_signature": signature})


class KeyWallet:
    """A wallet-shaped signer around one keypair from ``seed``: 200 wallets on disk would take seconds each."""

    def __init__(self, seed: int):
        self.hotkey = self.coldkey = self.coldkeypub = Keypair.create_from_seed(seed.to_bytes(2, "big") * 16)
