"""Atomic checkpoints a miner resumes from and ``transformers`` loads.

A checkpoint is a folder ``epoch-<N>`` holding ``save_pretrained`` output (safetensors + config),
``optimizer.pt`` (hivemind.Optimizer state, its local epoch included) and ``trainer.json`` (the
layout others read is ``hivetrain.protocol.checkpoints``). It is written to a hidden temporary folder and renamed into place, so a crash mid-write leaves the
previous checkpoint intact and never a half-written one under a real name.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from hivetrain.log import get_logger
from hivetrain.protocol.checkpoints import PREFIX, TRAINER_FILE, TrainerState, list_checkpoints, read_trainer_state

logger = get_logger(__name__)


def save_checkpoint(root: str | Path, model, optimizer, state: TrainerState, keep: int = 2) -> Path:
    """Write ``root/epoch-<epoch>`` atomically, then prune to the newest ``keep``; returns its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.epoch:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / TRAINER_FILE).write_text(json.dumps(asdict(state), indent=1))
    _fsync_tree(tmp)
    if final.exists():  # same epoch saved twice (e.g. at an epoch boundary, then at shutdown)
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    logger.info(f"checkpoint saved: {final}")
    return final


def load_checkpoint(path: str | Path, model, map_location: str = "cpu") -> tuple[dict, TrainerState]:
    """Load weights into ``model``; return the optimizer state dict (to load after the Optimizer exists) and TrainerState."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(path / "model.safetensors", device=map_location)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # GPT-2 ties lm_head to wte, and save_pretrained stores the tied tensor once
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         "was it written with another preset? Move it away or pick the matching HIVE_PRESET")
    optimizer_state = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=False)
    state = read_trainer_state(path)
    return optimizer_state, state


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
