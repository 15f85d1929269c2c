"""The validator's copy of the shared model, kept current by downloading state from peers."""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Callable, Iterator

import torch

from hivetrain.hivemind_compat import DHT, Bans, OffenceLog, SafeStateAverager, install_codecs, parameters_set_to
from hivetrain.log import get_logger
from hivetrain.models import build_model
from hivetrain.protocol.admission import Admission
from hivetrain.protocol.training import param_groups, shared_optimizer

logger = get_logger(__name__)


class ModelSync:
    """A client-mode state averager over the same parameters and optimizer as the miners'.

    It never averages and never trains: ``sync()`` downloads the newest parameters (and optimizer
    statistics, which keep the tensor layout identical to the miners') from whichever peer shares them.
    It also keeps the parameters of the ``kept`` epochs it held before the current one (``parameters_at``):
    a miner may answer a spot check at the one before, and in DiLoCo mode one epoch is a whole outer
    step, too far apart to judge one epoch's answer at the other's parameters; an audit recomputes a
    gradient round's gradients at the parameters of its epoch, seconds after the round
    (``hivetrain.validator.audits``). Each costs one more copy of the parameters in memory.

    A peer that serves a state it refuses is banned (for ``offences.ban_s``) and named in ``offences`` (the
    validator's ``OffenceLog``; one of its own when not given).
    """

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        preset: str,
        seed: int = 0,
        timeout_s: float = 60.0,
        max_epoch: Callable[[], int | None] | None = None,
        mode: str = "hivemind",
        offences: OffenceLog | None = None,
        admission: Admission | None = None,
        kept: int = 1,
    ):
        if kept < 1:
            raise ValueError(f"kept must be >= 1, got {kept}")
        install_codecs()  # state may arrive 8-bit compressed
        self.offences = offences if offences is not None else OffenceLog()
        self.model = build_model(preset, seed=seed)
        self.model.eval()
        self.timeout_s = timeout_s
        self.averager = SafeStateAverager(
            dht=dht,
            prefix=f"{run_id}_state_averager",  # where hivemind.Optimizer(run_id=...) shares its state
            optimizer=shared_optimizer(mode),  # DiLoCo's peers share the global parameters and outer momentum
            params=param_groups(self.model, 0.0),
            client_mode=True,
            start=True,
            max_epoch=max_epoch,  # a state claiming more than the swarm's progress supports is refused
            # made before the averager forks: its child names whom it refused here, and asks only admitted peers
            bans=Bans(self.offences, admission),
        )
        self.synced_at = 0.0
        self.kept = kept
        self.history: collections.OrderedDict[int, list[torch.Tensor]] = collections.OrderedDict()  # older epochs

    def held_epochs(self) -> list[int]:
        """The epochs ``parameters_at`` can run at, oldest first."""
        return sorted({*self.history, self.epoch})

    @property
    def epoch(self) -> int:
        return self.averager.local_epoch

    def sync(self) -> bool:
        """Load the swarm's newest state; True when parameters at an epoch >= ours arrived and were adopted.

        A state that fails verification (``SafeStateAverager``) is refused, its server named
        (in ``offences``) and the next peer asked; when none passes, the model stays as it was.
        """
        before, held = time.time(), (self.epoch, [param.detach().clone() for param in self.model.parameters()])
        try:
            self.averager.load_state_from_peers(timeout=self.timeout_s)
        except Exception:  # DHT/network boundary: keep the model we have
            logger.warning("loading state from peers failed", exc_info=True)
            return False
        if self.averager.last_download != "verified":  # nobody sent a state we could adopt: the model is as it was
            return False
        self.synced_at = time.time()
        if self.epoch != held[0]:
            self.history.pop(self.epoch, None)  # ours now (a state at an epoch we held before: a rollback)
            self.history[held[0]] = held[1]
            while len(self.history) > self.kept:
                self.history.popitem(last=False)
        logger.info(f"synced the shared model: epoch {self.epoch} in {self.synced_at - before:.1f}s")
        return True

    def holds(self, epoch: int) -> bool:
        """Whether ``parameters_at(epoch)`` has that epoch's parameters: the current one or one kept."""
        return epoch == self.epoch or epoch in self.history

    @contextlib.contextmanager
    def parameters_at(self, epoch: int) -> Iterator[None]:
        """Run a block with the model at ``epoch``'s parameters (``holds(epoch)`` must be true), then restore the
        current ones."""
        if epoch == self.epoch:
            yield
            return
        if not self.holds(epoch):
            raise ValueError(f"the parameters of epoch {epoch} are not held (current {self.epoch})")
        with parameters_set_to(list(self.model.parameters()), self.history[epoch]):
            yield

    def shutdown(self) -> None:
        self.averager.shutdown()
