"""DiLoCo on real hivemind peers: inner steps, one outer Nesterov step on averaged pseudo-gradients, a joiner."""

from __future__ import annotations

import threading
import time

import hivemind
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from hivetrain.hivemind_compat import DiLoCoOptimizer, TrackedOptimizer
from hivetrain.hivemind_compat.diloco import RESYNC_WAIT_S
from hivetrain.protocol.training import OuterSGD, param_groups

pytestmark = pytest.mark.integration

INNER_LR, OUTER_LR, MOMENTUM, BATCH, INNER_STEPS = 0.1, 0.7, 0.9, 4, 5


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 3))  # decays in the inner groups
        self.bias = torch.nn.Parameter(torch.zeros(3))


def _optimizer(
    dht: hivemind.DHT, model: torch.nn.Module, cls: type = DiLoCoOptimizer, averaging_timeout: float = 30.0, **kwargs
) -> DiLoCoOptimizer:
    return cls(
        dht=dht,
        run_id="diloco_test",
        params=param_groups(model, 0.0),
        optimizer=lambda params: OuterSGD(params, lr=OUTER_LR, momentum=MOMENTUM),
        inner_params=param_groups(model, 0.0),
        inner_optimizer=lambda params: torch.optim.SGD(params, lr=INNER_LR),
        inner_steps=INNER_STEPS,
        batch_size_per_step=BATCH,
        matchmaking_time=2.0,
        averaging_timeout=averaging_timeout,
        averager_opts=dict(request_timeout=1.0),
        tracker_opts=dict(
            min_refresh_period=0.2, max_refresh_period=0.5, private_key=RSAPrivateKey()
        ),  # peers in one process would share one progress record
        load_state_timeout=30.0,
        average_opt_statistics=("momentum_buffer",),
        **kwargs,
    )  # no aggregation_rule: the plain weighted mean, whose arithmetic is checked


class Partitioned(DiLoCoOptimizer):
    """A peer whose pseudo-gradient rounds never meet the others' (its averager matches under another prefix)."""

    def _pseudo_gradient_averager(self, **kwargs):
        return super()._pseudo_gradient_averager(**{**kwargs, "prefix": "elsewhere_grad_averager"})


class OtherGroup(DiLoCoOptimizer):
    """A peer whose pseudo-gradient rounds meet only others of its class: matchmaking split the swarm in two groups."""

    def _pseudo_gradient_averager(self, **kwargs):
        return super()._pseudo_gradient_averager(**{**kwargs, "prefix": "other_group_grad_averager"})


@pytest.fixture
def swarm(request):
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peers = [str(a) for a in first.get_visible_maddrs()]
    dhts = [first] + [
        hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=peers)
        for _ in range(getattr(request, "param", 3) - 1)
    ]
    optimizers: list[DiLoCoOptimizer] = []
    yield dhts, optimizers
    for opt in optimizers:
        opt.shutdown()
    for dht in dhts:
        dht.shutdown()


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f}s"
        time.sleep(0.1)


def _train_one_outer_step(opt: DiLoCoOptimizer, model: Toy, grad: torch.Tensor, steps: list[int]) -> None:
    """Inner steps on a constant gradient until the swarm's outer step; ``steps`` gets how many were taken."""
    taken = 0
    while opt.local_epoch == 0 and taken < 200:  # bounded: 200 steps is 40 times what one outer step needs
        model.weight.grad = grad.clone()
        model.bias.grad = torch.zeros(3)
        started, waited = time.perf_counter(), opt.swarm_wait_s
        opt.step()
        # the miner's utilization: only the step of the outer round spends time on the swarm, and less than it took
        on_the_swarm, took = opt.swarm_wait_s - waited, time.perf_counter() - started
        assert (0 < on_the_swarm <= took) if opt.local_epoch else on_the_swarm == 0, (on_the_swarm, took)
        opt.zero_grad()
        taken += 1
        time.sleep(0.1)  # let the progress records of both peers reach the DHT
    steps.append(taken)


