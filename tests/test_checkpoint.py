"""Checkpoints: atomic, pruned, loadable by transformers, what a restart resumes from, and the faults they survive."""

from __future__ import annotations

import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from hivetrain.miner.checkpoint import (
    CheckpointError,
    load_checkpoint,
    recover_leftovers,
    resume_checkpoint,
    save_checkpoint,
)
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
    return TrainerState(
        peer_id="QmPeer", preset="tiny", epoch=epoch, step=10 * epoch, samples=40 * epoch, next_block=40 * epoch
    )


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


def test_resume_skips_a_truncated_newest_checkpoint_and_says_why(tmp_path, caplog):
    model, opt = _trained()
    save_checkpoint(tmp_path, model, opt, _state(1), keep=3)
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    save_checkpoint(tmp_path, model, opt, _state(2), keep=3)
    weights = tmp_path / "epoch-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a crash or a full disk mid-copy
    fresh = build_model("tiny", seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    path, opt_state, state = resume_checkpoint(tmp_path, fresh, "tiny")
    assert path.name == "epoch-000001" and state == _state(1) and opt_state["state"]
    assert any("skipping checkpoint" in r.message and "epoch-000002" in r.message for r in caplog.records)
    assert not torch.equal(fresh.transformer.wte.weight, before["transformer.wte.weight"])  # epoch 1 loaded
    assert not torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)  # not the broken epoch 2


def test_resume_never_runs_pickled_code_and_skips_nan_weights(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, model, opt, _state(1), keep=3)
    save_checkpoint(tmp_path, model, opt, _state(2), keep=3)
    save_checkpoint(tmp_path, model, opt, _state(3), keep=3)
    ran = tmp_path / "ran"
    torch.save({"state": _Payload(str(ran))}, tmp_path / "epoch-000003" / "optimizer.pt")  # another replica's gift
    poisoned = build_model("tiny", seed=0)
    with torch.no_grad():
        poisoned.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    poisoned.save_pretrained(tmp_path / "epoch-000002", safe_serialization=True)
    fresh = build_model("tiny", seed=1)
    path, _, state = resume_checkpoint(tmp_path, fresh, "tiny")
    assert not ran.exists(), "unpickling a checkpoint ran code"
    assert path.name == "epoch-000001" and state.epoch == 1
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_checkpoint_of_another_preset_instead_of_skipping_it(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, model, opt, _state(1))
    with pytest.raises(ValueError, match="HIVE_PRESET=tiny"):
        resume_checkpoint(tmp_path, build_model("tiny"), "seed")
    assert resume_checkpoint(tmp_path / "empty", build_model("tiny"), "tiny") is None


def test_leftovers_of_a_crashed_save_are_cleaned_and_the_moved_checkpoint_restored(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, model, opt, _state(5))
    (tmp_path / "epoch-000005").rename(tmp_path / ".old-epoch-000005-4242")  # crash between the two renames
    (tmp_path / ".tmp-epoch-000005-4242").mkdir()
    (tmp_path / ".tmp-epoch-000006-77").mkdir()
    recover_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000005"]
    assert latest_checkpoint(tmp_path).name == "epoch-000005"


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs the test mounts (root only): too small for a checkpoint of the tiny model."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_save_into_a_full_filesystem_fails_cleanly(full_disk):
    model, opt = _trained()
    with pytest.raises(CheckpointError, match="free space"):
        save_checkpoint(full_disk / "ckpt", model, opt, _state(1))
    assert list((full_disk / "ckpt").iterdir()) == [], "the temporary folder was left behind"
