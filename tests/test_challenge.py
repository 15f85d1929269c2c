"""The miner's spot-check endpoint, attacked over real HTTP: the real waitress server on loopback, the
validators listed by a real LocalChain in the session's redis-server.

Each attack worked against the endpoint as it was (any signed hotkey answered, one queue of 32 for
everyone, dim and block_index bounded only by the wire format, no body limit, Werkzeug's
development server, a /healthz that answered while training hung).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from bittensor.sp_core import Keypair
from http_fuzz import raw_exchange, status_of

from hivetrain.chain import LocalChain
from hivetrain.data import BlockStream
from hivetrain.identity import Domain, InvalidSignature, Verifier, sign
from hivetrain.miner.challenge import MAX_BODY_BYTES, SERVER_THREADS, ChallengeLimits, ChallengeServer, TokenBucket
from hivetrain.miner.health import TrainingHealth
from hivetrain.miner.metrics import MinerMetrics
from hivetrain.miner.train import challenge_block_limit
from hivetrain.miner.validators import EARLY_READ_S, ValidatorList
from hivetrain.protocol.spotcheck import CHALLENGE_PASSES, MAX_DIM
from hivetrain.store import connect_redis
from hivetrain.swarm.redis_server import start_redis
from hivetrain.tokenizer import load_tokenizer

#: The run (local chain) of the miner and its validators; a challenge signed for any other is a forgery here.
DOMAIN = Domain("challenge")
LIMITS = ChallengeLimits(max_dim=64, max_batch=2, block_limit=100, rate=100.0, burst=100, pending=2, timeout_s=20.0)


def fresh_hotkey() -> Keypair:
    return Keypair.create_from_seed(os.urandom(32))


def challenge(miner_hotkey: str, **overrides) -> dict:
    body = {"miner_hotkey": miner_hotkey, "block_index": 3, "batch_size": 2, "seed": 7, "dim": 64, "epoch": 5}
    return {**body, **overrides}


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


class Endpoint:
    """A miner's real ChallengeServer with a stand-in training loop that answers only while ``training`` is set."""

    def __init__(
        self,
        wallet,
        validators: ValidatorList,
        limits: ChallengeLimits = LIMITS,
        health=None,
        prepare=None,
        domain: Domain = DOMAIN,
    ):
        self.metrics = MinerMetrics()
        self.server = ChallengeServer(
            wallet,
            "127.0.0.1",
            0,
            validators,
            limits,
            domain=domain,
            window_s=60.0,
            prepare=prepare,
            health=health,
            metrics=self.metrics,
        ).start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.training = threading.Event()
        self.training.set()
        self.computed: list = []  # (challenge, batch) the loop answered
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._train, daemon=True)
        self._loop.start()

    def _train(self) -> None:
        def compute(asked, batch):
            self.computed.append((asked, batch))
            return 5, [0.5] * asked.dim

        while not self._stop.wait(0.01):
            if self.training.is_set():
                self.server.answer_pending(compute)

    def post(self, signer, body: dict, domain: Domain = DOMAIN, **kwargs) -> requests.Response:
        return requests.post(f"{self.url}/challenge", json=sign(signer, domain, body), timeout=30, **kwargs)

    def count(self, outcome: str) -> float:
        return self.metrics.registry.get_sample_value("hive_miner_challenges_total", {"outcome": outcome})

    def stop(self) -> None:
        self._stop.set()
        self._loop.join(timeout=5)
        self.server.stop()


@pytest.fixture
def chain(redis_url):
    return LocalChain(connect_redis(redis_url), "challenge")


@pytest.fixture
def validators(chain, other_wallet):
    """other_wallet is the validator; the list is read from the chain by the real ValidatorList."""
    chain.register(other_wallet.hotkey.ss58_address, "http://validator", "validator")
    listed = ValidatorList(chain, refresh_s=30.0).start()
    yield listed
    listed.stop()


@pytest.fixture
def endpoint(wallet, validators):
    served = Endpoint(wallet, validators)
    yield served
    served.stop()


