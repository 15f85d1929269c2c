"""Gradient spot checks on the tiny GPT-2, claimed-samples verdicts, and hivemind progress records from a real DHT."""

from __future__ import annotations

import copy
import itertools
import time

import pytest
import torch

from hivetrain.data import iter_blocks, load_texts
from hivetrain.models import build_model
from hivetrain.tokenizer import load_tokenizer
from hivetrain.validator.checks import (
    SPOT_CHECK_THRESHOLD,
    PeerProgress,
    ProgressLedger,
    _project,
    baseline_projection,
    check_claimed_samples,
    cosine,
    fetch_progress,
    judge_spot_check,
    progress_key,
    projected_gradient,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared, oversubscribed CPU, OpenMP threads waiting on each other cost 50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batches():
    """(2, 32) batches of real text: 0 the challenge, 1 another miner's, 2-5 training data, 6-7 the baseline's."""
    blocks = iter_blocks(load_texts(), load_tokenizer(), 32)
    return [torch.stack(list(itertools.islice(blocks, 2))) for _ in range(8)]  # (B, T) each


@pytest.fixture(scope="module")
def models(batches):
    """The tiny model at steps 0, 5 and 6 of AdamW training (miner settings, lr 6e-4)."""
    torch.manual_seed(0)
    model = build_model("tiny", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    snapshots = {0: copy.deepcopy(model)}
    for step in range(1, 7):
        batch = batches[2 + step % 4]
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        if step in (5, 6):
            snapshots[step] = copy.deepcopy(model)
    return snapshots


def test_projection_is_deterministic_and_leaves_the_model_alone(models, batches):
    model = models[5]
    model.train()
    first = projected_gradient(model, batches[0], seed=7)
    assert first.shape == (64,) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, projected_gradient(model, batches[0], seed=7))
    assert cosine(first, projected_gradient(model, batches[0], seed=8)) < 0.9  # the seed picks the matrix
    assert model.training and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        projected_gradient(model, batches[0].float(), seed=7)
    with pytest.raises(ValueError):
        projected_gradient(model, batches[0], seed=7, dim=60)


def test_projection_is_linear_and_preserves_geometry():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(200_000, generator=generator), torch.randn(200_000, generator=generator)
    pa, pb = _project(a, 3, 256), _project(b, 3, 256)
    assert torch.allclose(_project(a + 2 * b, 3, 256), pa + 2 * pb, rtol=1e-4, atol=1e-2)
    assert pa.norm() / a.norm() == pytest.approx(1.0, abs=0.15)  # Johnson-Lindenstrauss scale
    assert abs(cosine(pa, pb)) < 0.25  # unrelated vectors stay unrelated
    assert cosine(pa, _project(a + 0.1 * b, 3, 256)) > 0.98  # close vectors stay close


def test_honest_recompute_passes(models, batches):
    expected = projected_gradient(models[6], batches[0], seed=1)
    # another process's copy of the model (thread counts are measured in bench/spot_check_threshold.py:
    # two OpenMP threads on an oversubscribed CI box cost 50x)
    answer = projected_gradient(copy.deepcopy(models[6]), batches[0].clone(), seed=1)
    result = judge_spot_check(expected, answer)
    assert result.passed and result.cosine > 0.999, result
    bf16 = projected_gradient(models[6], batches[0], seed=1, autocast_dtype=torch.bfloat16)
    assert judge_spot_check(expected, bf16).passed


def test_one_step_lag_passes_but_several_steps_fail(models, batches):
    expected = projected_gradient(models[6], batches[0], seed=2)
    one_behind = judge_spot_check(expected, projected_gradient(models[5], batches[0], seed=2))
    assert one_behind.passed, one_behind
    stale = judge_spot_check(expected, projected_gradient(models[0], batches[0], seed=2))
    assert not stale.passed and "below threshold" in stale.reason, stale


def test_baseline_separates_the_right_batch_from_any_batch(models, batches):
    model = models[6]
    baseline = baseline_projection(model, batches[6:8], seed=5)
    expected = projected_gradient(model, batches[0], seed=5)
    wrong_batch = projected_gradient(model, batches[1], seed=5)
    centered = judge_spot_check(expected, wrong_batch, baseline=baseline)
    assert not centered.passed and "below threshold" in centered.reason, centered
    honest = projected_gradient(model, batches[0], seed=5, autocast_dtype=torch.bfloat16)
    assert judge_spot_check(expected, honest, baseline=baseline).passed
    with pytest.raises(ValueError):
        baseline_projection(model, [], seed=5)


def test_noise_fails(models, batches):
    expected = projected_gradient(models[6], batches[0], seed=3)
    for i in range(5):
        noise = torch.randn(64, generator=torch.Generator().manual_seed(i)) * expected.norm() / 8
        assert not judge_spot_check(expected, noise).passed


def test_copy_of_another_batchs_answer_fails(models, batches):
    model = models[6]
    expected = projected_gradient(model, batches[0], seed=4)
    their_answer = projected_gradient(model, batches[1], seed=4)  # another miner, another batch, same seed
    result = judge_spot_check(expected, their_answer.clone(), other_answers={"miner-b": their_answer})
    assert not result.passed and "copies miner-b" in result.reason, result
    # an honest answer is not mistaken for a copy
    assert judge_spot_check(expected, expected.clone(), other_answers={"miner-b": their_answer}).passed
    assert not judge_spot_check(expected, their_answer * 1.0001, other_answers=[their_answer]).passed


def test_malformed_answers_fail():
    expected = torch.ones(64)
    for answer in (torch.ones(32), torch.ones(64, 1), "0.5", None, torch.full((64,), float("nan")), torch.zeros(64)):
        result = judge_spot_check(expected, answer)
        assert result.verdict == "fail" and result.reason, answer
    assert judge_spot_check(expected, torch.ones(64) * 3).passed
    assert 0.9 < SPOT_CHECK_THRESHOLD < 1.0


@pytest.mark.parametrize(
    "claimed, dht, elapsed, verdict, verified, why",
    [
        (1000, 1000, 100, "pass", 1000, "DHT shows"),
        (1080, 1000, 100, "pass", 1000, "DHT shows"),  # within 10 % tolerance: credit what the DHT shows
        (900, 1000, 100, "pass", 900, "DHT shows"),
        (1200, 1000, 100, "fail", 0, "progress records show 1000"),
        (500, None, 100, "fail", 0, "no progress records"),
        (0, None, 100, "pass", 0, "no samples"),
        (5000, 5000, 100, "fail", 0, "ceiling"),  # 50 samples/s claimed, 20/s is the bound
        (2200, 2200, 100, "pass", 2200, "DHT shows"),  # 22/s: inside the 10 % tolerance
    ],
)
def test_claimed_samples_verdicts(claimed, dht, elapsed, verdict, verified, why):
    result = check_claimed_samples(claimed, dht, elapsed, max_samples_per_s=20.0, tolerance=0.1)
    assert (result.verdict, result.verified_samples) == (verdict, verified) and why in result.reason, result


def test_claimed_samples_rejects_bad_arguments():
    with pytest.raises(ValueError):
        check_claimed_samples(-1, 0, 10, 1.0, 0.1)
    with pytest.raises(ValueError):
        check_claimed_samples(1, 0, 10, 0.0, 0.1)


def test_progress_ledger_sums_the_best_of_each_epoch():
    def record(epoch: int, samples: int) -> PeerProgress:
        return PeerProgress(peer_id="QmA", epoch=epoch, samples_accumulated=samples, samples_per_second=1.0, time=0.0, client_mode=False)

    ledger = ProgressLedger()
    for epoch, samples in [(0, 32), (0, 96), (1, 16), (0, 64), (1, 48)]:
        ledger.observe({"QmA": record(epoch, samples)})
    assert ledger.samples("QmA") == 96 + 48 and ledger.samples("QmB") is None


def test_fetch_progress_reads_a_real_progress_tracker():
    hivemind = pytest.importorskip("hivemind")
    from hivemind.optim.progress_tracker import ProgressTracker

    run_id = "checks_test"
    miner_dht = validator_dht = tracker = None
    try:
        miner_dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        validator_dht = hivemind.DHT(start=True, client_mode=True, initial_peers=[str(a) for a in miner_dht.get_visible_maddrs()])
        assert progress_key(run_id) == "checks_test_progress"
        assert fetch_progress(validator_dht, run_id) == {}
        tracker = ProgressTracker(miner_dht, prefix=run_id, target_batch_size=10_000, min_refresh_period=0.1, start=True)
        tracker.report_local_progress(local_epoch=0, samples_accumulated=96)
        progress = _wait_for(lambda: fetch_progress(validator_dht, run_id), lambda p: p and next(iter(p.values())).samples_accumulated == 96)
        (peer_id, record), = progress.items()
        assert peer_id == record.peer_id == miner_dht.peer_id.to_base58()
        assert (record.epoch, record.client_mode) == (0, False) and record.time > 0
        tracker.report_local_progress(local_epoch=0, samples_accumulated=160)
        _wait_for(lambda: fetch_progress(validator_dht, run_id), lambda p: p and p[peer_id].samples_accumulated == 160)
    finally:
        if tracker is not None:
            tracker.shutdown(timeout=5)
        for dht in (validator_dht, miner_dht):
            if dht is not None:
                dht.shutdown()


def _wait_for(fetch, ready, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ready(value) or time.monotonic() > deadline:
            assert ready(value), f"timed out; last value {value}"
            return value
        time.sleep(0.2)
