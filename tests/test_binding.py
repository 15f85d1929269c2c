"""Peer-key bindings: real libp2p identities (hivemind's RSA files, Ed25519), real DHT peer ids, forged bindings
refused."""

from __future__ import annotations

import hivemind
import pytest
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from hivetrain.identity import Domain
from hivetrain.protocol.binding import bind, binding_problem, identity_peer_id, new_ed25519_identity

RUN = Domain("bind")


@pytest.fixture
def rsa_identity(tmp_path):
    path = tmp_path / "rsa.key"
    P2P.generate_identity(str(path))  # what a miner's DHT writes on its first start
    return path


@pytest.fixture
def ed_identity(tmp_path):
    path = tmp_path / "ed.key"
    path.write_bytes(new_ed25519_identity())
    return path


def _peer_id(path) -> str:
    return identity_peer_id(path.read_bytes())


def test_an_rsa_binding_holds_for_its_hotkey_run_and_subnet_only(rsa_identity, wallet, other_wallet):
    peer_id = _peer_id(rsa_identity)
    assert peer_id == PeerID.from_identity(rsa_identity.read_bytes()).to_base58()  # hivemind's own derivation
    hotkey, thief = wallet.hotkey.ss58_address, other_wallet.hotkey.ss58_address
    key, signature = bind(rsa_identity, RUN, peer_id, hotkey)
    assert binding_problem(RUN, peer_id, hotkey, key, signature) is None
    # the victim's key and signature copied under the thief's hotkey, or replayed in another run or subnet
    assert "did not sign" in binding_problem(RUN, peer_id, thief, key, signature)
    assert "did not sign" in binding_problem(Domain("other-run"), peer_id, hotkey, key, signature)
    assert "did not sign" in binding_problem(Domain("bind", 1), peer_id, hotkey, key, signature)
    on_subnet_1 = bind(rsa_identity, Domain("bind", 1), peer_id, hotkey)
    assert binding_problem(Domain("bind", 1), peer_id, hotkey, *on_subnet_1) is None
    assert "did not sign" in binding_problem(Domain("bind", 2), peer_id, hotkey, *on_subnet_1)
    assert binding_problem(RUN, peer_id, thief, "", "") == "no peer-key binding"
    assert "not base64" in binding_problem(RUN, peer_id, hotkey, "%%%", signature)


def test_a_binding_by_another_key_names_another_peer(rsa_identity, ed_identity, wallet):
    victim = _peer_id(rsa_identity)
    hotkey = wallet.hotkey.ss58_address
    with pytest.raises(ValueError, match="not of"):
        bind(ed_identity, RUN, victim, hotkey)  # the thief's own key cannot vouch for the victim's id
    key, signature = bind(ed_identity, RUN, _peer_id(ed_identity), hotkey)
    assert "not of this peer id" in binding_problem(RUN, victim, hotkey, key, signature)
    assert (
        _peer_id(ed_identity).startswith("12D3KooW")
        and binding_problem(RUN, _peer_id(ed_identity), hotkey, key, signature) is None
    )


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_a_real_dht_has_the_peer_id_its_identity_file_gives(kind, rsa_identity, ed_identity):
    path = rsa_identity if kind == "rsa" else ed_identity
    dht = hivemind.DHT(start=True, identity_path=str(path), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        assert dht.peer_id.to_base58() == _peer_id(path)
    finally:
        dht.shutdown()
