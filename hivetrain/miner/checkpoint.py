"""Atomic checkpoints a miner resumes from and ``transformers`` loads.

A checkpoint is a folder ``epoch-<N>`` holding ``save_pretrained`` output (safetensors + config),
``optimizer.pt`` (hivemind.Optimizer state, its local epoch included) and ``trainer.json`` (the
layout others read is ``hivetrain.protocol.checkpoints``). It is written to a hidden temporary
folder and renamed into place, so a crash mid-write leaves the previous checkpoint intact and
never a half-written one under a real name; a failed write (full disk) removes its temporary
folder and raises ``CheckpointError``, which the miner logs and trains on. Resuming takes the
newest checkpoint that loads, skipping damaged ones with the reason, and never unpickles code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hivetrain.log import get_logger
from hivetrain.protocol.checkpoints import PREFIX, TRAINER_FILE, TrainerState, list_checkpoints, read_trainer_state

logger = get_logger(__name__)

#: Folders a save writes before the rename (``.tmp-``) and the same epoch's previous checkpoint during it (``.old-``).
TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, a read-only volume); nothing half-written is left."""


#: What a failed write raises: OSError from Python, SafetensorError from safetensors, RuntimeError from torch.save.
_UNWRITABLE = (OSError, RuntimeError, SafetensorError)
#: What reading a damaged, truncated or foreign checkpoint raises (safetensors, torch.load, JSON, our checks).
_UNREADABLE = (
    OSError,
    ValueError,
    RuntimeError,
    EOFError,
    KeyError,
    TypeError,
    pickle.UnpicklingError,
    SafetensorError,
)


def save_checkpoint(root: str | Path, model, optimizer, state: TrainerState, keep: int = 2) -> Path:
    """Write ``root/epoch-<epoch>`` atomically, then prune to the newest ``keep``; returns its path.

    Raises ``CheckpointError`` when the files cannot be written, after removing the temporary folder.
    """
    root = Path(root)
    final = root / f"{PREFIX}{state.epoch:06d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / TRAINER_FILE).write_text(json.dumps(asdict(state), indent=1))
        _fsync_tree(tmp)
        _replace(root, tmp, final)
    except _UNWRITABLE as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write {final}: {error}; free space there or point HIVE_CHECKPOINT_DIR at a volume with room"
        ) from error
    for stale in list_checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    logger.info(f"checkpoint saved: {final}")
    return final


def _replace(root: Path, tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (same epoch saved twice) is moved aside first."""
    if final.exists():
        old = root / f"{OLD_PREFIX}{final.name}-{os.getpid()}"
        final.rename(old)  # a crash between these two renames leaves only .old-*: recover_leftovers restores it
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)


def recover_leftovers(root: str | Path) -> None:
    """Clean what a crash mid-save left under ``root``: temporary folders go, an orphaned previous checkpoint returns.

    ``.old-epoch-N-<pid>`` without ``epoch-N`` is the complete checkpoint a crash moved aside: it is
    renamed back. Every other ``.tmp-*`` or ``.old-*`` folder is removed.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for leftover in sorted(root.iterdir()):
        if not leftover.is_dir() or not leftover.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            continue
        name = leftover.name.removeprefix(OLD_PREFIX).rsplit("-", 1)[0]
        if leftover.name.startswith(OLD_PREFIX) and name.startswith(PREFIX) and not (root / name).exists():
            logger.warning(f"restoring {root / name} from {leftover.name}, left by a save that crashed")
            leftover.rename(root / name)
        else:
            logger.info(f"removing {leftover}, left by a save that did not finish")
            shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: str | Path, model, map_location: str = "cpu") -> tuple[dict, TrainerState]:
    """Load weights into ``model``; return the optimizer state dict (to load after the Optimizer exists) and
    TrainerState.

    Every part is read and checked before ``model`` changes, so a damaged checkpoint leaves it as it
    was. Nothing is unpickled: weights are safetensors and the optimizer state loads with
    ``weights_only=True`` (a checkpoint volume other replicas can write must not run code).
    """
    path = Path(path)
    weights = load_file(path / "model.safetensors", device=map_location)
    _check_weights(path, model, weights)
    optimizer_state = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
    state = read_trainer_state(path)
    model.load_state_dict(weights, strict=False)
    return optimizer_state, state


def _check_weights(path: Path, model, weights: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    # GPT-2 ties lm_head to wte, and save_pretrained stores the tied tensor once
    missing = [k for k in expected if k not in weights and k != "lm_head.weight"]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "was it written with another preset? Move it away or pick the matching HIVE_PRESET"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, the model "
                f"{tuple(expected[name].shape)}; was it written with another preset?"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"checkpoint {path}: {name} holds NaN or infinite values")


def resume_checkpoint(root: str | Path, model, preset: str) -> tuple[Path, dict, TrainerState] | None:
    """The newest checkpoint under ``root`` that loads into ``model``: (path, optimizer state, trainer state).

    Cleans up after a crashed save first. A damaged checkpoint is skipped with the reason logged
    and the next older one is tried; None when none loads. One written for another preset raises
    ``ValueError`` instead: skipping it would let the next saves prune the user's checkpoints.
    """
    recover_leftovers(root)
    for path in reversed(list_checkpoints(root)):
        try:
            written_for = read_trainer_state(path).preset
        except _UNREADABLE as error:
            logger.warning(f"skipping checkpoint {path}: its {TRAINER_FILE} is unreadable ({error!r})")
            continue
        if written_for != preset:
            raise ValueError(
                f"checkpoint {path} was written for the {written_for} preset, this miner trains {preset}: "
                f"set HIVE_PRESET={written_for} or point HIVE_CHECKPOINT_DIR at another folder"
            )
        try:
            optimizer_state, state = load_checkpoint(path, model)
        except _UNREADABLE as error:
            logger.warning(f"skipping checkpoint {path}: it does not load ({error!r}); trying an older one")
            continue
        return path, optimizer_state, state
    return None


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
