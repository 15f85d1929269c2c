"""The validator asking a miner over real HTTP: the typed answer is accepted, every bad one is refused and named.

The miner here is hostile: a real HTTP server signing whatever payload the test gives it, or
the miner's own endpoint (``hivetrain.miner.challenge``) with an honest training loop.
"""

from __future__ import annotations

import threading

import pytest
import redis
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from hivetrain.chain import LocalChain
from hivetrain.identity import Domain, Verifier, sign
from hivetrain.miner.challenge import ChallengeLimits, ChallengeServer
from hivetrain.miner.validators import ValidatorList
from hivetrain.protocol.records import PeerRecord
from hivetrain.protocol.spotcheck import MAX_DIM, Challenge, SpotCheckAnswer
from hivetrain.validator.spot import AnswerRejected, ask_miner

#: The run both sides are in (the local chain).
DOMAIN = Domain("spot")


class HostileMiner:
    """A real HTTP endpoint that answers ``POST /challenge`` with ``respond(challenge envelope)``."""

    def __init__(self):
        self.respond = lambda envelope: {}
        app = Flask("hostile-miner")
        app.post("/challenge")(lambda: jsonify(self.respond(request.get_json())))
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)


@pytest.fixture
def hostile():
    miner = HostileMiner()
    yield miner
    miner.stop()


def _peer(hotkey: str, url: str) -> PeerRecord:
    return PeerRecord(peer_id="QmMiner", role="miner", hotkey=hotkey, challenge_url=url, multiaddrs=[], started_at=0.0)


def _ask(validator_wallet, miner_wallet, url: str, dim: int = 8, domain: Domain = DOMAIN) -> SpotCheckAnswer:
    asked = Challenge(
        miner_hotkey=miner_wallet.hotkey.ss58_address, block_index=3, batch_size=1, seed=5, dim=dim, epoch=2
    )
    return ask_miner(
        validator_wallet, Verifier.in_memory(domain), _peer(miner_wallet.hotkey.ss58_address, url), asked, 5.0
    )


def _answer(envelope: dict, **overrides) -> dict:
    payload = {
        "challenge_nonce": envelope["nonce"],
        "validator": envelope["hotkey"],
        "epoch": 2,
        "block_index": 3,
        "projection": [0.25] * 8,
    }
    return {**payload, **overrides}


def test_the_miners_own_endpoint_answers_with_the_typed_answer(wallet, other_wallet, redis_url):
    chain = LocalChain(redis.Redis.from_url(redis_url), "spot")
    chain.register(other_wallet.hotkey.ss58_address, "", "validator")  # the miner answers validators only
    validators = ValidatorList(chain).start()
    server = ChallengeServer(
        wallet, "127.0.0.1", 0, validators, ChallengeLimits(rate=10.0), domain=DOMAIN, window_s=60.0
    ).start()
    stop = threading.Event()

    def training_loop():  # Miner.train answers between steps; here: an epoch-2 model whose projection is all 0.5
        while not stop.wait(0.02):
            server.answer_pending(lambda challenge, batch: (2, [0.5] * challenge.dim))

    loop = threading.Thread(target=training_loop, daemon=True)
    loop.start()
    try:
        answer = _ask(other_wallet, wallet, f"http://127.0.0.1:{server.port}", dim=16)
    finally:
        stop.set()
        loop.join(timeout=5)
        server.stop()
        validators.stop()
    assert (answer.epoch, answer.block_index, answer.projection) == (2, 3, [0.5] * 16)
    assert answer.validator == other_wallet.hotkey.ss58_address


def test_a_well_formed_answer_from_the_right_miner_is_accepted(hostile, wallet, other_wallet):
    hostile.respond = lambda envelope: sign(wallet, DOMAIN, _answer(envelope))
    answer = _ask(other_wallet, wallet, hostile.url)
    assert answer.projection == [0.25] * 8 and answer.epoch == 2


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"projection": "0.5, 0.5"}, "malformed answer: projection"),
        ({"projection": [0.5] * (MAX_DIM + 1)}, "malformed answer: projection"),
        ({"projection": [True] * 8}, "malformed answer: projection.0"),
        ({"epoch": -1}, "malformed answer: epoch"),
        ({"epoch": "10"}, "malformed answer: epoch"),
        ({"weight": 1e30}, "malformed answer: an unexpected field"),  # a name the miner chose is not repeated
        ({"challenge_nonce": "0" * 32}, "for another challenge"),
        ({"validator": "5Fsomeoneelse"}, "for another challenge"),
    ],
)
def test_a_bad_answer_is_refused_and_named(hostile, wallet, other_wallet, overrides, named):
    hostile.respond = lambda envelope: sign(wallet, DOMAIN, _answer(envelope, **overrides))
    with pytest.raises(AnswerRejected, match=named):
        _ask(other_wallet, wallet, hostile.url)


