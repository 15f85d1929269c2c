"""Every place hivetrain reaches into hivemind's internals, in one module.

hivemind 1.1.12 is pinned. What is here overrides private methods (``Optimizer._make_state_averager``,
``_update_global_epoch``, ``_average_gradients_and_load_into_optimizer``), patches a codec table and
reads log lines, so a new hivemind release can break it silently. Importing this module checks the
version and the hooks it relies on, and fails at start with what to do instead of mid-training.
The README's "hivemind behaviours we work around" explains each piece.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import hivemind
import numpy as np
import torch
from hivemind.compression import Uniform8BitQuantization
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import serialization as hivemind_serialization
from hivemind.optim.state_averager import TrainingStateAverager

from hivetrain.log import get_logger

logger = get_logger(__name__)

#: The hivemind release these workarounds were written for and tested with.
HIVEMIND_VERSION = "1.1.12"
#: hivemind logs its parameter-averaging rounds here (the only place they are visible).
STATE_AVERAGER_LOGGER = "hivemind.optim.state_averager"

_HOOKS = {
    hivemind.Optimizer: ("_make_state_averager", "_update_global_epoch", "_average_gradients_and_load_into_optimizer"),
    TrainingStateAverager: ("_get_handle_name", "get_current_state", "load_state_from_peers"),
    DecentralizedAverager: ("load_state_from_peers",),
}


def check_hivemind(version: str = hivemind.__version__) -> None:
    """Raise ``ImportError`` when hivemind is not the release these workarounds were written for."""
    if version != HIVEMIND_VERSION:
        raise ImportError(f"hivetrain's hivemind workarounds (hivetrain/hivemind_compat.py) were written for hivemind "
                          f"{HIVEMIND_VERSION}, found {version}: install hivemind=={HIVEMIND_VERSION} "
                          "(requirements.txt), or re-check each override in that module against the new release")
    missing = [f"{cls.__name__}.{name}" for cls, names in _HOOKS.items() for name in names if not hasattr(cls, name)]
    if missing:
        raise ImportError(f"hivemind {version} lacks {', '.join(missing)}, which hivetrain/hivemind_compat.py overrides")


check_hivemind()


# --- the 8-bit codec under NumPy 2 ---------------------------------------------------------------
class Uniform8Bit(Uniform8BitQuantization):
    """hivemind 1.1.12's 8-bit codec with its header read as a scalar.

    hivemind does ``int(np.frombuffer(buffer, count=1))``, which NumPy 2 refuses: every received
    part then fails with only a warning and each peer keeps its own values, so 8-bit averaging
    silently did not average. Decoding goes through hivemind's codec table, hence
    ``install_codecs``.
    """

    def extract(self, serialized_tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


def install_codecs() -> None:
    """Make hivemind decode 8-bit tensors with ``Uniform8Bit``; call before averagers fork."""
    hivemind_serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()


# --- state: copies out, verified in --------------------------------------------------------------
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


# --- averaging rounds, which hivemind does not report --------------------------------------------
@dataclass(frozen=True)
class RoundInfo:
    """An averaging round as this peer saw it."""

    epoch: int
    kind: str
    group: tuple[str, ...]
    group_size: int
    duration_s: float
    success: bool
    time: float = field(default_factory=time.time)


class TrackedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that reports every gradient-averaging round (epoch, group, duration) to ``on_round``.

    A round's group is only visible on its ``StepControl``; it also shares and loads state through
    ``SafeStateAverager``.
    """

    def __init__(self, *args, on_round: Callable[[RoundInfo], None] | None = None, **kwargs):
        self._on_round = on_round or (lambda info: None)
        self._round_epoch = 0
        self._round_started = time.perf_counter()
        super().__init__(*args, **kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # hivemind.Optimizer._make_state_averager, with our averager (see SafeStateAverager)
        return SafeStateAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def _update_global_epoch(self, grad_scaler) -> None:
        # remembered here because with delay_grad_averaging the round ends after the epoch has moved on
        self._round_epoch, self._round_started = self.local_epoch, time.perf_counter()
        super()._update_global_epoch(grad_scaler)

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        group: tuple[str, ...] = ()
        success = False
        if maybe_step_control is not None and maybe_step_control.done() and not maybe_step_control.cancelled():
            if maybe_step_control.exception() is None:
                group = tuple(sorted(peer.to_base58() for peer in maybe_step_control.result()))
                success = True
        self._on_round(RoundInfo(
            epoch=self._round_epoch, kind="gradients", group=group, group_size=len(group),
            duration_s=time.perf_counter() - self._round_started, success=success,
        ))


class StateRoundLogHandler(logging.Handler):
    """Parameter-averaging rounds happen inside hivemind's background executor, which only logs them.

    In local-updates mode those are the swarm's rounds; this turns hivemind's log lines into RoundInfo
    (group size only: hivemind does not expose the group's peer ids there). ``attach``/``detach``
    hook it onto ``STATE_AVERAGER_LOGGER``.
    """

    _AVERAGED = re.compile(r"Averaged parameters with (\d+) peers")
    _FAILED = re.compile(r"Averaging failed with")

    def __init__(self, epoch: Callable[[], int], on_round: Callable[[RoundInfo], None]):
        super().__init__(level=logging.DEBUG)
        self._epoch, self._on_round = epoch, on_round

    def attach(self) -> "StateRoundLogHandler":
        logging.getLogger(STATE_AVERAGER_LOGGER).addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger(STATE_AVERAGER_LOGGER).removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if match := self._AVERAGED.search(message):
            size = int(match.group(1))
            self._on_round(RoundInfo(epoch=self._epoch(), kind="state", group=(), group_size=size, duration_s=0.0, success=True))
        elif self._FAILED.search(message):
            self._on_round(RoundInfo(epoch=self._epoch(), kind="state", group=(), group_size=0, duration_s=0.0, success=False))
