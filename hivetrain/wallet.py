"""Hotkeys on disk: bittensor's wallet folders, read and written without importing the bittensor SDK.

``import bittensor`` costs about half a second (its chain client, EVM contracts and codecs come with it), and a
miner on the local chain needs nothing from it but its hotkey. ``bittensor_core`` is the native binding the
SDK's own ``bittensor.Wallet`` is built on (keypairs, the keyfile encoding and its encryption, sr25519
signatures) and imports in a few hundredths of a second; this module lays its keys out exactly as the SDK does:

    <path>/<name>/coldkey, coldkeypub.txt, hotkeys/<hotkey>, hotkeys/<hotkey>pub.txt

with the same encoding, the same ``BT_PW_<PATH>`` password variables, owner-only files. A wallet made here
loads in ``bittensor.Wallet`` and ``btcli``, and one made there loads here (``tests/test_wallet.py`` checks
both ways, with the same signatures). The SDK gets its own ``Wallet`` over the same folder where it is used
(``hivetrain.chain``'s bittensor backend).

Nothing here prompts: a service has no terminal, so an encrypted key needs its password in the environment.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bittensor_core import (
    CRYPTO_SR25519,
    Keypair,
    decrypt_keyfile_data,
    deserialize_keypair_from_keyfile_data,
    get_password_from_environment,
    keyfile_data_is_encrypted,
    serialized_keypair_to_keyfile_data,
)

#: Words in a new key's mnemonic (the SDK's default). The mnemonic is not kept: the keyfile is the key.
MNEMONIC_WORDS = 12


class Keyfile:
    """One key file of a wallet; the SDK's ``bittensor.keyfiles.Keyfile`` reads and writes the same bytes."""

    def __init__(self, path: Path):
        self.path = str(path)

    def exists_on_device(self) -> bool:
        return Path(self.path).exists()

    def env_var_name(self) -> str:
        """The environment variable that holds this file's password (the SDK's name for it)."""
        return "BT_PW_" + self.path.replace(os.sep, "_").replace(".", "_").upper()

    def is_encrypted(self) -> bool:
        path = Path(self.path)
        return path.exists() and os.access(path, os.R_OK) and bool(keyfile_data_is_encrypted(path.read_bytes()))

    def keypair(self) -> Keypair:
        """The key stored here, decrypted with the password from ``env_var_name()`` when it is encrypted."""
        data = Path(self.path).read_bytes()
        if keyfile_data_is_encrypted(data):
            password = get_password_from_environment(self.env_var_name())
            if not password:
                raise ValueError(f"keyfile {self.path} is encrypted: set {self.env_var_name()} to its password")
            data = bytes(decrypt_keyfile_data(data, password))
        return deserialize_keypair_from_keyfile_data(data)

    def write_new(self, keypair: Keypair) -> None:
        """Store ``keypair`` unencrypted, owner-only; ``FileExistsError`` if the file exists (never overwritten).

        Written to a temporary file and linked into place, so a reader never sees half a key and, of two
        processes creating the same key at once, exactly one wins."""
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0o600
        try:
            os.write(fd, bytes(serialized_keypair_to_keyfile_data(keypair)))
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.link(tmp, path)
        finally:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)


class Wallet:
    """The wallet ``name`` under ``path`` with its hotkey ``hotkey``: ``bittensor.Wallet(name, hotkey, path)``'s files.

    Keys load on first use. Wallet-shaped for the SDK too (``coldkey``, ``coldkeypub``, ``hotkey``)."""

    def __init__(self, name: str, hotkey: str = "default", path: str = "~/.bittensor/wallets"):
        if not name or not hotkey or "/" in name or "/" in hotkey:
            raise ValueError(f"wallet and hotkey names must be non-empty words without '/', got {name!r}/{hotkey!r}")
        self.name, self.hotkey_str, self.path = name, hotkey, path
        folder = Path(path).expanduser() / name
        self.coldkey_file = Keyfile(folder / "coldkey")
        self.coldkeypub_file = Keyfile(folder / "coldkeypub.txt")
        self.hotkey_file = Keyfile(folder / "hotkeys" / hotkey)
        self.hotkeypub_file = Keyfile(folder / "hotkeys" / f"{hotkey}pub.txt")
        self._keys: dict[str, Keypair] = {}

    def __repr__(self) -> str:
        return f"Wallet(name={self.name!r}, hotkey={self.hotkey_str!r}, path={self.path!r})"

    def _key(self, which: str) -> Keypair:
        if which not in self._keys:
            self._keys[which] = getattr(self, f"{which}_file").keypair()
        return self._keys[which]

    @property
    def hotkey(self) -> Keypair:
        return self._key("hotkey")

    @property
    def coldkey(self) -> Keypair:
        return self._key("coldkey")

    @property
    def coldkeypub(self) -> Keypair:
        return self._key("coldkeypub")

    def create_new_coldkey(self) -> None:
        """A new unencrypted sr25519 coldkey and its public file; ``FileExistsError`` if the coldkey exists."""
        self._create(self.coldkey_file, self.coldkeypub_file)

    def create_new_hotkey(self) -> None:
        """A new unencrypted sr25519 hotkey and its public file; ``FileExistsError`` if the hotkey exists."""
        self._create(self.hotkey_file, self.hotkeypub_file)

    def _create(self, secret: Keyfile, public: Keyfile) -> None:
        keypair = Keypair.create_from_mnemonic(Keypair.generate_mnemonic(MNEMONIC_WORDS), CRYPTO_SR25519)
        secret.write_new(keypair)
        if public.exists_on_device():  # left by a key that was deleted: it names the old key
            os.unlink(public.path)
        public.write_new(_public_only(keypair))


def _public_only(keypair: Keypair) -> Keypair:
    return Keypair(
        ss58_address=keypair.ss58_address,
        public_key=bytes(keypair.public_key),
        crypto_type=keypair.crypto_type,
        ss58_format=keypair.ss58_format,
    )
