"""The validator's loop (``hivetrain.validator.service``) against real parts, attacked.

Each validator here is set up the way ``python -m hivetrain.validator`` sets it up: a real Redis,
the local chain in it, and a real hivemind DHT with one peer whose ProgressTracker reports epoch
0 (so the swarm's progress supports epochs up to 2). Miners are real HTTP endpoints on 127.0.0.1:
an honest one computing the true projection, one dripping its answer a byte at a time, one
answering at epoch 10^9, one at an epoch the validator cannot reach. Redis is flushed, stopped
and started again under the running loop.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import threading
import time

import pytest
import redis
import torch
from bound_peers import KeyWallet, bound
from post_server import PostServer

from hivetrain.chain import LocalChain
from hivetrain.data import BlockStream, shard_for
from hivetrain.hivemind_compat.progress import identity_signing_key
from hivetrain.identity import Domain, load_or_create_wallet, sign
from hivetrain.models import build_model
from hivetrain.protocol.projection import projected_gradient
from hivetrain.protocol.records import Keys, PeerRecord
from hivetrain.protocol.spotcheck import Challenge
from hivetrain.protocol.training import param_groups, shared_optimizer
from hivetrain.settings import ValidatorSettings
from hivetrain.store import Registry, connect_redis, shard_salt
from hivetrain.swarm import procs
from hivetrain.swarm.redis_server import start_redis
from hivetrain.validator.service import Validator
from hivetrain.validator.verdicts import SpotCheckResult

RUN_ID = "vloop"
DOMAIN = Domain(RUN_ID)  # what the validator's settings derive on the local chain


def wait_until(predicate, what: str, timeout: float = 90.0):
    """Poll ``predicate`` (Redis errors count as not yet) until it holds; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """A DHT peer whose progress record says epoch 0; yields the addresses validators join through."""
    hivemind = pytest.importorskip("hivemind")
    from hivemind.optim.progress_tracker import ProgressTracker

    identity = tmp_path_factory.mktemp("swarm") / "identity.key"
    dht = hivemind.DHT(start=True, identity_path=str(identity), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    key = identity_signing_key(identity.read_bytes())  # signed as a miner signs: the record counts for its peer
    tracker = ProgressTracker(
        dht, prefix=RUN_ID, target_batch_size=10_000, min_refresh_period=0.1, start=True, private_key=key
    )
    try:
        tracker.report_local_progress(local_epoch=0, samples_accumulated=8)  # (0 samples are not published)
        yield [str(addr) for addr in dht.get_visible_maddrs()]
    finally:
        tracker.shutdown(timeout=5)
        dht.shutdown()


@pytest.fixture
def make_validator(swarm, tmp_path):
    made = []

    def make(redis_url: str, wait_progress: bool = True, **overrides) -> Validator:
        # 20 s: answers computed on a loaded CI machine (2 s was short)
        options = {"spot_check_timeout_s": 20.0, "spot_check_workers": 4, **overrides}
        settings = ValidatorSettings(
            redis_url=redis_url,
            run_id=RUN_ID,
            preset="tiny",
            wallet_dir=str(tmp_path / "wallets"),
            initial_peers=swarm,
            api_host="127.0.0.1",
            api_port=9,
            eval_blocks=2,
            torch_threads=1,
            sync_every_s=3600.0,
            spot_check_tries=2,
            spot_check_private_urls=True,  # every miner here serves on loopback
            **options,
        )
        validator = Validator(settings)
        made.append(validator)
        if wait_progress:
            wait_until(lambda: validator.poller.plausible_epoch() == 2, "the swarm's progress record")
        return validator

    yield make
    for validator in made:
        validator.stop.set()
        validator.shutdown()


class MinerEndpoint(PostServer):
    """A real ``POST /challenge`` endpoint answering ``answer(challenge) -> (epoch, projection)`` signed by
    ``wallet``; with ``drip_s`` it sends its answer one byte every ``drip_s`` seconds instead."""

    def __init__(self, wallet, answer, drip_s: float = 0.0):
        self.wallet, self.answer, self.drip_s = wallet, answer, drip_s
        super().__init__()

    def respond(self, handler, request: bytes) -> None:
        envelope = json.loads(request)
        challenge = Challenge.model_validate(envelope["payload"])
        epoch, projection = self.answer(challenge)
        body = json.dumps(
            sign(
                self.wallet,
                DOMAIN,
                {
                    "challenge_nonce": envelope["nonce"],
                    "validator": envelope["hotkey"],
                    "epoch": epoch,
                    "block_index": challenge.block_index,
                    "projection": projection,
                },
            )
        ).encode()
        response = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        chunks = [response] if not self.drip_s else [bytes([b]) for b in response]
        for chunk in chunks:
            if (self.drip_s and self.stopping.wait(self.drip_s)) or self.stopping.is_set():
                return
            if not self.write(handler, chunk):
                return
        self.finished.set()


@pytest.fixture
def endpoints(start_server):
    """``endpoints(wallet, answer, drip_s=0.0)``: a MinerEndpoint, stopped after the test."""
    return functools.partial(start_server, MinerEndpoint)


def _register(client, wallet, name: str, url: str = "") -> str:
    """Register the test peer called ``name`` (peer id ``bound_peers.peer_id(name)``) for ``wallet``; returns its
    hotkey."""
    record = PeerRecord(
        peer_id=name,
        role="miner",
        hotkey=wallet.hotkey.ss58_address,
        challenge_url=url,
        multiaddrs=[],
        started_at=time.time(),
    )
    Registry(client, Keys(RUN_ID), DOMAIN).register(bound(record, wallet.hotkey.ss58_address, DOMAIN), signer=wallet)
    return wallet.hotkey.ss58_address


def _honest(validator: Validator, hotkey: str, epoch: int | None = None, model=None):
    """What an honest miner at the validator's epoch answers: the projection of its own blocks at the shared parameters
    (or, given, at ``model``'s, saying ``epoch``).

    Its shard is the miner's way: its hotkey and the salt in Redis (which the validator created: no bootstrap here)."""
    salt = shard_salt(connect_redis(validator.settings.redis_url), validator.keys, create=False)
    s, model = validator.settings, copy.deepcopy(validator.sync.model if model is None else model)
    epoch = validator.sync.epoch if epoch is None else epoch
    stream = BlockStream(
        s.dataset,
        s.dataset_split,
        s.text_key,
        validator.checker.shards.tokenizer,
        validator.block_size,
        num_shards=s.num_shards,
        shard=shard_for(hotkey, salt, s.num_shards),
        seed=s.seed,
    )

    def answer(challenge: Challenge):
        batch = stream.get_batch(challenge.block_index, challenge.batch_size)  # (B, T)
        return epoch, projected_gradient(model, batch, challenge.seed, challenge.dim).tolist()

    return answer


def test_one_round_checks_every_miner_at_once_and_nobody_evades(
    redis_url, make_validator, endpoints, wallet, other_wallet, tmp_path
):
    validator = make_validator(redis_url, spot_check_timeout_s=10.0)
    client = connect_redis(redis_url)
    ahead_wallet, behind_wallet = (
        load_or_create_wallet(str(tmp_path / "miners"), name) for name in ("ahead", "unreachable")
    )
    noise = lambda epoch: lambda challenge: (epoch, [0.5] * challenge.dim)  # noqa: E731
    honest = endpoints(wallet, _honest(validator, wallet.hotkey.ss58_address))
    dripping = endpoints(other_wallet, noise(0), drip_s=0.2)  # its answer would take minutes
    ahead = endpoints(ahead_wallet, noise(10**9))  # forces a sync, then "cannot judge", forever (before)
    unreachable = endpoints(behind_wallet, noise(2))  # plausible, but no peer serves that epoch's state
    miners = {
        "honest": _register(client, wallet, "QmHonest", honest.url),
        "dripping": _register(client, other_wallet, "QmDrip", dripping.url),
        "ahead": _register(client, ahead_wallet, "QmAhead", ahead.url),
        "unreachable": _register(client, behind_wallet, "QmBehind", unreachable.url),
    }

    validator.check_miners()
    checks = {name: validator.spot_checks.get(hotkey, []) for name, hotkey in miners.items()}
    assert not dripping.finished.is_set() and dripping.sent > 0  # judged while the miner was still dripping
    assert [c.result.verdict for c in checks["honest"]] == ["pass"], checks["honest"][0].explain()
    assert [c.result.verdict for c in checks["dripping"]] == ["fail"]
    assert "no complete answer within the deadline of 10s" in checks["dripping"][0].result.reason
    assert [c.result.verdict for c in checks["ahead"]] == ["fail"]
    assert "epoch 1000000000, beyond the swarm's progress (at most 2)" in checks["ahead"][0].result.reason
    assert checks["unreachable"] == []  # the validator may be the one behind: not judged yet

    validator.check_miners()
    unreachable_checks = validator.spot_checks[miners["unreachable"]]
    assert [c.result.verdict for c in unreachable_checks] == ["fail"]
    assert "not judged 2 times in a row" in unreachable_checks[0].result.reason
    assert [c.result.verdict for c in validator.spot_checks[miners["honest"]]] == ["pass", "pass"]


def test_weights_keep_their_interval_while_a_round_is_judged(
    redis_url, make_validator, endpoints, wallet, other_wallet
):
    """Weights that come due during a check round are set during it, once, not after every answer is judged; the
    answers judged after them count in the next window."""
    validator = make_validator(redis_url)
    client = connect_redis(redis_url)
    hotkeys = [
        _register(client, w, name, endpoints(w, _honest(validator, w.hotkey.ss58_address)).url)
        for w, name in ((wallet, "QmOne"), (other_wallet, "QmTwo"))
    ]
    validator.due = {"weights": time.monotonic() - 1}  # due now, as when a round outlasts the interval
    validator.check_miners()
    assert validator.rounds == 1, "no weights during the round: they waited for every judgement"
    assert validator.due["weights"] > time.monotonic(), "the interval starts again from those weights"
    assert {h: [c.result.verdict for c in validator.spot_checks.get(h, [])] for h in hotkeys} == dict.fromkeys(
        hotkeys, ["pass"]
    )
    first = {h: validator.evidence.get(h, []) for h in hotkeys}
    assert first == dict.fromkeys(hotkeys, []), first  # judged after that window closed: nothing of theirs in it
    validator.score_and_set_weights()
    assert all(validator.evidence[h][-1]["checks"][-1]["verdict"] == "pass" for h in hotkeys)


class Tarpit(PostServer):
    """A challenge endpoint that reads each challenge, notes which miner it was for, and never answers."""

    def __init__(self):
        self.asked: list[str] = []
        super().__init__()

    def respond(self, handler, request: bytes) -> None:
        self.asked.append(json.loads(request)["payload"]["miner_hotkey"])
        self.stopping.wait(60)


def test_a_crowd_of_stalling_miners_costs_one_deadline_a_round_and_is_benched(
    redis_url, make_validator, endpoints, start_server, wallet
):
    # 20 registrations (fresh hotkeys, properly bound) whose endpoint never answers, beside one honest miner
    validator = make_validator(redis_url, spot_check_timeout_s=8.0, spot_check_workers=4)
    client = connect_redis(redis_url)
    tarpit = start_server(Tarpit)
    answer = _honest(validator, wallet.hotkey.ss58_address)
    answer(Challenge(miner_hotkey="x", block_index=0, batch_size=2, seed=1, dim=64, epoch=0))  # its data, read once
    honest = endpoints(wallet, answer)

    def live() -> set[str]:  # every miner registers again before each round, as live miners do (30 s records)
        _register(client, wallet, "QmHonest", honest.url)
        return {_register(client, KeyWallet(1000 + i), f"QmTarpit{i}", tarpit.url) for i in range(20)}

    crowd = live()
    asked_per_round = []
    for _ in range(8):  # 21 miners, 4 a round: every one asked by the 6th round
        before = (len(tarpit.asked), honest.hits)
        live()
        validator.check_miners()
        asked_per_round.append(len(tarpit.asked) - before[0] + honest.hits - before[1])
        if set(tarpit.asked) == crowd and validator.spot_checks.get(wallet.hotkey.ss58_address):
            break
    assert max(asked_per_round) <= 4, f"a round asked {asked_per_round} miners: its cost grows with registrations"
    assert set(tarpit.asked) == crowd and sorted(collections.Counter(tarpit.asked).values()) == [1] * 20, (
        "each stalling miner is asked once, then benched"
    )
    for hotkey in crowd:  # named: a failed check saying why, and left out for a while
        assert [c.result.verdict for c in validator.spot_checks[hotkey]] == ["fail"]
        assert "deadline" in validator.spot_checks[hotkey][0].result.reason
    assert set(validator.schedule.benched) == crowd

    # the next round asks the honest miner alone, and it passes again: the crowd costs it nothing more
    hits, asked, checked = honest.hits, len(tarpit.asked), len(validator.spot_checks[wallet.hotkey.ss58_address])
    live()
    validator.check_miners()
    assert (honest.hits - hits, len(tarpit.asked) - asked) == (1, 0)
    checks = validator.spot_checks[wallet.hotkey.ss58_address]
    assert len(checks) == checked + 1 and {c.result.verdict for c in checks} == {"pass"}, [c.explain() for c in checks]


@pytest.fixture
def serve_state(swarm):
    """``serve(mode, epoch, seed)``: a peer sharing the model built with ``seed`` as the swarm's state at ``epoch``,
    the way a miner's state averager shares it (the higher the epoch, the higher its priority); returns the model."""
    import hivemind
    from hivemind.optim.state_averager import TrainingStateAverager

    started = []

    def serve(mode: str, epoch: int, seed: int):
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=swarm)
        model = build_model("tiny", seed=seed)
        averager = TrainingStateAverager(
            dht=dht,
            prefix=f"{RUN_ID}_state_averager",
            optimizer=shared_optimizer(mode),
            params=param_groups(model, 0.0),
            start=True,
        )
        averager.local_epoch, averager.state_sharing_priority = epoch, float(epoch)
        started.append((dht, averager))
        return model

    yield serve
    for dht, averager in started:
        averager.shutdown()
        dht.shutdown()


