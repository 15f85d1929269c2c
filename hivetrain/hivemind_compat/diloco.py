"""DiLoCo on hivemind.Optimizer: inner AdamW steps on the model, an outer Nesterov step on averaged pseudo-gradients.

DiLoCo (Douillard et al. 2023): each worker takes H inner steps from the global parameters θ, then
the workers average their pseudo-gradients Δ = θ - θ_i and an outer optimizer (SGD, Nesterov
momentum) steps θ with it. Mapped onto hivemind.Optimizer, whose machinery (progress tracking,
matchmaking, robust all-reduce, state sharing for joiners) we keep:

* hivemind's *offloaded* optimizer is the outer one: its parameters are kept copies of θ (the
  global parameters), the model's own parameters are θ_i, and after each outer step hivemind
  copies θ back into the model;
* the "gradient" hivemind averages each epoch is Δ (``PseudoGradientAverager``), weighted by the
  samples each peer trained since the last outer step;
* ``step()`` runs the inner AdamW on the model's gradient every batch, and the swarm's epoch ends
  when it has trained ``inner_steps`` batches per peer (``PlausibleProgressTracker``'s ``per_peer_target``);
* a joiner downloads θ and the outer momentum (what peers share is the offloaded optimizer's state);
  its inner AdamW starts fresh, with its own warmup;
* parameter averaging (every ``average_state_every`` outer steps) runs right after the outer step,
  never in the background: hivemind copies a background round's result into the model when it
  lands, which would wipe the inner steps taken meanwhile. Members of one round leave it with the
  same θ; the state round brings back into line a peer who stepped alone;
* a peer whose outer round failed while others train applied only its own Δ, and so did one that kept
  its own Δ on some partitions (a reducer's answer failed its check: a joiner's first Δ, from a few
  warm-up steps, is often far smaller than the group's): its θ has left the swarm's. It downloads
  the swarm's θ (and momentum) at its next steps, once the others have taken theirs (up to
  ``RESYNC_TRIES`` tries ``RESYNC_WAIT_S`` apart), rather than train on a θ of its own until the
  next state round, failing every spot check meanwhile. It keeps the inner steps it took since its
  outer step (θ_i moves with θ, and its samples still count), so its next Δ is not cut short: cut
  short, it would fail the next round's check as well, and the next, one resync after another;
* a round that succeeded in a group smaller than the swarm (hivemind's matchmaking split the swarm
  into groups, or some peers missed it) left each group with a θ of its own. Every peer that saw
  such a round averages parameters right after its outer step, as at a scheduled state round, so
  the groups meet again at once (a peer joining or leaving costs the others one parameter round).
  Built with ``average_opt_statistics=("momentum_buffer",)``, that round also joins the outer momentum,
  without which the groups' next outer steps would part their θ again.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import hivemind
import torch
from hivemind.optim.grad_averager import GradientAverager

from hivetrain.hivemind_compat.averagers import RobustAveraging
from hivetrain.hivemind_compat.optimizer import TrackedOptimizer
from hivetrain.hivemind_compat.pins import follows
from hivetrain.hivemind_compat.state import parameters_set_to
from hivetrain.log import get_logger

logger = get_logger(__name__)

#: After an outer round it missed, a peer tries this many times, this many seconds apart, to take up the swarm's θ.
RESYNC_TRIES = 5
RESYNC_WAIT_S = 2.0


class PseudoGradientAverager(RobustAveraging, GradientAverager):
    """All-reduces Δ = θ_global - θ_local per parameter instead of accumulated gradients.

    ``accumulate_grads_`` only counts samples (the inner optimizer has applied each gradient
    already); ``load_accumulators_into_averager_`` writes Δ where hivemind expects the mean gradient.
    Built with ``reuse_grad_buffers`` so hivemind allocates no accumulators. It aggregates with the
    optimizer's rule and bans (``RobustAveraging``); its RPCs keep their own class name, as before.
    """

    def __init__(self, parameters, *, global_parameters, **kwargs):
        self.global_parameters = tuple(global_parameters)
        super().__init__(parameters, **kwargs)
        if len(self.global_parameters) != len(self.parameters):
            raise ValueError(
                f"{len(self.global_parameters)} global parameters for {len(self.parameters)} model parameters"
            )

    @follows(GradientAverager, "accumulate_grads_", "67d8ddf5c3e9c3b2")
    def accumulate_grads_(self, batch_size: int) -> None:
        self.local_samples_accumulated += batch_size
        self.local_times_accumulated += 1

    @torch.no_grad()
    @follows(GradientAverager, "load_accumulators_into_averager_", "916123f43bafd6da")
    def load_accumulators_into_averager_(self) -> None:
        with self.get_tensors() as averaged:
            for delta, global_param, local in zip(averaged, self.global_parameters, self.parameters):
                delta.copy_(global_param).sub_(local.detach().to(delta.device))  # same shape as the parameter

    @torch.no_grad()
    @follows(GradientAverager, "reset_accumulated_grads_", "9222c7c084c97c07")
    def reset_accumulated_grads_(self) -> None:
        self._accumulators_used_in_step = False
        self.local_samples_accumulated = self.local_times_accumulated = 0
        self._anchor_batch_size = None


class DiLoCoOptimizer(TrackedOptimizer):
    """hivemind.Optimizer in DiLoCo mode (see the module docstring).

    ``params``/``optimizer`` are the outer ones (hivemind's); ``inner_params`` are the same model
    parameters in the inner optimizer's groups (weight decay), ``inner_optimizer`` and
    ``inner_scheduler`` factories build it. ``zero_grad`` clears the model's gradients.
    """

    _state_round_now = False  # this epoch's outer round split: average parameters after its step (set per round)

    def __init__(
        self,
        *,
        inner_params: list[dict],
        inner_optimizer: Callable,
        inner_steps: int,
        inner_scheduler: Callable | None = None,
        batch_size_per_step: int,
        **kwargs,
    ):
        if inner_steps < 1:
            raise ValueError(f"inner_steps is {inner_steps}: take at least one inner step per outer step")
        self.inner_steps = inner_steps
        self._per_peer_target = inner_steps * batch_size_per_step  # the tracker's target: per reporting peer
        for fixed in (
            "offload_optimizer",
            "reuse_grad_buffers",
            "use_local_updates",
            "delay_grad_averaging",
            "delay_optimizer_step",
            "delay_state_averaging",
            "grad_averager_factory",
            "target_batch_size",
        ):
            if fixed in kwargs:
                raise ValueError(f"DiLoCoOptimizer sets {fixed} itself")
        super().__init__(
            target_batch_size=inner_steps * batch_size_per_step,
            batch_size_per_step=batch_size_per_step,
            offload_optimizer=True,
            reuse_grad_buffers=True,
            use_local_updates=False,
            delay_grad_averaging=False,
            delay_optimizer_step=False,
            delay_state_averaging=False,
            grad_averager_factory=self._pseudo_gradient_averager,
            **kwargs,
        )
        self.inner = inner_optimizer(inner_params)
        self.inner_scheduler = inner_scheduler(self.inner) if inner_scheduler is not None else None
        self._resync_tries, self._resync_at = 0, 0.0  # after a missed outer round: tries left, when the next may run

    @property
    def average_state_every(self) -> int:
        """hivemind's: average parameters after every this many outer steps, and after this one when its round split."""
        return 1 if self._state_round_now else self._average_state_every

    @average_state_every.setter
    def average_state_every(self, value: int) -> None:
        self._average_state_every = value

    # --- the pieces hivemind builds ---------------------------------------------------------
    def _global_parameters(self) -> list[torch.Tensor]:
        return [param for group in self.state_averager.optimizer.param_groups for param in group["params"]]

    def _pseudo_gradient_averager(self, **kwargs) -> PseudoGradientAverager:
        return PseudoGradientAverager(global_parameters=self._global_parameters(), **kwargs)

    # --- training ---------------------------------------------------------------------------
    def _check_and_accumulate_gradients(self, batch_size: int, grad_scaler) -> bool:
        # one inner step on the model's own gradient; hivemind then only counts the samples
        self.inner.step()
        self.inner.zero_grad(set_to_none=False)
        if self.inner_scheduler is not None:
            self.inner_scheduler.step()
        self.grad_averager.accumulate_grads_(batch_size)
        self.tracker.report_local_progress(self.local_epoch, self.grad_averager.local_samples_accumulated)
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # --- an outer round we missed -----------------------------------------------------------
    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        fallbacks = self.grad_averager.fallbacks
        kept_before = fallbacks.value
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        kept = fallbacks.value - kept_before  # partitions where we applied our own Δ, not the group's
        peers = self.tracker.global_progress.num_peers
        if self._last_round_success and 1 < self._last_round_size < peers:
            logger.info(
                f"outer step {self._round_epoch} in a group of {self._last_round_size} of the swarm's {peers} "
                "peers: averaging parameters right after it"
            )
            self._state_round_now = True  # read by hivemind's _update_global_epoch, which called us
        if (not self._last_round_success or kept) and peers > 1:
            # hivemind now steps θ with our Δ alone (on ``kept`` partitions, or all); the others with theirs averaged
            why = f"kept our own on {kept} partitions" if self._last_round_success else "the round failed"
            logger.warning(
                f"outer step {self._round_epoch} without the swarm's pseudo-gradients ({why}): taking up its "
                "global parameters once it has stepped"
            )
            self._resync_tries, self._resync_at = RESYNC_TRIES, time.monotonic() + RESYNC_WAIT_S

    @follows(hivemind.Optimizer, "_update_global_epoch", "03a36523a3fce65e")  # reads average_state_every after us
    def _update_global_epoch(self, grad_scaler) -> None:
        try:
            super()._update_global_epoch(grad_scaler)
        finally:
            self._state_round_now = False

    def step(self, *args, **kwargs):
        if self._resync_tries and time.monotonic() >= self._resync_at:
            self._take_up_the_swarms_parameters()
        return super().step(*args, **kwargs)

    @torch.no_grad()
    def _take_up_the_swarms_parameters(self) -> None:
        self._resync_tries -= 1
        self._resync_at = time.monotonic() + RESYNC_WAIT_S
        epoch, averager = self.local_epoch, self.grad_averager
        local = self.state_averager.main_parameters  # θ_i, the model's
        progress = [param.detach() - theta for param, theta in zip(local, self._global_parameters())]  # -Δ so far
        samples, times = averager.local_samples_accumulated, averager.local_times_accumulated
        self.load_state_from_peers()  # sets θ_i to the downloaded θ and our samples to 0
        if self.state_averager.last_download == "verified":
            self._resync_tries = 0
            if self.local_epoch == epoch:  # the inner steps since our outer step go on from the swarm's θ
                for param, theta, step in zip(local, self._global_parameters(), progress):
                    param.copy_(theta + step)
                averager.local_samples_accumulated, averager.local_times_accumulated = samples, times
                self.tracker.report_local_progress(self.local_epoch, samples)
            logger.info(f"took up the swarm's global parameters at epoch {self.local_epoch}")
        elif not self._resync_tries:
            logger.warning(
                "no peer served the swarm's global parameters at our epoch: the next state round "
                f"(every {self.average_state_every} outer steps) brings ours back in line"
            )

    def at_global_parameters(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Run a block with ``model`` at the global parameters θ (spot checks are asked there), then restore θ_i."""
        return parameters_set_to(self.state_averager.main_parameters, self._global_parameters())

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The outer optimizer (hivemind's, with the epoch), the inner one, and θ: the model holds θ_i."""
        return {
            "outer": super().state_dict(),
            "inner": self.inner.state_dict(),
            "inner_scheduler": self.inner_scheduler.state_dict() if self.inner_scheduler is not None else None,
            "global": [param.detach().clone() for param in self._global_parameters()],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"outer", "inner", "inner_scheduler", "global"}:
            raise ValueError(
                "not a DiLoCo optimizer state: the checkpoint is of HIVE_MODE=hivemind; resume it in "
                "that mode, or move it away to start DiLoCo afresh"
            )
        saved, ours = state_dict["global"], self._global_parameters()
        if len(saved) != len(ours) or any(s.shape != o.shape for s, o in zip(saved, ours)):
            raise ValueError("the checkpoint's global parameters do not fit the model")
        super().load_state_dict(state_dict["outer"])
        self.inner.load_state_dict(state_dict["inner"])
        if self.inner_scheduler is not None and state_dict["inner_scheduler"] is not None:
            self.inner_scheduler.load_state_dict(state_dict["inner_scheduler"])
        with torch.no_grad():
            for param, value in zip(ours, saved):
                param.copy_(value)
