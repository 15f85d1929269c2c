"""How a miner's checkpoints lie on disk, for whoever reads them besides the miner (the launcher, tools).

A checkpoint is a folder ``epoch-<N>`` (zero-padded) holding ``save_pretrained`` output,
``optimizer.pt`` and ``TRAINER_FILE`` (a ``TrainerState`` as JSON); a folder without it is
incomplete and ignored. ``hivetrain.miner.checkpoint`` writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TRAINER_FILE = "trainer.json"
PREFIX = "epoch-"


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer state to resume where it stopped."""

    peer_id: str
    preset: str
    epoch: int
    step: int
    samples: int
    next_block: int


def _epoch_of(path: Path) -> int | None:
    if not path.name.startswith(PREFIX) or not path.is_dir():
        return None
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(epoch, p) for p in root.iterdir() if (epoch := _epoch_of(p)) is not None and (p / TRAINER_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def read_trainer_state(checkpoint: str | Path) -> TrainerState:
    """The ``TrainerState`` a checkpoint folder holds."""
    return TrainerState(**json.loads((Path(checkpoint) / TRAINER_FILE).read_text()))