# --- who may ask --------------------------------------------------------------------------------
def test_a_validators_challenge_gets_a_signed_answer_bound_to_it(endpoint, wallet, other_wallet):
    request = sign(other_wallet, DOMAIN, challenge(wallet.hotkey.ss58_address))
    response = requests.post(f"{endpoint.url}/challenge", json=request, timeout=30)
    assert response.status_code == 200
    answer = Verifier.in_memory(DOMAIN).verify(response.json())
    assert answer["challenge_nonce"] == request["nonce"]
    assert answer["validator"] == other_wallet.hotkey.ss58_address
    assert len(answer["projection"]) == 64 and endpoint.count("answered") == 1


def test_a_non_validators_signed_challenge_is_refused_before_anything_is_queued(endpoint, chain, wallet):
    stranger, miner = fresh_hotkey(), fresh_hotkey()
    chain.register(miner.ss58_address, "http://miner", "miner")  # on the chain, but not as a validator
    signers = {stranger.ss58_address: stranger, miner.ss58_address: miner, wallet.hotkey.ss58_address: wallet}
    for hotkey, signer in signers.items():  # a fresh hotkey, a miner, the miner itself
        response = endpoint.post(signer, challenge(wallet.hotkey.ss58_address))
        assert response.status_code == 403 and response.json()["error"] == "not a validator", response.text
        assert endpoint.server.queue.held(hotkey) == 0
    assert endpoint.computed == [] and endpoint.count("refused") == 3


def test_a_validator_below_the_minimum_stake_is_refused(chain, wallet, other_wallet):
    chain.register(other_wallet.hotkey.ss58_address, "http://validator", "validator")  # stake 1.0
    listed = ValidatorList(chain, min_stake=5.0).start()
    served = Endpoint(wallet, listed)
    try:
        assert served.post(other_wallet, challenge(wallet.hotkey.ss58_address)).status_code == 403
        chain.set_stake(other_wallet.hotkey.ss58_address, 5.0)
        assert listed.refresh()
        assert served.post(other_wallet, challenge(wallet.hotkey.ss58_address)).status_code == 200
    finally:
        served.stop()
        listed.stop()


def test_unsigned_forged_and_replayed_requests_are_refused(endpoint, wallet, other_wallet):
    body = challenge(wallet.hotkey.ss58_address)
    assert requests.post(f"{endpoint.url}/challenge", json=body, timeout=30).status_code == 401  # not an envelope
    assert requests.post(f"{endpoint.url}/challenge", data="nonsense", timeout=30).status_code == 400
    forged = sign(other_wallet, DOMAIN, body)
    forged["payload"]["block_index"] = 4
    assert requests.post(f"{endpoint.url}/challenge", json=forged, timeout=30).status_code == 401
    signed = sign(other_wallet, DOMAIN, body)
    assert requests.post(f"{endpoint.url}/challenge", json=signed, timeout=30).status_code == 200
    assert requests.post(f"{endpoint.url}/challenge", json=signed, timeout=30).status_code == 401  # same nonce again


@pytest.mark.parametrize("signed_in", [Domain("other-run"), Domain("challenge", 1)], ids=["another run", "a subnet"])
def test_a_validators_challenge_signed_for_another_run_or_subnet_is_refused(endpoint, wallet, other_wallet, signed_in):
    """A validator listed here too (one hotkey in two runs or subnets) cannot have its challenges of there answered
    here."""
    response = endpoint.post(other_wallet, challenge(wallet.hotkey.ss58_address), domain=signed_in)
    assert response.status_code == 401 and "InvalidSignature" in response.json()["detail"], response.text
    assert endpoint.computed == [] and endpoint.count("invalid") == 1
    assert endpoint.post(other_wallet, challenge(wallet.hotkey.ss58_address)).status_code == 200  # this run's challenge


def test_a_miners_answer_holds_in_its_own_subnet_only(chain, validators, wallet, other_wallet):
    """The answer of a miner of subnet 1 is signed for subnet 1: replayed at a validator of subnet 2, it is a
    forgery."""
    served = Endpoint(wallet, validators, domain=Domain("challenge", 1))
    try:
        response = served.post(other_wallet, challenge(wallet.hotkey.ss58_address), domain=Domain("challenge", 1))
    finally:
        served.stop()
    assert response.status_code == 200
    for elsewhere in (Domain("challenge", 2), Domain("challenge"), Domain("other-run", 1)):
        with pytest.raises(InvalidSignature):
            Verifier.in_memory(elsewhere).verify(response.json())
    assert (
        Verifier.in_memory(Domain("challenge", 1)).verify(response.json())["validator"]
        == other_wallet.hotkey.ss58_address
    )


