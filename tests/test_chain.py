"""LocalChain against a real redis-server; BittensorChain's mapping with a stub client and offline failure."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import bittensor as bt
import pytest
import redis

from hivetrain.chain import BittensorChain, Chain, ChainRegistrationError, LocalChain, make_chain, normalize


@pytest.fixture
def chain(redis_url):
    return LocalChain(redis.Redis.from_url(redis_url), "chaintest")


def test_uids_are_sequential_and_idempotent(chain):
    assert isinstance(chain, Chain)
    assert chain.register("hk-a", "/ip4/127.0.0.1/tcp/1", "miner") == 0
    assert chain.register("hk-b", "/ip4/127.0.0.1/tcp/2", "miner") == 1
    assert chain.register("hk-a", "/ip4/127.0.0.1/tcp/9", "miner") == 0  # re-register: same uid, new endpoint
    assert chain.uid_for("hk-b") == 1 and chain.uid_for("nobody") is None
    assert [(n.uid, n.hotkey, n.endpoint) for n in chain.metagraph()] == [
        (0, "hk-a", "/ip4/127.0.0.1/tcp/9"),
        (1, "hk-b", "/ip4/127.0.0.1/tcp/2"),
    ]
    with pytest.raises(ValueError):
        chain.register("hk-c", "", "bootstrap")


def test_concurrent_registrations_never_share_a_uid(redis_url):
    results: list[tuple[str, int]] = []

    def worker(i: int) -> None:
        local = LocalChain(redis.Redis.from_url(redis_url), "chaintest")
        for j in range(20):
            hotkey = f"hk-{j % 10}-{i % 2}"
            results.append((hotkey, local.register(hotkey, "", "miner")))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 80
    by_hotkey = {hotkey: {uid for h, uid in results if h == hotkey} for hotkey, _ in results}
    assert all(len(uids) == 1 for uids in by_hotkey.values()), by_hotkey
    assert sorted(uid for (uid,) in by_hotkey.values()) == list(range(20))


def test_metagraph_lists_roles_stake_and_time(chain):
    before = time.time()
    chain.register("miner-1", "/ip4/10.0.0.1/tcp/31337", "miner")
    chain.register("val-1", "http://validator:8080", "validator")
    graph = {n.hotkey: n for n in chain.metagraph()}
    assert (graph["miner-1"].role, graph["miner-1"].stake) == ("miner", 0.0)
    assert (graph["val-1"].role, graph["val-1"].stake) == ("validator", 1.0)
    assert graph["val-1"].last_update >= before
    chain.set_stake("miner-1", 2.5)
    chain.register("miner-1", "/ip4/10.0.0.1/tcp/31337", "miner")  # re-registering keeps stake
    assert {n.hotkey: n.stake for n in chain.metagraph()}["miner-1"] == 2.5
    with pytest.raises(ValueError):
        chain.set_stake("nobody", 1.0)
    assert chain.client.ttl(chain._neurons) > 0  # an abandoned run's metagraph expires


def test_weights_are_normalized_and_isolated_per_validator(chain):
    for hotkey in ("m0", "m1", "m2"):
        chain.register(hotkey, "", "miner")
    chain.register("v1", "", "validator")
    chain.register("v2", "", "validator")
    chain.set_weights("v1", {0: 3.0, 1: 1.0, 2: 0.0})
    chain.set_weights("v2", {2: 5.0})
    assert chain.weights("v1") == pytest.approx({0: 0.75, 1: 0.25})
    assert chain.weights("v2") == {2: 1.0}
    chain.set_weights("v1", {1: 1.0})  # replaces, not merges
    assert chain.weights("v1") == {1: 1.0} and chain.weights("v2") == {2: 1.0}
    assert chain.weights_record("v1").time > 0
    chain.set_weights("v2", {0: 0.0})
    assert chain.weights("v2") == {}
    assert chain.weights("m0") == {}
    with pytest.raises(ValueError, match="not a registered validator"):
        chain.set_weights("m0", {1: 1.0})
    with pytest.raises(ValueError, match="not registered"):
        chain.set_weights("v1", {99: 1.0})
    with pytest.raises(ValueError):
        chain.set_weights("v1", {0: -1.0})


def test_runs_do_not_see_each_other(redis_url):
    a = LocalChain(redis.Redis.from_url(redis_url), "run-a")
    b = make_chain("local", redis_client=redis.Redis.from_url(redis_url), run_id="run-b")
    a.register("hk", "", "miner")
    assert b.metagraph() == [] and b.register("other", "", "miner") == 0


def test_normalize_rejects_bad_values():
    assert normalize({}) == {} and normalize({3: 0.0}) == {}
    assert normalize({1: 1.0, 2: 3.0}) == {1: 0.25, 2: 0.75}
    for bad in ({1: float("nan")}, {1: -0.1}, {-1: 1.0}):
        with pytest.raises(ValueError):
            normalize(bad)


def test_make_chain_validates_arguments():
    with pytest.raises(ValueError, match="run_id"):
        make_chain("local")
    with pytest.raises(ValueError, match="netuid"):
        make_chain("bittensor")
    with pytest.raises(ValueError):
        make_chain("ethereum")


def _stub_client(registered: dict[str, int]):
    def neuron(uid, hotkey, permit, stake_rao, axon):
        return SimpleNamespace(
            uid=uid, hotkey=hotkey, validator_permit=permit, last_update=95, axon=axon, total_stake=bt.rao(stake_rao, 7)
        )

    graph = SimpleNamespace(
        block=100, neurons=[neuron(0, "hk-m", False, 0, None), neuron(1, "hk-v", True, 2_500_000_000, "1.2.3.4:8091")]
    )
    return SimpleNamespace(
        network="stub",
        neurons=SimpleNamespace(uid=lambda hotkey_ss58, netuid: registered.get(hotkey_ss58)),
        subnets=SimpleNamespace(metagraph=lambda netuid, commitments: graph),
        weights=SimpleNamespace(weights=lambda netuid: {1: {0: 1.0}}),
    )


def test_bittensor_chain_maps_the_sdk_metagraph():
    chain = make_chain("bittensor", netuid=7, client=_stub_client({"hk-m": 0, "hk-v": 1}))
    graph = chain.metagraph()
    assert [(n.uid, n.role, n.stake, n.endpoint) for n in graph] == [
        (0, "miner", 0.0, ""),
        (1, "validator", 2.5, "1.2.3.4:8091"),
    ]
    assert time.time() - graph[0].last_update == pytest.approx(5 * 12.0, abs=5)
    assert chain.register("hk-v", "ignored", "validator") == 1
    assert chain.weights("hk-v") == {0: 1.0} and chain.weights("hk-x") == {}
    with pytest.raises(ChainRegistrationError, match="btcli subnets register"):
        chain.register("hk-x", "", "miner")
    with pytest.raises(ValueError, match="wallet"):
        chain.set_weights("hk-v", {0: 1.0})


def test_bittensor_chain_hands_the_sdk_its_own_wallet(tmp_path):
    from hivetrain.identity import load_or_create_wallet

    wallet = load_or_create_wallet(str(tmp_path), "validator")
    chain = make_chain("bittensor", netuid=7, wallet=wallet, client=_stub_client({"hk-v": 1}))
    assert isinstance(chain.wallet, bt.Wallet) and chain.wallet.hotkey.ss58_address == wallet.hotkey.ss58_address
    sdk_wallet = bt.Wallet(name="validator", path=str(tmp_path))
    assert make_chain("bittensor", netuid=7, wallet=sdk_wallet, client=_stub_client({})).wallet is sdk_wallet


def test_a_service_on_the_local_chain_never_imports_the_bittensor_sdk(tmp_path):
    """The SDK takes about half a second to import: a miner or validator on the local chain starts without it,
    wallet, signatures and all; building the bittensor backend is what loads it."""
    code = (
        "import sys\n"
        "import redis\n"
        "import hivetrain.miner.__main__, hivetrain.miner.train\n"
        "import hivetrain.validator.__main__, hivetrain.validator.service\n"
        "from hivetrain.chain import make_chain\n"
        "from hivetrain.identity import Domain, Verifier, load_or_create_wallet, sign\n"
        f"wallet = load_or_create_wallet({str(tmp_path)!r}, 'miner')\n"
        "assert Verifier.in_memory(Domain('r')).verify(sign(wallet, Domain('r'), {'a': 1})) == {'a': 1}\n"
        "make_chain('local', redis_client=redis.Redis(), run_id='r')\n"
        "print('bittensor' in sys.modules)\n"
        "make_chain('bittensor', netuid=1, wallet=wallet, client=object())\n"
        "print('bittensor' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


def test_bittensor_chain_fails_fast_offline():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    chain = BittensorChain(netuid=1, network=f"ws://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(bt.RpcConnectionError):
        chain.uid_for("5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY")
    with pytest.raises(bt.RpcConnectionError):
        chain.metagraph()
    assert time.monotonic() - started < 10
    chain.client.close()