def _synced_to(validator: Validator, epoch: int) -> None:
    wait_until(
        lambda: validator.sync.sync() and validator.sync.epoch == epoch, f"the validator's sync to epoch {epoch}"
    )


def _near(model: torch.nn.Module, scale: float = 0.27, seed: int = 5) -> torch.nn.Module:
    """``model`` with each parameter tensor moved by Gaussian noise of ``scale`` times its mean magnitude: its answers
    score 0.69 to 0.88 (centered) against ``model``'s, as an honest answer some steps away does at a high lr."""
    near, generator = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in near.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale * param.abs().mean())
    return near


def _verdicts(validator: Validator, hotkeys: dict[str, str]) -> tuple[dict, dict]:
    checks = {name: validator.spot_checks.get(hotkey, []) for name, hotkey in hotkeys.items()}
    verdicts = {name: [c.result.verdict for c in found] for name, found in checks.items()}
    return verdicts, {name: [c.explain() for c in found] for name, found in checks.items()}


@pytest.mark.parametrize("mode", ["hivemind", "diloco"])
def test_an_answer_is_judged_at_the_parameters_of_its_own_epoch(
    redis_url, make_validator, endpoints, serve_state, tmp_path, mode
):
    """The validator holds epoch 1 (model A) and then 2 (model B): an answer at 1 is judged at A, one at 2 at B.

    A second validator that went from 0 straight to 2 holds no parameters of epoch 1. In gradient mode it judges an
    answer at 1 at B, where only the floor fails: a pass passes, an answer from an unrelated model (A) never passes,
    and one near B but under the bar (as an honest answer one step off at the tiny preset's lr) is not judged, a
    failure once that happened ``spot_check_tries`` times in a row. In DiLoCo mode (one epoch, one outer step) none is
    judged across epochs. (No answer here is sure to fall below the floor; tests/integration/test_validator.py's
    lazy cheater answers noise and must fail, at its own epoch or one off.)"""
    validator = make_validator(redis_url, mode=mode)
    client = connect_redis(redis_url)
    model_a = serve_state(mode, 1, seed=11)
    _synced_to(validator, 1)
    model_b = serve_state(mode, 2, seed=12)
    serve_state(mode, 2, seed=12)  # a second voter: a state is adopted when two agree (A, a lone server, was taken)
    _synced_to(validator, 2)
    names = ("current", "previous", "mixed", "near")
    wallets = {name: load_or_create_wallet(str(tmp_path / "miners"), name) for name in names}
    hotkeys = {name: w.hotkey.ss58_address for name, w in wallets.items()}
    answers = {
        "current": _honest(validator, hotkeys["current"], 2, model_b),
        "previous": _honest(validator, hotkeys["previous"], 1, model_a),
        "mixed": _honest(validator, hotkeys["mixed"], 1, model_b),  # says epoch 1, computed at epoch 2's
        "near": _honest(validator, hotkeys["near"], 1, _near(model_b)),  # says epoch 1, computed near epoch 2's
    }
    for name, w in wallets.items():
        _register(client, w, f"Qm{name}", endpoints(w, answers[name]).url)

    validator.check_miners()
    verdicts, why = _verdicts(validator, hotkeys)
    assert verdicts == {"current": ["pass"], "previous": ["pass"], "mixed": ["fail"], "near": ["fail"]}, why
    assert validator.sync.epoch == 2 and all(
        torch.equal(p, q) for p, q in zip(validator.sync.model.parameters(), model_b.parameters())
    )

    straight = make_validator(redis_url, mode=mode)  # declared states: 1 and 2 (twice); the download takes 2's
    _synced_to(straight, 2)
    straight.check_miners()
    verdicts, why = _verdicts(straight, hotkeys)
    if mode == "hivemind":
        # A's answer at B: an unrelated model's gradient scores under the bar, below the floor or not (a CI run saw
        # 0.5 or more for one batch): a failure named for the floor, or not judged; never a pass
        previous = verdicts.pop("previous")
        assert verdicts == {"current": ["pass"], "mixed": ["pass"], "near": []}, why
        assert previous == [] or (previous == ["fail"] and "below 0.5: not a gradient" in why["previous"][0]), why
    else:
        assert verdicts == {"current": ["pass"], "previous": [], "mixed": [], "near": []}, why
    straight.check_miners()
    near = straight.spot_checks[hotkeys["near"]]
    assert [c.result.verdict for c in near] == ["fail"], why
    assert "not judged 2 times in a row" in near[0].result.reason, near[0].result.reason
    assert "answered at epoch 1, the validator holds the parameters of 2" in near[0].result.reason