def test_an_answer_missing_a_field_is_refused(hostile, wallet, other_wallet):
    def respond(envelope):
        payload = _answer(envelope)
        del payload["epoch"]
        return sign(wallet, DOMAIN, payload)

    hostile.respond = respond
    with pytest.raises(AnswerRejected, match="malformed answer: epoch: Field required"):
        _ask(other_wallet, wallet, hostile.url)


def test_an_answer_signed_by_another_hotkey_or_unsigned_is_refused(hostile, wallet, other_wallet):
    hostile.respond = lambda envelope: sign(
        other_wallet, DOMAIN, _answer(envelope)
    )  # not the challenged miner's hotkey
    with pytest.raises(AnswerRejected, match="another hotkey"):
        _ask(other_wallet, wallet, hostile.url)
    hostile.respond = lambda envelope: _answer(envelope)  # no envelope at all
    with pytest.raises(AnswerRejected, match="not authentic"):
        _ask(other_wallet, wallet, hostile.url)


def test_an_answer_signed_for_another_run_or_subnet_is_refused(hostile, wallet, other_wallet):
    """A miner of two subnets (or runs) answers with what it signed elsewhere: not authentic here."""
    for elsewhere in (Domain("spot", 1), Domain("other-run")):
        hostile.respond = lambda envelope: sign(wallet, elsewhere, _answer(envelope))
        with pytest.raises(AnswerRejected, match="not authentic: InvalidSignature"):
            _ask(other_wallet, wallet, hostile.url)
    in_its_own_run = _ask(
        other_wallet, wallet, hostile.url, domain=Domain("other-run")
    )  # what it signed there holds there
    assert in_its_own_run.projection == [0.25] * 8


def test_the_miners_own_endpoint_refuses_a_validator_of_another_subnet(wallet, other_wallet, redis_url):
    chain = LocalChain(redis.Redis.from_url(redis_url), "spot")
    chain.register(other_wallet.hotkey.ss58_address, "", "validator")
    validators = ValidatorList(chain).start()
    server = ChallengeServer(
        wallet, "127.0.0.1", 0, validators, ChallengeLimits(rate=10.0), domain=Domain("spot", 1), window_s=60.0
    ).start()
    try:
        with pytest.raises(AnswerRejected, match="401"):
            _ask(other_wallet, wallet, f"http://127.0.0.1:{server.port}", domain=Domain("spot", 2))
        assert server.queue.held(other_wallet.hotkey.ss58_address) == 0
    finally:
        server.stop()
        validators.stop()


def test_a_validator_on_a_public_subnet_sends_nothing_to_loopback_or_where_the_miner_did_not_register_from(
    hostile, wallet, other_wallet
):
    asked_at = []
    hostile.respond = lambda envelope: asked_at.append(envelope) or sign(wallet, DOMAIN, _answer(envelope))
    asked = Challenge(miner_hotkey=wallet.hotkey.ss58_address, block_index=3, batch_size=1, seed=5, dim=8, epoch=2)
    miner = _peer(wallet.hotkey.ss58_address, hostile.url)
    for registered_from, named in [("", "loopback"), ("127.0.0.1", "loopback"), ("10.0.0.9", "loopback")]:
        with pytest.raises(AnswerRejected, match=named):
            ask_miner(other_wallet, Verifier.in_memory(DOMAIN), miner.seen_from(registered_from), asked, 5.0, False)
    assert asked_at == []  # refused before a byte was sent
    # a swarm on one machine says so, and then its loopback miners are asked
    answered = ask_miner(other_wallet, Verifier.in_memory(DOMAIN), miner, asked, 5.0, True)
    assert answered.projection == [0.25] * 8 and len(asked_at) == 1


def test_an_unreachable_miner_is_named(wallet, other_wallet):
    with pytest.raises(AnswerRejected, match="no answer: ConnectionRefusedError"):
        _ask(other_wallet, wallet, "http://127.0.0.1:9")