def _all_take_one_outer_step(optimizers: list, models: list, grads: list) -> list[int]:
    """Every peer publishes its progress (a zero step), waits to see all the others, then trains on its
    constant gradient in a thread of its own until the swarm's outer step; the inner steps each took."""
    for opt, model in zip(optimizers, models):
        model.weight.grad, model.bias.grad = torch.zeros(2, 3), torch.zeros(3)
        opt.step()
    for opt in optimizers:  # a peer that saw no other would take its outer step alone
        _wait_for(lambda: opt.tracker.global_progress.num_peers == len(optimizers), "every peer's progress record")
        assert opt.tracker.target_batch_size == len(optimizers) * INNER_STEPS * BATCH, (
            "the epoch's target is inner steps per peer"
        )
    steps: list[list[int]] = [[] for _ in optimizers]
    threads = [
        threading.Thread(target=_train_one_outer_step, args=(opt, model, grad, taken))
        for opt, model, grad, taken in zip(optimizers, models, grads, steps)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [opt.local_epoch for opt in optimizers] == [1] * len(optimizers), f"no outer step after {steps} inner steps"
    return [taken for (taken,) in steps]


def test_two_peers_take_one_outer_step_on_their_weighted_pseudo_gradients_and_a_joiner_downloads_it(swarm):
    dhts, optimizers = swarm
    models = [Toy(), Toy()]
    optimizers += [_optimizer(dht, model) for dht, model in zip(dhts[:2], models)]
    grads = [torch.tensor([[1.0, 0, 0], [0, 0, 0]]), torch.tensor([[0, 0, 0], [0, 2.0, 0]])]  # disjoint directions
    steps = _all_take_one_outer_step(optimizers, models, grads)
    n_a, n_b = steps  # hivemind also ends an epoch when its estimated time has passed: the wait above counts

    # Δ_i = θ0 - θ_i = inner_lr * n_i * g_i, averaged with weight (n_i + 1) * batch (the zero step counts as samples);
    # Nesterov's first step moves (1 + m) Δ
    delta = (INNER_LR * n_a * grads[0] * (n_a + 1) + INNER_LR * n_b * grads[1] * (n_b + 1)) / (n_a + n_b + 2)
    expected = -OUTER_LR * (1 + MOMENTUM) * delta
    for model in models:
        assert torch.allclose(model.weight.detach(), expected, atol=1e-5), f"{model.weight} != {expected}"
    assert torch.equal(models[0].weight.detach(), models[1].weight.detach()), "the peers left the round apart"

    # a joiner at epoch 0 downloads the global parameters and the outer momentum
    joiner_model = Toy()
    joiner = _optimizer(dhts[2], joiner_model)
    optimizers.append(joiner)
    started = time.perf_counter()
    joiner.load_state_from_peers()
    assert 0 < joiner.swarm_wait_s <= time.perf_counter() - started  # a download is time on the swarm, not compute
    assert joiner.local_epoch == 1
    assert torch.allclose(joiner_model.weight.detach(), expected, atol=1e-5)
    momentum = [joiner.state_averager.optimizer.state[p]["momentum_buffer"] for p in joiner._global_parameters()]
    theirs = [
        optimizers[0].state_averager.optimizer.state[p]["momentum_buffer"] for p in optimizers[0]._global_parameters()
    ]
    assert all(torch.allclose(a, b) for a, b in zip(momentum, theirs)) and momentum[0].abs().sum() > 0


def _assert_takes_up_the_swarms_parameters(missed: DiLoCoOptimizer, model: Toy, reference: DiLoCoOptimizer) -> None:
    """``missed`` (out of line with the swarm after its outer step) downloads ``reference``'s θ and momentum at its
    next steps, and goes on with the inner steps it took since its outer step from there."""
    taken_up = []  # what the missed peer held right after each try to take up the swarm's θ (before that step's own)
    inner_steps = 0
    take_up = missed._take_up_the_swarms_parameters

    def recorded() -> None:
        take_up()
        ours = missed._global_parameters()
        taken_up.append(
            (
                missed.state_averager.last_download,
                missed.local_epoch,
                [p.detach().clone() for p in ours],
                model.bias.detach().clone(),
                missed.grad_averager.local_samples_accumulated,
                inner_steps,
                [missed.state_averager.optimizer.state[p]["momentum_buffer"].clone() for p in ours],
            )
        )

    missed._take_up_the_swarms_parameters = recorded

    def inner_step() -> None:
        nonlocal inner_steps
        model.weight.grad, model.bias.grad = torch.zeros(2, 3), torch.ones(3)  # inner steps move the bias only
        missed.step()
        inner_steps += 1

    for _ in range(3):  # inner steps before its first try, RESYNC_WAIT_S after its outer step
        inner_step()
        time.sleep(0.1)
    # one step per try: stepping faster, it would reach the next outer step alone (the others are idle) and be
    # ahead of every state served; bounded: 10 tries, about 20 s
    for _ in range(10):
        time.sleep(RESYNC_WAIT_S + 0.1)
        inner_step()
        if any(download == "verified" for download, *_ in taken_up):
            break
    verified = [t for t in taken_up if t[0] == "verified"]
    assert verified, f"no download taken up: {[t[0] for t in taken_up]}"
    _, epoch, ours, bias, samples, before, momentum = verified[0]
    theirs = reference._global_parameters()
    assert epoch == 1 and all(torch.equal(a, b) for a, b in zip(ours, theirs)), "the peer kept a θ of its own"
    # the inner steps it took since its outer step go on from the swarm's θ, and their samples still count
    [swarms] = [theta for theta in theirs if theta.shape == (3,)]
    assert before >= 3 and torch.allclose(bias, swarms - INNER_LR * before, atol=1e-6), (
        f"after {before} inner steps the bias is {bias}, the swarm's θ {swarms}"
    )
    assert samples == before * BATCH
    assert all(
        torch.equal(a, reference.state_averager.optimizer.state[b]["momentum_buffer"]) for a, b in zip(momentum, theirs)
    )


def test_a_peer_that_missed_the_outer_round_takes_up_the_swarms_global_parameters(swarm):
    dhts, optimizers = swarm
    models = [Toy(), Toy(), Toy()]
    rounds = []
    optimizers += [
        _optimizer(
            dhts[0], models[0], cls=Partitioned, averaging_timeout=5.0, on_round=rounds.append, average_state_every=5
        )
    ]  # no state round after the outer step (DiLoCo's default)
    optimizers += [_optimizer(dht, model, average_state_every=5) for dht, model in zip(dhts[1:], models[1:])]
    grads = [
        torch.tensor([[1.0, 0, 0], [0, 0, 0]]),
        torch.tensor([[0, 0, 0], [0, 2.0, 0]]),
        torch.tensor([[0, 0, 3.0], [0, 0, 0]]),
    ]
    _all_take_one_outer_step(optimizers, models, grads)
    assert [r.success for r in rounds] == [False], rounds  # the partitioned peer stepped with its Δ alone
    theta = [[p.detach().clone() for p in opt._global_parameters()] for opt in optimizers]
    assert all(torch.equal(a, b) for a, b in zip(theta[1], theta[2])), "the two peers of the round left it apart"
    assert not torch.allclose(theta[0][0], theta[1][0]), "the missed round made no difference: the test shows nothing"

    _assert_takes_up_the_swarms_parameters(optimizers[0], models[0], optimizers[1])


@pytest.mark.parametrize("swarm", [4], indirect=True)
def test_an_outer_round_split_into_two_groups_is_followed_by_a_parameter_round_that_joins_them(swarm):
    dhts, optimizers = swarm
    models = [Toy() for _ in dhts]
    rounds = []
    optimizers += [
        _optimizer(dht, model, cls=cls, on_round=rounds.append, average_state_every=5)
        for dht, model, cls in zip(dhts, models, [DiLoCoOptimizer, DiLoCoOptimizer, OtherGroup, OtherGroup])
    ]  # no state round is due after the first outer step
    grads = [torch.zeros(2, 3) for _ in dhts]
    for i, grad in enumerate(grads):
        grad.view(-1)[i] = i + 1.0  # four directions
    steps = _all_take_one_outer_step(optimizers, models, grads)
    assert sorted(r.group_size for r in rounds) == [2, 2, 2, 2] and all(r.success for r in rounds), rounds

    # each group stepped θ with its own Δ (weighted by samples, Nesterov's first step: (1 + m) Δ)
    def theta(group):
        delta = sum(INNER_LR * steps[i] * grads[i] * (steps[i] + 1) for i in group) / sum(steps[i] + 1 for i in group)
        return -OUTER_LR * (1 + MOMENTUM) * delta

    joined = (theta([0, 1]) + theta([2, 3])) / 2
    assert not torch.allclose(theta([0, 1]), joined, atol=1e-3), "the groups stepped alike: the test shows nothing"
    weights = [model.weight.detach() for model in models]
    assert all(torch.equal(w, weights[0]) for w in weights[1:]), f"the groups left the split apart: {weights}"
    assert torch.allclose(weights[0], joined, atol=1e-5), f"{weights[0]} != the mean of the groups' θ {joined}"
    momentum = [o.state_averager.optimizer.state[o._global_parameters()[0]]["momentum_buffer"] for o in optimizers]
    assert all(torch.equal(m, momentum[0]) for m in momentum[1:]), "the groups' outer momentum stayed apart"


def test_a_checkpoint_holds_the_global_parameters_apart_from_the_inner_ones(swarm):
    dhts, optimizers = swarm
    model = Toy()
    opt = _optimizer(dhts[0], model)
    optimizers.append(opt)
    model.weight.grad = torch.ones(2, 3)
    opt.step()  # one inner step: θ_i moves, θ does not
    saved = opt.state_dict()
    assert torch.equal(saved["global"][0], torch.zeros(2, 3)) and not torch.equal(
        model.weight.detach(), torch.zeros(2, 3)
    )
    with opt.at_global_parameters(model):
        assert torch.equal(model.weight.detach(), torch.zeros(2, 3))
    assert torch.allclose(model.weight.detach(), torch.full((2, 3), -INNER_LR))

    saved["global"][0].fill_(0.5)
    opt.load_state_dict(saved)
    assert torch.equal(opt._global_parameters()[0], torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="not a DiLoCo optimizer state"):
        opt.load_state_dict(saved["outer"])  # a gradient-mode checkpoint's
    with pytest.raises(ValueError, match="is DiLoCo's"):
        TrackedOptimizer.load_state_dict(opt, saved)  # what a gradient-mode miner does with a DiLoCo checkpoint


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_the_outer_step_skips_a_pseudo_gradient_that_is_not_finite(poison):
    weight = torch.nn.Parameter(torch.ones(3))
    opt = OuterSGD([weight])
    weight.grad = torch.tensor([0.1, poison, 0.1])
    opt.step()
    assert torch.equal(weight.detach(), torch.ones(3)) and opt.skipped_steps == 1
    assert not opt.state.get(weight), "no momentum taken from the bad pseudo-gradient"