def test_the_loop_rides_out_a_flush_and_a_redis_outage(make_validator, tmp_path):
    port = procs.free_port()
    service, url = start_redis(tmp_path / "redis", port=port, persist=False)
    try:
        validator = make_validator(url, check_every_s=0.5, weights_every_s=1.0)
        loop = threading.Thread(target=validator.run, daemon=True)
        loop.start()
        client, chain, keys = connect_redis(url), LocalChain(connect_redis(url), RUN_ID), Keys(RUN_ID)

        def weights_set_since(when: float) -> bool:
            record = chain.weights_record(validator.hotkey)
            return record is not None and record.time > when

        wait_until(lambda: weights_set_since(0.0), "the first weights")
        flushed_at = time.time()
        client.flushall()  # the registration, the heartbeat and the saved state are gone
        wait_until(
            lambda: weights_set_since(flushed_at) and chain.uid_for(validator.hotkey) is not None,
            "weights after the flush (registered again)",
        )

        service.stop(timeout=5)  # Redis goes away under the running loop
        wait_until(lambda: validator.failures["weights"] >= 2 and validator.failures["heartbeat"] >= 2, "failed steps")
        assert loop.is_alive()
        service, _ = start_redis(tmp_path / "redis", port=port, persist=False)  # back, and empty
        back_at = time.time()
        wait_until(
            lambda: weights_set_since(back_at) and client.exists(keys.validator_alive(validator.hotkey)),
            "weights and a heartbeat after Redis came back",
        )
        wait_until(lambda: not validator.failures, "every step working again")
        assert loop.is_alive()
        validator.stop.set()
        loop.join(timeout=30)
        assert not loop.is_alive()
    finally:
        service.stop(timeout=5)


