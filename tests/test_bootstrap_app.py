"""The bootstrap's Flask app through the test client, against a real redis-server."""

from __future__ import annotations

import json
import time

import pytest
import redis
from bound_peers import bound

from hivetrain.bootstrap.app import ADDRS_PER_PEER, create_app
from hivetrain.identity import Domain, sign
from hivetrain.protocol.records import MAX_MULTIADDRS, BootstrapRecord, Keys, PeerRecord
from hivetrain.settings import BootstrapSettings
from hivetrain.store import Registry, connect_redis
from hivetrain.swarm import procs

RUN = "bt"
DOMAIN = Domain(RUN)  # what BootstrapSettings(run_id=RUN) derives on the local chain
BOOT = ["/ip4/10.0.0.1/tcp/31337/p2p/QmBoot", "/ip4/127.0.0.1/tcp/31337/p2p/QmBoot"]


def _addr(name: str, port: int = 1) -> str:
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{name}"


def _peer(name: str, role: str = "miner", addrs: list[str] | None = None) -> PeerRecord:
    return PeerRecord(peer_id=name, role=role, multiaddrs=addrs or [_addr(name)], started_at=time.time())


def _client(redis_url: str, cache_s: float = 0.0, **overrides):
    settings = BootstrapSettings(redis_url=redis_url, run_id=RUN, **overrides)
    return create_app(settings, cache_s=cache_s).test_client()


class SigningRegistry(Registry):
    """The registry as miners use it, every record signed by the test wallet."""

    def __init__(self, client, keys, wallet, domain: Domain = DOMAIN):
        super().__init__(client, keys, domain)
        self.wallet = wallet

    def register(self, record: PeerRecord, signer=None) -> None:
        signer = signer or self.wallet
        super().register(bound(record, signer.hotkey.ss58_address, self.domain), signer)


@pytest.fixture
def registry(redis_url, wallet):
    return SigningRegistry(connect_redis(redis_url), Keys(RUN), wallet)


def _register_in_order(registry: Registry, peers: list[PeerRecord]) -> None:
    for peer in peers:  # later = fresher
        registry.register(peer)
        time.sleep(0.002)


def test_bootstraps_first_then_freshest_peers_deduplicated(redis_url, registry):
    registry.set_bootstrap(BootstrapRecord(peer_id="QmBoot", multiaddrs=BOOT))
    _register_in_order(
        registry,
        [
            _peer("old"),
            _peer("val", role="validator"),
            _peer("dup", addrs=[BOOT[1], _addr("dup")]),  # shares an address with the bootstrap
            _peer("boot2", role="bootstrap"),  # bootstraps come from their own records only
            _peer("new"),
        ],
    )
    client = _client(redis_url)
    body = client.get("/initial_peers").get_json()
    assert body == {"initial_peers": [*BOOT, _addr("new"), _addr("dup"), _addr("val"), _addr("old")]}
    assert client.get("/return_dht_address").get_json() == body


def test_cap_and_limit(redis_url, registry):
    registry.set_bootstrap(BootstrapRecord(peer_id="QmBoot", multiaddrs=BOOT))
    _register_in_order(registry, [_peer(f"p{i}") for i in range(5)])
    client = _client(redis_url, max_initial_peers=4)
    assert client.get("/initial_peers").get_json()["initial_peers"] == [*BOOT, _addr("p4"), _addr("p3")]
    assert client.get("/initial_peers?limit=3").get_json()["initial_peers"] == [*BOOT, _addr("p4")]
    assert client.get("/return_dht_address?limit=1").get_json()["initial_peers"] == BOOT[:1]


def test_an_oversized_or_address_stuffed_registration_cannot_take_the_answer(redis_url, registry, other_wallet):
    keys, db = Keys(RUN), connect_redis(redis_url)
    _register_in_order(registry, [_peer(f"honest{i}") for i in range(3)])
    # the attacker's own, validly signed registration of 7.7 MB: written straight to Redis (register() refuses it)
    huge = _peer("huge", addrs=[_addr(f"huge{i}") for i in range(MAX_MULTIADDRS)]).model_dump(mode="json")
    huge.update(last_seen=time.time(), hotkey=other_wallet.hotkey.ss58_address, device="x" * 7_700_000)
    db.set(keys.peer("huge"), json.dumps(sign(other_wallet, DOMAIN, huge)), ex=30)
    db.zadd(keys.peer_index, {"huge": time.time()})
    # and one with every address it may have: each registration puts at most ADDRS_PER_PEER in an answer
    registry.register(_peer("stuffed", addrs=[_addr("stuffed", port) for port in range(MAX_MULTIADDRS)]), other_wallet)
    answer = _client(redis_url, max_initial_peers=8).get("/initial_peers").get_json()["initial_peers"]
    assert answer == [_addr("stuffed", port) for port in range(ADDRS_PER_PEER)] + [
        _addr(f"honest{i}") for i in (2, 1, 0)
    ]
    with pytest.raises(ValueError):
        _peer("more", addrs=[_addr("more", port) for port in range(MAX_MULTIADDRS + 1)])
    # every field within its bound, and still too big once signed and encoded (non-ASCII text): refused at the writer
    with pytest.raises(ValueError, match="over 16384"):
        registry.register(_peer("big", addrs=[f"/dns4/{'é' * 500}/{port}" for port in range(MAX_MULTIADDRS)]))


