"""The miner's optimizer pieces: decay groups, warmup, clipping, and the wire codecs."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from hivetrain.hivemind_compat import install_codecs
from hivetrain.miner.optim import warmup_schedule
from hivetrain.models import build_model
from hivetrain.protocol.training import COMPRESSIONS, ClippedAdamW, param_groups, state_download_compression


def test_weight_decay_skips_biases_and_layernorm():
    model = build_model("tiny")
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ln = model.transformer.ln_f
    assert any(p is ln.weight for p in no_decay["params"]) and any(p is ln.bias for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_warmup_is_linear_then_flat():
    schedule = warmup_schedule(3)
    assert [schedule(e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_schedule(0)(0) == 1.0


def test_clipping_bounds_the_applied_gradient():
    weight = torch.nn.Parameter(torch.zeros(4))
    opt = ClippedAdamW([weight], max_grad_norm=1.0, lr=0.1)
    weight.grad = torch.full((4,), 100.0)
    opt.step()
    assert torch.isclose(weight.grad.norm(), torch.tensor(1.0))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_gradient_is_skipped_not_applied(poison):
    weight = torch.nn.Parameter(torch.ones(4))
    opt = ClippedAdamW([weight], max_grad_norm=1.0, lr=0.1)
    weight.grad = torch.tensor([1.0, poison, 1.0, 1.0])  # one bad element of an averaged gradient
    opt.step()
    assert torch.equal(weight.detach(), torch.ones(4)) and opt.skipped_steps == 1
    assert not opt.state.get(weight), "no statistics taken from the bad gradient"
    weight.grad = torch.full((4,), 0.5)
    opt.step()
    assert torch.isfinite(weight).all() and not torch.equal(weight.detach(), torch.ones(4))


@pytest.mark.parametrize("name, tolerance", [("none", 0.0), ("fp16", 1e-3), ("8bit", 0.1)])
def test_codecs_round_trip_through_hivemind(name, tolerance):
    install_codecs()
    tensor = torch.randn(100_000)
    codec = COMPRESSIONS[name]()
    wire = serialize_torch_tensor(tensor, codec.compression_type)
    restored = deserialize_torch_tensor(wire)  # what the receiving peer runs
    assert restored.shape == tensor.shape
    assert (restored - tensor).abs().mean() <= tolerance * tensor.abs().mean() + 1e-7
    if name == "8bit":
        assert (
            wire.compression == runtime_pb2.UNIFORM_8BIT and len(wire.buffer) < tensor.numel() * 1.1
        )  # a byte per value, not four


@pytest.mark.parametrize("name", ["fp16", "8bit"])
def test_a_joiner_gets_the_optimizer_statistics_exact_and_the_parameters_as_configured(name):
    from hivemind.compression import CompressionInfo, TensorRole

    install_codecs()
    compression = state_download_compression(name)
    second_moments = torch.logspace(-14, -2, 10_000)[torch.randperm(10_000)]  # as Adam's exp_avg_sq spans
    parameters = torch.randn(10_000) * 0.02

    def served(tensor, role):  # as hivemind's rpc_download_state serializes each tensor of the state
        info = CompressionInfo.from_tensor(tensor, key=0, role=role)
        return deserialize_torch_tensor(compression.compress(tensor, info, allow_inplace=False))

    assert torch.equal(served(second_moments, TensorRole.OPTIMIZER), second_moments)
    wire = COMPRESSIONS[name]().compression_type
    assert (
        compression.compress(
            parameters, CompressionInfo.from_tensor(parameters, key=0, role=TensorRole.PARAMETER)
        ).compression
        == wire
    )
    # what the codec alone does to the statistics: the reason they are sent exact
    lossy = served(second_moments, TensorRole.PARAMETER)
    step_ratio = second_moments.sqrt() / lossy.clamp_min(0).sqrt().add(1e-8)
    assert not torch.allclose(step_ratio, torch.ones_like(step_ratio), rtol=0.5)


@pytest.mark.integration
def test_gradients_accumulate_in_the_model_until_the_epoch_when_its_buffers_are_reused():
    """HIVE_REUSE_GRAD_BUFFERS: the miner's zero_grad after each step leaves the sum for hivemind, which clears it."""
    import hivemind

    from hivetrain.miner.optim import make_optimizer
    from hivetrain.settings import MinerSettings

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    model = build_model("tiny")
    settings = MinerSettings(
        preset="tiny",
        run_id="reuse",
        batch_size=2,
        target_batch_size=6,
        warmup_epochs=0,
        matchmaking_time=1.0,
        averaging_timeout=5.0,
    )
    opt = make_optimizer(model, dht, settings)
    try:
        batch = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
        weight = model.transformer.wte.weight
        grads, before = [], weight.detach().clone()
        while opt.local_epoch == 0 and len(grads) < 20:
            model(input_ids=batch, labels=batch).loss.backward()
            grads.append(weight.grad.detach().clone())
            opt.step()
            opt.zero_grad()  # what the miner's loop calls: a no-op here
        assert opt.local_epoch == 1, f"no epoch after {len(grads)} steps"
        assert len(grads) >= 2 and torch.allclose(grads[1], 2 * grads[0], rtol=1e-4, atol=1e-8), (
            "not accumulated in .grad"
        )
        assert not torch.equal(weight.detach(), before), "the epoch's step did not move the parameters"
        assert weight.grad.abs().sum() == 0, "hivemind did not clear the buffers after the epoch"
    finally:
        opt.shutdown()
        dht.shutdown()