def test_a_restarted_validator_resumes_its_scores_and_checks(redis_url, make_validator, wallet):
    client = connect_redis(redis_url)
    miner = _register(client, wallet, "QmHonest")  # live, so its score is kept
    first = make_validator(redis_url)
    first.scores = {miner: 0.5}
    first.check_history = {
        miner: collections.deque([SpotCheckResult("pass", "cosine 0.9990 >= 0.95", 0.999)], maxlen=10)
    }
    first.checker.unjudged[miner] = 1
    now = time.time()
    first.caught = {"5Caught": (now + 600, "peer QmX: state: served a state we refused"), "5Old": (now - 1, "over")}
    assert first.credit.pay(miner, verified=100, received=0) == 0  # claimed, its round not yet settled
    first.score_and_set_weights()  # a window without claims: the EMA decays to 0.35, and is saved
    assert first.scores[miner] == pytest.approx(0.35)
    first.stop.set()
    first.shutdown()

    second = make_validator(redis_url)
    assert second.hotkey == first.hotkey and second.rounds == first.rounds == 1
    assert second.scores == first.scores
    assert list(second.check_history[miner]) == [SpotCheckResult("pass", "cosine 0.9990 >= 0.95", 0.999)]
    assert second.checker.unjudged == {miner: 1}
    assert set(second.caught) == {"5Caught"}  # whom it caught stays caught until its ban ends; the ended one is gone
    assert second.credit.saved() == {miner: (100.0, 0.0)}  # the claimed samples still wait for their receipts
    second.score_and_set_weights()
    assert second.scores[miner] == pytest.approx(0.35 * 0.7)  # the EMA goes on from where it was
    assert second.scores["5Caught"] == 0.0
    assert any(r.startswith("caught by this validator") for r in second.evidence["5Caught"][-1]["reasons"])


