"""The training state: copies handed to peers, and verification of what is downloaded from them."""

from __future__ import annotations

from typing import Callable

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.optim.state_averager import TrainingStateAverager

from hivetrain.log import get_logger

logger = get_logger(__name__)


class StateRejected(ValueError):
    """A state downloaded from a peer that must not be adopted; the message says why."""


def check_downloaded_state(metadata, tensors, local: list[torch.Tensor], max_epoch: int | None) -> None:
    """Raise ``StateRejected`` unless a downloaded (metadata, tensors) may replace ``local`` parameters.

    hivemind checks only that the epoch is not behind ours. Refused here: a non-integer or negative
    epoch, one above ``max_epoch`` (what the swarm's progress supports), fewer tensors than our
    parameters, a parameter of another shape or dtype, and any NaN or infinity in any tensor
    (parameters or optimizer statistics).
    """
    epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise StateRejected(f"its epoch is {epoch!r}, not a non-negative integer")
    if max_epoch is not None and epoch > max_epoch:
        raise StateRejected(f"it claims epoch {epoch}, beyond the {max_epoch} the swarm's progress supports")
    if len(tensors) < len(local):
        raise StateRejected(f"it holds {len(tensors)} tensors, fewer than our {len(local)} parameters")
    for index, (mine, theirs) in enumerate(zip(local, tensors)):
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            got = (tuple(theirs.shape), theirs.dtype) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise StateRejected(f"parameter {index} is {got}, ours is {(tuple(mine.shape), mine.dtype)}")
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or not torch.isfinite(tensor).all():
            raise StateRejected(f"tensor {index} is not a finite tensor")


class _VerifiedDownload(DecentralizedAverager):
    """Sits between TrainingStateAverager and DecentralizedAverager in the MRO: a download that fails
    ``check_downloaded_state`` is reported as no download, so TrainingStateAverager applies nothing."""

    max_epoch: Callable[[], int | None] = staticmethod(lambda: None)
    rejected_states = 0

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None):
        loaded = super().load_state_from_peers(wait=wait, timeout=timeout)
        if loaded is None or not wait:
            return loaded
        metadata, tensors = loaded
        local = [p for group in self.optimizer.param_groups for p in group["params"]]
        try:
            check_downloaded_state(metadata, tensors, local, self.max_epoch())
        except StateRejected as rejected:
            self.rejected_states += 1
            logger.warning(f"refusing the state downloaded from peers: {rejected}")
            return None
        return loaded


class SafeStateAverager(TrainingStateAverager, _VerifiedDownload):
    """TrainingStateAverager that verifies what it downloads and hands peers copies of its CPU tensors.

    Downloads: see ``check_downloaded_state``; ``max_epoch`` (a callable, None = unbounded) bounds the
    epoch a state may claim. Sharing: hivemind sends the state a peer downloads through a
    multiprocessing pipe, and pickling a CPU tensor moves its storage into shared memory in place,
    freeing the old buffer. On CPU, ``param.cpu()`` is the parameter itself, so a peer downloading
    our state while we train freed memory under our own forward pass: the miner segfaulted in
    libtorch_cpu (seen with 4 CPU miners, a late joiner loading state). On GPU, ``.cpu()`` already
    copies, so this costs nothing there.
    """

    def __init__(self, *args, max_epoch: Callable[[], int | None] | None = None, **kwargs):
        if max_epoch is not None:
            self.max_epoch = max_epoch
        super().__init__(*args, **kwargs)

    @classmethod
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        # RPC names carry the class name: keep hivemind's, so plain hivemind peers (and our validator) can download from us
        return TrainingStateAverager._get_handle_name(namespace, method_name)

    def get_current_state(self):
        with self.lock_optimizer:  # no background optimizer step halfway through the copy
            metadata, tensors, infos = super().get_current_state()
            tensors = [t.clone() if t.device.type == "cpu" else t for t in tensors]
        return metadata, tensors, infos