def test_a_stranger_cannot_pass_as_a_validator_by_naming_its_hotkey(endpoint, wallet, other_wallet):
    envelope = sign(fresh_hotkey(), DOMAIN, challenge(wallet.hotkey.ss58_address))
    envelope["hotkey"] = other_wallet.hotkey.ss58_address  # the validator's name, not its signature
    response = requests.post(f"{endpoint.url}/challenge", json=envelope, timeout=30)
    assert response.status_code == 401 and endpoint.computed == []


def test_a_challenge_for_another_miner_is_refused(endpoint, other_wallet):
    response = endpoint.post(other_wallet, challenge(other_wallet.hotkey.ss58_address))
    assert response.status_code == 403 and response.json()["error"] == "wrong miner"


def test_a_flood_of_fresh_hotkeys_does_not_stop_the_validators_challenge(endpoint, wallet, other_wallet):
    endpoint.training.clear()  # the loop is busy with a step while the flood arrives
    flooders = [fresh_hotkey() for _ in range(40)]
    with ThreadPoolExecutor(16) as pool:
        flood = list(
            pool.map(lambda key: endpoint.post(key, challenge(wallet.hotkey.ss58_address)).status_code, flooders)
        )
        asked = pool.submit(endpoint.post, other_wallet, challenge(wallet.hotkey.ss58_address))
        wait_for(
            lambda: endpoint.server.queue.held(other_wallet.hotkey.ss58_address) == 1,
            "the validator's challenge queued",
        )
        endpoint.training.set()
        assert asked.result().status_code == 200
    assert flood == [403] * 40
    assert len(endpoint.computed) == 1 and endpoint.count("refused") == 40


def test_a_second_validator_flooding_cannot_take_the_first_validators_share(
    endpoint, chain, wallet, other_wallet, validators
):
    rival = fresh_hotkey()
    chain.register(rival.ss58_address, "http://rival", "validator")
    assert validators.refresh() and rival.ss58_address in validators.hotkeys
    endpoint.training.clear()
    with ThreadPoolExecutor(12) as pool:
        flood = [pool.submit(endpoint.post, rival, challenge(wallet.hotkey.ss58_address, seed=i)) for i in range(40)]
        wait_for(lambda: sum(f.done() for f in flood) == 40 - LIMITS.pending, "the rival's flood to be turned away")
        asked = pool.submit(endpoint.post, other_wallet, challenge(wallet.hotkey.ss58_address))
        wait_for(
            lambda: endpoint.server.queue.held(other_wallet.hotkey.ss58_address) == 1,
            "the validator's challenge queued",
        )
        endpoint.training.set()
        assert asked.result().status_code == 200
        codes = sorted(f.result().status_code for f in flood)
    assert codes == [200] * LIMITS.pending + [503] * (40 - LIMITS.pending)
    assert endpoint.count("limited") == 40 - LIMITS.pending


def test_a_validator_registered_after_the_last_read_is_answered(chain, wallet, other_wallet):
    now = [0.0]
    listed = ValidatorList(chain, refresh_s=3600.0, clock=lambda: now[0]).start()
    served = Endpoint(wallet, listed)
    try:
        chain.register(other_wallet.hotkey.ss58_address, "http://validator", "validator")
        assert (
            served.post(other_wallet, challenge(wallet.hotkey.ss58_address)).status_code == 403
        )  # just read: no early read
        now[0] += EARLY_READ_S
        reads = listed.reads
        assert served.post(other_wallet, challenge(wallet.hotkey.ss58_address)).status_code == 200
        assert listed.reads == reads + 1
        for _ in range(20):  # a flood of unknown hotkeys pulls no further read forward until EARLY_READ_S has passed
            assert not listed.allows(fresh_hotkey().ss58_address)
        assert listed.reads == reads + 1
    finally:
        served.stop()
        listed.stop()


def test_the_validator_list_survives_a_redis_outage(tmp_path, other_wallet):
    service, url = start_redis(tmp_path / "redis", persist=False)
    try:
        chain = LocalChain(connect_redis(url, timeout=1.0), "outage")
        chain.register(other_wallet.hotkey.ss58_address, "http://validator", "validator")
        listed = ValidatorList(chain).start()
        assert listed.hotkeys == {other_wallet.hotkey.ss58_address}
        service.stop(timeout=5)
        assert listed.refresh(wait_s=10.0)
        assert listed.failures == 1 and listed.allows(other_wallet.hotkey.ss58_address)
        listed.stop()
    finally:
        service.stop(timeout=5)


