"""Admission against a real redis-server: who the local chain admits, which peer ids that lets in, the operator's
CLI, the bootstrap refusing registrations of hotkeys it does not admit, and bans that follow a hotkey to a new key.

The training path's own doors (matchmaking, parts, state downloads, progress records) are attacked with real
hivemind peers in tests/test_allreduce.py, tests/test_sync.py and tests/test_progress.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from bound_peers import KeyWallet, bound, peer_id

from hivetrain.admission import HotkeyGate, admitted_peers, make_admission
from hivetrain.bootstrap.app import create_app
from hivetrain.chain import LocalChain
from hivetrain.hivemind_compat import Bans, OffenceLog
from hivetrain.identity import Domain, SignedEnvelope, sign
from hivetrain.protocol.admission import Admission
from hivetrain.protocol.records import Keys, PeerRecord
from hivetrain.settings import BootstrapSettings, ValidatorSettings
from hivetrain.store import Refused, Registry, connect_redis

RUN = "adm"
DOMAIN = Domain(RUN)
HONEST, OPERATOR, STRANGER = KeyWallet(11), KeyWallet(12), KeyWallet(13)


def _register(registry: Registry, name: str, wallet, role: str = "miner") -> str:
    record = PeerRecord(
        peer_id=name, role=role, multiaddrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{name}"], started_at=time.time()
    )
    registry.register(bound(record, wallet.hotkey.ss58_address, DOMAIN, name=name), wallet)
    return peer_id(name)


def _registration(name: str, wallet) -> bytes:
    record = PeerRecord(
        peer_id=name, role="miner", multiaddrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{name}"], started_at=time.time()
    )
    record = bound(record, wallet.hotkey.ss58_address, DOMAIN, name=name)
    return (
        SignedEnvelope.model_validate(sign(wallet, DOMAIN, record.model_dump(mode="json"))).model_dump_json().encode()
    )


def test_only_peers_bound_to_an_admitted_hotkey_are_admitted_and_each_counts_as_its_hotkey(redis_url):
    client = connect_redis(redis_url)
    registry, chain = Registry(client, Keys(RUN), DOMAIN), LocalChain(client, RUN)
    honest = _register(registry, "adm-honest", HONEST)
    operator_keys = [_register(registry, f"adm-operator-{i}", OPERATOR) for i in range(3)]
    stranger = _register(registry, "adm-stranger", STRANGER)
    validator = KeyWallet(14)
    chain.register(validator.hotkey.ss58_address, "http://validator", "validator")  # its own Redis user does this
    validator_peer = _register(registry, "adm-validator", validator, role="validator")
    assert admitted_peers(registry, chain) == {validator_peer: validator.hotkey.ss58_address}

    chain.admit(HONEST.hotkey.ss58_address)
    chain.admit(OPERATOR.hotkey.ss58_address)
    admission = Admission(lambda: admitted_peers(registry, chain), refresh_s=0.2)
    assert admission.admits(honest) and all(admission.admits(p) for p in operator_keys)
    assert not admission.admits(stranger) and not admission.admits("QmNeverRegistered")
    assert admission.refusal(stranger, "test") is not None
    # the operator's three keys are one voter, the honest peer another; an unknown peer id is its own
    assert len({admission.voter(p) for p in operator_keys}) == 1
    assert admission.voter(honest) != admission.voter(operator_keys[0])
    assert admission.voter("QmNeverRegistered") == "QmNeverRegistered"

    assert chain.revoke(OPERATOR.hotkey.ss58_address) and not chain.revoke(STRANGER.hotkey.ss58_address)
    deadline = time.monotonic() + 10
    while admission.admits(operator_keys[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not admission.admits(operator_keys[0]), "a revoked hotkey's peers were still admitted after a refresh"
    assert admission.admits(honest)
    admission.close()


def test_open_admission_admits_any_key_each_its_own_voter(redis_url):
    admission = make_admission(ValidatorSettings(redis_url=redis_url, run_id=RUN))  # the local chain's default
    assert admission.is_open and admission.admits("QmAnyone") and admission.voter("QmAnyone") == "QmAnyone"
    closed = make_admission(ValidatorSettings(redis_url=redis_url, run_id=RUN, admission="chain"))
    assert not closed.is_open and not closed.admits("QmAnyone")
    closed.close()


def test_a_ban_holds_for_the_hotkey_so_a_new_key_is_still_banned():
    """A banned peer used to come back with a fresh libp2p key (issue 23)."""
    admission = Admission.fixed({"QmOld": "5Operator", "QmNew": "5Operator", "QmHonest": "5Honest"})
    bans = Bans(OffenceLog(ban_s=60.0), admission)
    bans.ban("QmOld", "test", "sender", "sent a flipped part")
    assert bans.is_banned("QmOld") and bans.is_banned("QmNew") and bans.refuses("QmNew")
    assert not bans.refuses("QmHonest")
    assert bans.refuses("QmUnadmitted") and not bans.is_banned("QmUnadmitted")  # refused, but named for nothing
    # without admission (hivemind's behaviour) the new key walks in
    open_bans = Bans(OffenceLog(ban_s=60.0))
    open_bans.ban("QmOld", "test", "sender", "sent a flipped part")
    assert open_bans.is_banned("QmOld") and not open_bans.refuses("QmNew")


def test_the_bootstrap_refuses_registrations_of_hotkeys_the_chain_does_not_admit(redis_url):
    client = connect_redis(redis_url)
    LocalChain(client, RUN).admit(HONEST.hotkey.ss58_address)
    settings = BootstrapSettings(redis_url=redis_url, run_id=RUN, admission="chain")
    app = create_app(settings, cache_s=0).test_client()
    assert app.post("/v1/peers", data=_registration("gate-honest", HONEST)).status_code == 200
    refused = [app.post("/v1/peers", data=_registration(f"gate-fresh-{i}", KeyWallet(100 + i))) for i in range(20)]
    assert {answer.status_code for answer in refused} == {403}
    assert "not admitted" in refused[0].get_json()["message"]
    assert [p.peer_id for p in Registry(client, Keys(RUN), DOMAIN).live_peers()] == [peer_id("gate-honest")]
    # open admission (the local chain's default) stores them, as before
    open_app = create_app(BootstrapSettings(redis_url=redis_url, run_id=RUN), cache_s=0).test_client()
    assert open_app.post("/v1/peers", data=_registration("gate-fresh-0", KeyWallet(100))).status_code == 200


def test_a_chain_that_cannot_answer_is_a_503_not_a_500(redis_url):
    class Unreachable(LocalChain):
        def admitted(self, hotkeys):
            raise ConnectionError("chain down")

    gate = HotkeyGate(Unreachable(connect_redis(redis_url), RUN))
    with pytest.raises(Refused) as refused:
        gate(HONEST.hotkey.ss58_address)
    assert refused.value.status == 503


def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HIVE_REDIS_URL=redis_url, HIVE_RUN_ID=RUN)
    return subprocess.run(
        [sys.executable, "-m", "hivetrain.admission", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_operator_admits_lists_and_revokes_hotkeys_from_the_command_line(redis_url):
    hotkey = HONEST.hotkey.ss58_address
    admitted = _cli(redis_url, "admit", hotkey)
    assert admitted.returncode == 0, admitted.stderr
    assert hotkey in LocalChain(connect_redis(redis_url), RUN).admitted({hotkey})
    listed = _cli(redis_url, "list")
    assert listed.returncode == 0 and listed.stdout.split() == [hotkey], listed
    revoked = _cli(redis_url, "revoke", hotkey)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert not LocalChain(connect_redis(redis_url), RUN).admitted({hotkey})
    nothing = _cli(redis_url, "admit")
    assert nothing.returncode == 2 and "needs at least one hotkey" in nothing.stderr


def test_a_forked_child_loads_for_itself_even_when_the_parent_was_loading_as_it_forked(redis_url):
    """hivemind forks its averagers while the optimizer's tracker thread may be loading the admitted set: a lock
    held at that moment would be held forever in the child, and its matchmaking would hang on the first peer."""
    import multiprocessing

    from hivetrain.protocol import admission as admission_module

    client = connect_redis(redis_url)
    registry, chain = Registry(client, Keys(RUN), DOMAIN), LocalChain(client, RUN)
    honest = _register(registry, "adm-fork-honest", HONEST)
    chain.admit(HONEST.hotkey.ss58_address)
    admission = Admission(lambda: admitted_peers(registry, chain), refresh_s=60.0)
    answers = multiprocessing.get_context("fork").Queue()
    with admission_module._first_load:  # the parent is loading right now
        child = multiprocessing.get_context("fork").Process(target=lambda: answers.put(admission.admits(honest)))
        child.start()
    try:
        assert answers.get(timeout=30) is True
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()
    admission.close()
