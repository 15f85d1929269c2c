"""hivetrain.wallet keeps bittensor's wallet files: a wallet made by either side loads in the other, with the same
keys, the same file contents and signatures that verify both ways."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import bittensor as bt
import pytest
from bittensor.keyfiles import Keyfile as SdkKeyfile

from hivetrain.identity import Domain, Verifier, existing_hotkey, load_or_create_wallet, sign, verify_signature
from hivetrain.wallet import Keyfile, Wallet

DOMAIN = Domain("wallet-test")
PAYLOAD = {"loss": 3.5, "peer_id": "QmPeer"}


def _both_verify(signer, ss58: str) -> None:
    envelope = sign(signer, DOMAIN, PAYLOAD)
    assert envelope["hotkey"] == ss58
    assert Verifier.in_memory(DOMAIN).verify(envelope) == PAYLOAD
    # the SDK's own verify (what bittensor.sp_core re-exports) accepts the same signature
    env = verify_signature(envelope, DOMAIN)
    assert bt.sp_core.verify(env.signed_message(DOMAIN), bytes.fromhex(env.signature[2:]), ss58, bt.CRYPTO_SR25519)


def test_a_wallet_made_here_loads_in_the_sdk(tmp_path):
    ours = load_or_create_wallet(str(tmp_path), "miner", "hk")
    sdk = bt.Wallet(name="miner", hotkey="hk", path=str(tmp_path))
    assert sdk.hotkey.ss58_address == ours.hotkey.ss58_address
    assert bytes(sdk.hotkey.public_key) == bytes(ours.hotkey.public_key)
    assert sdk.coldkey.ss58_address == sdk.coldkeypub.ss58_address == ours.coldkeypub.ss58_address
    assert sdk.hotkeypub.ss58_address == ours.hotkey.ss58_address
    assert not sdk.hotkey_file.is_encrypted() and not sdk.coldkey_file.is_encrypted()
    for name in ("coldkey", "coldkeypub.txt", "hotkeys/hk", "hotkeys/hkpub.txt"):
        assert os.stat(tmp_path / "miner" / name).st_mode & 0o777 == 0o600, name
    assert sorted(p.name for p in (tmp_path / "miner" / "hotkeys").iterdir()) == ["hk", "hkpub.txt"]  # no temp left
    _both_verify(ours, ours.hotkey.ss58_address)
    _both_verify(sdk, ours.hotkey.ss58_address)  # the SDK's wallet signs with the same key


def test_a_wallet_made_by_the_sdk_loads_here(tmp_path):
    sdk = bt.Wallet(name="validator", hotkey="default", path=str(tmp_path))
    sdk.create_new_coldkey(use_password=False, suppress=True)
    sdk.create_new_hotkey(use_password=False, suppress=True)
    before = {p: p.read_bytes() for p in (tmp_path / "validator").rglob("*") if p.is_file()}
    ours = load_or_create_wallet(str(tmp_path), "validator")
    assert {p: p.read_bytes() for p in (tmp_path / "validator").rglob("*") if p.is_file()} == before  # nothing made
    assert ours.hotkey.ss58_address == sdk.hotkey.ss58_address == existing_hotkey(str(tmp_path), "validator")
    assert ours.coldkey.ss58_address == ours.coldkeypub.ss58_address == sdk.coldkeypub.ss58_address
    _both_verify(ours, sdk.hotkey.ss58_address)
    _both_verify(sdk, sdk.hotkey.ss58_address)


def test_key_files_hold_what_the_sdk_writes(tmp_path):
    keypair = bt.sp_core.Keypair.create_from_uri("//Alice")
    Keyfile(tmp_path / "ours").write_new(keypair)
    SdkKeyfile(tmp_path / "sdk").set_keypair(keypair, encrypt=False)
    # the same JSON object (the binding orders its keys differently from one call to the next)
    assert json.loads((tmp_path / "ours").read_bytes()) == json.loads((tmp_path / "sdk").read_bytes())
    assert SdkKeyfile(tmp_path / "ours").get_keypair().ss58_address == keypair.ss58_address
    path = str(tmp_path / "miner" / "hotkeys" / "default")
    assert Keyfile(Path(path)).env_var_name() == SdkKeyfile(path).env_var_name()
    with pytest.raises(FileExistsError):  # never overwritten
        Keyfile(tmp_path / "ours").write_new(bt.sp_core.Keypair.create_from_uri("//Bob"))
    assert SdkKeyfile(tmp_path / "ours").get_keypair().ss58_address == keypair.ss58_address


def test_an_encrypted_sdk_hotkey_needs_its_password_in_the_environment(tmp_path, monkeypatch):
    sdk = bt.Wallet(name="locked", hotkey="default", path=str(tmp_path))
    sdk.create_new_coldkey(use_password=False, suppress=True)
    sdk.create_new_hotkey(suppress=True, hotkey_password="correct horse")
    variable = sdk.hotkey_file.env_var_name()
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValueError, match=variable):
        load_or_create_wallet(str(tmp_path), "locked")
    sdk.hotkey_file.save_password_to_env("correct horse")  # the SDK's own encoding, into the process environment
    try:
        assert load_or_create_wallet(str(tmp_path), "locked").hotkey.ss58_address == sdk.hotkey.ss58_address
    finally:
        os.unsetenv(variable)
    with pytest.raises(ValueError, match="encrypted"):
        existing_hotkey(str(tmp_path), "locked")


def test_concurrent_first_starts_agree_on_one_hotkey(tmp_path):
    hotkeys, errors = [], []

    def start():
        try:
            hotkeys.append(load_or_create_wallet(str(tmp_path), "race").hotkey.ss58_address)
        except Exception as error:  # reported below: a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(hotkeys) == 8 and len(set(hotkeys)) == 1
    assert bt.Wallet(name="race", path=str(tmp_path)).hotkeypub.ss58_address == hotkeys[0]


def test_wallet_names_are_checked():
    for name, hotkey in (("", "default"), ("a/b", "default"), ("miner", "")):
        with pytest.raises(ValueError):
            Wallet(name, hotkey, "/tmp")