# --- how much may be asked ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, bound",
    [
        ({"dim": 72}, "dim <= 64"),
        ({"dim": MAX_DIM}, "dim <= 64"),
        ({"batch_size": 3}, "batch_size <= 2"),
        ({"block_index": 100}, "block_index < 100"),
        ({"block_index": 10**18}, "block_index < 100"),
        ({"dim": 9}, "multiple of 8"),  # within the bounds, but the projection takes multiples of 8 only (was a 500)
    ],
)
def test_a_challenge_beyond_the_bounds_gets_400_naming_the_bound(endpoint, wallet, other_wallet, overrides, bound):
    response = endpoint.post(other_wallet, challenge(wallet.hotkey.ss58_address, **overrides))
    assert response.status_code == 400 and bound in response.json()["detail"], response.text
    assert endpoint.computed == []


def test_the_block_bound_is_the_shards_first_passes_when_known(tmp_path):
    tokenizer = load_tokenizer()
    bundled = BlockStream(tokenizer=tokenizer, block_size=64, num_shards=16, shard=3)
    assert (
        challenge_block_limit(bundled, 10) == CHALLENGE_PASSES * bundled.blocks_per_pass
    )  # every block a validator picks
    texts = tmp_path / "train.jsonl"
    texts.write_text("".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(20)))
    streamed = BlockStream(str(texts), tokenizer=tokenizer, block_size=64)
    assert not streamed.materialize and challenge_block_limit(streamed, 10) == 10


def test_beyond_the_wire_formats_bounds_gets_400(endpoint, wallet, other_wallet):
    response = endpoint.post(other_wallet, challenge(wallet.hotkey.ss58_address, batch_size=10_000))
    assert response.status_code == 400 and response.json()["error"] == "bad challenge"


def test_the_batch_is_read_off_the_training_loop(wallet, validators, other_wallet):
    reading = threading.Event()
    stuck = threading.Event()

    def prepare(asked):  # a streamed dataset that hangs
        reading.set()
        stuck.wait(30)
        return asked.block_index

    served = Endpoint(wallet, validators, ChallengeLimits(timeout_s=1.0), prepare=prepare)
    try:
        response = served.post(other_wallet, challenge(wallet.hotkey.ss58_address))
        assert reading.is_set() and response.status_code == 503 and response.json()["error"] == "timeout"
        assert served.server.answer_pending(lambda asked, batch: (0, [0.0] * 8)) == 0  # the loop did not wait for it
        stuck.set()
        wait_for(
            lambda: served.server.queue.held(other_wallet.hotkey.ss58_address) == 0, "the expired challenge dropped"
        )
        assert served.computed == []
    finally:
        stuck.set()
        served.stop()


def test_rate_limit_per_validator_hotkey(wallet, validators, other_wallet):
    served = Endpoint(wallet, validators, ChallengeLimits(rate=0.001, burst=2))
    try:
        codes = [served.post(other_wallet, challenge(wallet.hotkey.ss58_address)).status_code for _ in range(3)]
    finally:
        served.stop()
    assert codes == [200, 200, 429]


def test_token_bucket_refills():
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.allow("a", now=0.0) and not bucket.allow("a", now=0.5)
    assert bucket.allow("a", now=1.6) and bucket.allow("b", now=1.6)