def test_registrations_of_another_run_or_subnet_are_not_handed_out(redis_url, wallet):
    db = connect_redis(redis_url)
    # a miner's registration in another run, copied byte for byte into this run's namespace
    other = Registry(db, Keys("other-run"), Domain("other-run"))
    other.register(bound(_peer("replayed"), wallet.hotkey.ss58_address, other.domain), wallet)
    (replayed,) = other.live_peers()
    db.set(Keys(RUN).peer(replayed.peer_id), db.get(other.keys.peer(replayed.peer_id)), ex=30)
    db.zadd(Keys(RUN).peer_index, {replayed.peer_id: time.time()})
    # a miner of subnet 1 with the same run id: the same namespace, another signature domain
    SigningRegistry(db, Keys(RUN), wallet, Domain(RUN, 1)).register(_peer("subnet1"))
    assert _client(redis_url).get("/initial_peers").get_json() == {"initial_peers": []}
    assert _client(redis_url, chain="bittensor", netuid=2).get("/initial_peers").get_json() == {"initial_peers": []}
    assert _client(redis_url, chain="bittensor", netuid=1).get("/initial_peers").get_json() == {
        "initial_peers": [_addr("subnet1")]
    }


def test_answers_are_reused_for_a_second_per_worker(redis_url, registry):
    registry.register(_peer("first"))
    cached = _client(redis_url, cache_s=60)
    assert cached.get("/initial_peers").get_json()["initial_peers"] == [_addr("first")]
    registry.register(_peer("second"))
    assert cached.get("/initial_peers").get_json()["initial_peers"] == [_addr("first")]  # from this worker's cache
    assert _client(redis_url, cache_s=0).get("/initial_peers").get_json()["initial_peers"] == [
        _addr("second"),
        _addr("first"),
    ]


@pytest.mark.parametrize("bad", ["0", "5", "-1", "abc", "1.5", "", "1_0", " 2", "99999999999"])
def test_bad_limit_is_a_json_400(redis_url, bad):
    response = _client(redis_url, max_initial_peers=4).get("/initial_peers", query_string={"limit": bad})
    assert response.status_code == 400
    assert response.is_json and "limit must be an integer from 1 to 4" in response.get_json()["message"]


def test_expired_peers_are_left_out(redis_url, registry):
    keys = Keys(RUN)
    registry.register(_peer("live"))
    client = redis.Redis.from_url(redis_url)
    # index says fresh but the record expired; record present but its heartbeat is too old
    client.zadd(keys.peer_index, {"gone": time.time()})
    client.set(keys.peer("stale"), _peer("stale").to_json())
    client.zadd(keys.peer_index, {"stale": time.time() - 3600})
    assert _client(redis_url).get("/initial_peers").get_json() == {"initial_peers": [_addr("live")]}


def test_health_and_readiness(redis_url, registry):
    client = _client(redis_url)
    assert client.get("/healthz").get_json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 503 and "no live bootstrap record" in response.get_json()["reason"]
    registry.set_bootstrap(BootstrapRecord(peer_id="QmBoot", multiaddrs=BOOT))
    response = client.get("/readyz")
    assert response.status_code == 200 and response.get_json()["bootstraps"] == ["QmBoot"]


def test_redis_down_is_503_json_never_500():
    client = _client(f"redis://127.0.0.1:{procs.free_port()}/0")
    for path in ("/initial_peers", "/return_dht_address", "/readyz"):
        response = client.get(path)
        assert response.status_code == 503 and response.is_json, path
    assert client.get("/healthz").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "hive_bootstrap_redis_errors_total 4.0" in metrics.text


def test_unknown_route_and_wrong_method_are_json(redis_url):
    client = _client(redis_url)
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.get_json()["error"] == "Not Found"
    wrong = client.post("/initial_peers")
    assert wrong.status_code == 405 and wrong.is_json and "GET" in wrong.headers["Allow"]


def test_metrics_count_requests_and_live_peers(redis_url, registry):
    _register_in_order(registry, [_peer("a"), _peer("b")])
    client = _client(redis_url)
    client.get("/initial_peers")
    client.get("/initial_peers?limit=x")
    client.get("/nope")
    text = client.get("/metrics").text
    assert 'hive_bootstrap_http_requests_total{route="/initial_peers",status="200"} 1.0' in text
    assert 'hive_bootstrap_http_requests_total{route="/initial_peers",status="400"} 1.0' in text
    assert 'hive_bootstrap_http_requests_total{route="<unmatched>",status="404"} 1.0' in text
    assert 'hive_bootstrap_http_request_duration_seconds_count{route="/initial_peers"} 2.0' in text
    assert "hive_bootstrap_live_peers 2.0" in text


def test_settings_from_env(redis_url, registry, monkeypatch):
    registry.register(_peer("a"))
    monkeypatch.setenv("HIVE_REDIS_URL", redis_url)
    monkeypatch.setenv("HIVE_RUN_ID", RUN)
    assert create_app().test_client().get("/initial_peers").get_json() == {"initial_peers": [_addr("a")]}
    monkeypatch.setenv("HIVE_MAX_INITIAL_PEERS", "0")
    with pytest.raises(SystemExit, match="HIVE_MAX_INITIAL_PEERS"):
        create_app()
