"""hivemind.Optimizer as the miner uses it: AdamW with decay groups, warmup, clipping, round tracking."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import hivemind
import numpy as np
import torch
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization
from hivemind.compression import serialization as hivemind_serialization
from hivemind.optim.state_averager import TrainingStateAverager

from hivetrain.settings import MinerSettings

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


COMPRESSIONS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "8bit": Uniform8Bit,
}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; biases, LayerNorm weights (all 1-d tensors) do not.

    Tied weights (GPT-2's wte and lm_head) appear once, as ``model.parameters()`` lists them.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the gradient it is about to apply: the swarm-averaged one in gradient mode."""

    def __init__(self, params, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_grad_norm > 0:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)


def warmup_schedule(warmup_epochs: int) -> Callable[[int], float]:
    """LR multiplier per global epoch: linear from 1/(warmup+1) to 1, then constant."""
    def multiplier(epoch: int) -> float:
        return min(1.0, (epoch + 1) / (warmup_epochs + 1))

    return multiplier


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


class CopyingStateAverager(TrainingStateAverager):
    """TrainingStateAverager that hands peers copies of its CPU tensors, not the live ones.

    hivemind sends the state a peer downloads through a multiprocessing pipe, and pickling a CPU
    tensor moves its storage into shared memory in place, freeing the old buffer. On CPU,
    ``param.cpu()`` is the parameter itself, so a peer downloading our state while we train freed
    memory under our own forward pass: the miner segfaulted in libtorch_cpu (seen with 4 CPU miners,
    a late joiner loading state). On GPU, ``.cpu()`` already copies, so this costs nothing there.
    """

    @classmethod
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        # RPC names carry the class name: keep hivemind's, so plain hivemind peers (and our validator) can download from us
        return TrainingStateAverager._get_handle_name(namespace, method_name)

    def get_current_state(self):
        with self.lock_optimizer:  # no background optimizer step halfway through the copy
            metadata, tensors, infos = super().get_current_state()
            tensors = [t.clone() if t.device.type == "cpu" else t for t in tensors]
        return metadata, tensors, infos


class TrackedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that reports every gradient-averaging round (epoch, group, duration) to ``on_round``."""

    def __init__(self, *args, on_round: Callable[[RoundInfo], None] | None = None, **kwargs):
        self._on_round = on_round or (lambda info: None)
        self._round_epoch = 0
        self._round_started = time.perf_counter()
        super().__init__(*args, **kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # hivemind.Optimizer._make_state_averager, with the copying averager (see CopyingStateAverager)
        return CopyingStateAverager(
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
    (group size only: hivemind does not expose the group's peer ids there).
    """

    _AVERAGED = re.compile(r"Averaged parameters with (\d+) peers")
    _FAILED = re.compile(r"Averaging failed with")

    def __init__(self, epoch: Callable[[], int], on_round: Callable[[RoundInfo], None]):
        super().__init__(level=logging.DEBUG)
        self._epoch, self._on_round = epoch, on_round

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if match := self._AVERAGED.search(message):
            size = int(match.group(1))
            self._on_round(RoundInfo(epoch=self._epoch(), kind="state", group=(), group_size=size, duration_s=0.0, success=True))
        elif self._FAILED.search(message):
            self._on_round(RoundInfo(epoch=self._epoch(), kind="state", group=(), group_size=0, duration_s=0.0, success=False))


def make_optimizer(model: torch.nn.Module, dht: hivemind.DHT, settings: MinerSettings,
                   on_round: Callable[[RoundInfo], None] | None = None) -> TrackedOptimizer:
    """hivemind.Optimizer over ``model`` configured from ``settings``; averagers fork here."""
    install_codecs()
    compression = COMPRESSIONS[settings.grad_compression]
    state_compression = COMPRESSIONS[settings.state_compression]
    clip, lr, betas = settings.grad_clip, settings.lr, (0.9, 0.95)
    return TrackedOptimizer(
        dht=dht,
        run_id=settings.run_id,
        params=param_groups(model, settings.weight_decay),
        # fused: one kernel for all tensors; torch's default CPU AdamW loops tensor by tensor (9x slower, BENCHMARKS.md)
        optimizer=lambda params: ClippedAdamW(params, max_grad_norm=clip, lr=lr, betas=betas, fused=True),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_schedule(settings.warmup_epochs)),
        target_batch_size=settings.target_batch_size,
        batch_size_per_step=settings.batch_size,
        matchmaking_time=settings.matchmaking_time,
        averaging_timeout=settings.averaging_timeout,
        load_state_timeout=settings.load_state_timeout,
        delay_grad_averaging=settings.delay_grad_averaging,
        delay_optimizer_step=settings.delay_optimizer_step,
        delay_state_averaging=settings.delay_state_averaging,
        offload_optimizer=settings.offload_optimizer,
        average_state_every=settings.average_state_every,
        use_local_updates=settings.use_local_updates,
        grad_compression=compression(),
        state_averaging_compression=state_compression(),
        load_state_compression=state_compression(),
        # request_timeout below min_matchmaking_time avoids hivemind's deadlock warning (and the deadlock)
        averager_opts=dict(request_timeout=min(3.0, settings.matchmaking_time / 2)),
        tracker_opts=dict(min_refresh_period=0.5, max_refresh_period=5.0),
        verbose=True,
        on_round=on_round,
    )