def test_with_admission_only_admitted_miners_are_checked_and_weighed(redis_url, make_validator):
    """A registration the bootstrap stored before its hotkey's admission was revoked (or one a Redis writer put
    there) is not a miner the validator checks or pays; nor does the progress of a peer nobody admitted count."""
    client = connect_redis(redis_url)
    admitted, stranger = KeyWallet(31), KeyWallet(32)
    _register(client, admitted, "vadm-admitted")
    _register(client, stranger, "vadm-stranger")
    LocalChain(client, RUN_ID).admit(admitted.hotkey.ss58_address)
    validator = make_validator(redis_url, wait_progress=False, admission="chain")
    assert set(validator.live_miners()) == {admitted.hotkey.ss58_address}
    assert validator.poller.plausible_epoch() is None  # the swarm fixture's peer is not admitted
    opened = make_validator(redis_url, wait_progress=False)  # the local chain's default: open
    assert set(opened.live_miners()) == {admitted.hotkey.ss58_address, stranger.hotkey.ss58_address}


def test_the_state_sync_waits_as_long_as_the_run_allows(redis_url, make_validator):
    # the seed preset's state (about 384 MB) needs about 150 Mbit/s in a third of the default 60 s: slower links
    # raise HIVE_SYNC_TIMEOUT_S, and it must reach the sync (each server's deadline is a third of it)
    validator = make_validator(redis_url, wait_progress=False, sync_timeout_s=240.0)
    assert validator.sync.timeout_s == 240.0
