"""The gradient spot check on the tiny GPT-2: the projection both sides compute, the validator's verdict, the wire
models."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from pydantic import ValidationError

from hivetrain.data import iter_blocks, load_texts
from hivetrain.models import build_model
from hivetrain.protocol.projection import _project, baseline_projection, cosine, projected_gradient
from hivetrain.protocol.spotcheck import SPOT_CHECK_THRESHOLD
from hivetrain.tokenizer import load_tokenizer
from hivetrain.validator.verdicts import judge_spot_check


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


def test_validator_settings_never_ask_what_a_miner_must_refuse():
    from hivetrain.protocol.spotcheck import MAX_BATCH, MAX_DIM
    from hivetrain.settings import ValidatorSettings

    assert ValidatorSettings().spot_check_threshold == SPOT_CHECK_THRESHOLD
    for bad in ({"spot_check_batch": MAX_BATCH + 1}, {"spot_check_dim": MAX_DIM + 8}, {"spot_check_dim": 60}):
        with pytest.raises(ValidationError):
            ValidatorSettings(**bad)


def test_a_nan_cosine_is_a_failed_check_never_a_pass():
    # a validator whose model went NaN computes a NaN projection: NaN < threshold is False in Python
    expected = torch.full((64,), float("nan"))
    result = judge_spot_check(expected, torch.ones(64))
    assert not result.passed and "not finite" in result.reason
    assert not judge_spot_check(torch.ones(64), torch.ones(64), baseline=torch.full((64,), float("inf"))).passed
