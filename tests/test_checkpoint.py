"""Checkpoints: atomic, pruned, loadable by transformers, and what a restart resumes from."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from hivetrain.miner.checkpoint import load_checkpoint, save_checkpoint
from hivetrain.models import build_model
from hivetrain.protocol.checkpoints import TrainerState, latest_checkpoint, list_checkpoints
from hivetrain.protocol.training import ClippedAdamW, param_groups


def _trained(seed: int = 0):
    model = build_model("tiny", seed=seed)
    opt = ClippedAdamW(param_groups(model, 0.1), max_grad_norm=1.0, lr=1e-2)
    batch = torch.randint(0, 50257, (2, 16))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    return model, opt


def _state(epoch: int) -> TrainerState:
    return TrainerState(peer_id="QmPeer", preset="tiny", epoch=epoch, step=10 * epoch, samples=40 * epoch, next_block=40 * epoch)


def test_save_load_round_trip_and_transformers_loads_it(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path, model, opt, _state(3))
    assert path.name == "epoch-000003" and (path / "model.safetensors").exists()
    fresh = build_model("tiny", seed=1)
    opt_state, state = load_checkpoint(path, fresh)
    assert state == _state(3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert opt_state["state"] and opt_state["param_groups"][0]["weight_decay"] == 0.1
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)


def test_keeps_the_newest_and_ignores_partial_writes(tmp_path):
    model, opt = _trained()
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, model, opt, _state(epoch), keep=2)
    (tmp_path / ".tmp-epoch-000009-123").mkdir()  # a crash mid-write leaves only a hidden folder
    (tmp_path / "epoch-000010").mkdir()  # a folder without trainer.json is not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-000002", "epoch-000003"]
    assert latest_checkpoint(tmp_path).name == "epoch-000003"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_saving_an_epoch_twice_replaces_it(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, model, opt, _state(4))
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    save_checkpoint(tmp_path, model, opt, _state(4))
    fresh = build_model("tiny")
    load_checkpoint(tmp_path / "epoch-000004", fresh)
    assert torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-000004"]


def test_a_checkpoint_of_another_preset_is_refused(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path, model, opt, _state(1))
    try:
        load_checkpoint(path, build_model("seed"))
    except (ValueError, RuntimeError) as error:
        assert "preset" in str(error) or "size mismatch" in str(error)
    else:
        raise AssertionError("loading a tiny checkpoint into the seed model must fail")