# --- the server ---------------------------------------------------------------------------------
def test_a_one_megabyte_body_gets_413(endpoint):
    response = requests.post(
        f"{endpoint.url}/challenge",
        data=b"{" + b" " * (1 << 20) + b"}",
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413


@pytest.mark.parametrize("junk", ["[" * 60_000, '{"hotkey": "' + "5" * 60_000 + '"}', '{"hotkey": 1e999}', "\u0000"])
def test_junk_under_the_limit_gets_a_4xx_never_a_500(endpoint, junk):
    response = requests.post(
        f"{endpoint.url}/challenge", data=junk, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert 400 <= response.status_code < 500 and response.json()["error"], response.text
    assert endpoint.computed == []


def test_a_chunked_body_over_the_limit_gets_413(endpoint):
    head = (
        b"POST /challenge HTTP/1.1\r\nHost: miner\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (16384, b" " * 16384)
    answer = raw_exchange(
        endpoint.server.port,
        head,
        timeout=20.0,
        body_parts=[chunk] * (2 * MAX_BODY_BYTES // 16384 + 1) + [b"0\r\n\r\n"],
    )
    assert status_of(answer) == 413
    assert requests.get(f"{endpoint.url}/healthz", timeout=10).status_code == 200


def test_a_lying_content_length_gets_a_4xx_never_a_500(endpoint, wallet, other_wallet):
    body = json.dumps(sign(other_wallet, DOMAIN, challenge(wallet.hotkey.ss58_address))).encode()
    head = b"POST /challenge HTTP/1.1\r\nHost: miner\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    short = raw_exchange(
        endpoint.server.port, head % 40, timeout=20.0, body_parts=[body, b" " * (1 << 20)]
    )  # more than it said
    assert status_of(short) == 400 and b" 500 " not in short
    long = raw_exchange(
        endpoint.server.port, head % (1 << 20), timeout=20.0, body_parts=[body]
    )  # less than it said, and too much
    assert status_of(long) == 413
    assert endpoint.computed == [] and requests.get(f"{endpoint.url}/healthz", timeout=10).status_code == 200


def test_slow_clients_hold_no_thread(endpoint, wallet, other_wallet):
    body = json.dumps(sign(other_wallet, DOMAIN, challenge(wallet.hotkey.ss58_address))).encode()
    head = (
        b"POST /challenge HTTP/1.1\r\nHost: miner\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    slow = [
        socket.create_connection(("127.0.0.1", endpoint.server.port), timeout=10) for _ in range(2 * SERVER_THREADS)
    ]
    try:
        for conn in slow:  # each sends its headers and a first byte of the body, then drips
            conn.sendall(head + body[:1])
        for conn in slow:
            conn.sendall(body[1:2])
        assert requests.get(f"{endpoint.url}/healthz", timeout=10).status_code == 200
        assert endpoint.post(other_wallet, challenge(wallet.hotkey.ss58_address, seed=1)).status_code == 200
        for conn in slow:
            conn.sendall(body[2:3])  # still open: the server has not given up on them
    finally:
        for conn in slow:
            conn.close()


def test_stop_closes_the_server_and_fails_what_waits(wallet, validators, other_wallet):
    served = Endpoint(wallet, validators)
    served.training.clear()
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(served.post, other_wallet, challenge(wallet.hotkey.ss58_address))
        wait_for(lambda: served.server.queue.held(other_wallet.hotkey.ss58_address) == 1, "the challenge queued")
        served.stop()
        with pytest.raises(requests.ConnectionError):
            asked.result()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{served.url}/healthz", timeout=5)
    assert not any(t.name in ("challenge-http", "challenge-data") for t in threading.enumerate())


# --- /healthz -----------------------------------------------------------------------------------
def test_healthz_follows_training_progress(wallet, validators):
    now = [0.0]
    health = TrainingHealth(grace_s=600.0, min_stall_s=60.0, clock=lambda: now[0])
    served = Endpoint(wallet, validators, health=health)

    def healthz() -> tuple[int, dict]:
        response = requests.get(f"{served.url}/healthz", timeout=10)
        return response.status_code, response.json()

    try:
        now[0] = 500.0  # still joining, loading state
        code, report = healthz()
        assert code == 200 and report["status"] == "starting"
        now[0] = 601.0
        code, report = healthz()
        assert code == 503 and "no training step 601s after start" in report["reason"]
        for _ in range(20):  # steps every 10 s
            health.step_done()
            now[0] += 10.0
        code, report = healthz()
        assert code == 200 and report["status"] == "ok" and report["steps"] == 20
        now[0] += 60.0  # a long step (an averaging round) is within max(60 s, 10 x 10 s)
        assert healthz()[0] == 200
        now[0] += 31.0  # 101 s: past 10x the usual step
        code, report = healthz()
        assert code == 503 and report["status"] == "stalled" and "no training step for 101s" in report["reason"]
        health.step_done()
        assert healthz()[0] == 200
    finally:
        served.stop()
