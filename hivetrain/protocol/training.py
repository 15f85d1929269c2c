"""The training state miners share and validators download: its layout must match on both sides.

hivemind's state averager sends parameters and optimizer statistics tensor by tensor in the
order of the optimizer's parameter groups, so a validator that downloads state must build the
same groups and the same optimizer class as the miners that serve it. Wire formats of tensors
(``COMPRESSIONS``) are agreed here too: hivemind's public codecs. A process that averages must
decode "8bit" with ``hivetrain.hivemind_compat.install_codecs`` (hivemind's own decoder fails under
NumPy 2); the wire format is the same.
"""

from __future__ import annotations

from typing import Callable

import torch
from hivemind.compression import (
    CompressionBase,
    Float16Compression,
    NoCompression,
    RoleAdaptiveCompression,
    Uniform8BitQuantization,
)

from hivetrain.log import get_logger

__all__ = [
    "COMPRESSIONS",
    "ClippedAdamW",
    "OuterSGD",
    "SharedRounding8Bit",
    "param_groups",
    "shared_optimizer",
    "state_download_compression",
]

logger = get_logger(__name__)


class SharedRounding8Bit(Uniform8BitQuantization):
    """8-bit all-reduce in which every member of a round applies the same average, to the bit.

    With hivemind's 8-bit, a reducer answers each sender with (average - that sender's part), quantized
    for that sender, and the sender adds it to its own part: each peer keeps its own rounding error, so
    peers that averaged together leave the round with different results (DiLoCo's global parameters
    drifted apart, and honest spot checks failed). With this format a reducer quantizes its averaged
    partition once, every sender receives those same bytes and takes the dequantized average itself,
    and the reducer applies it too (``hivetrain.hivemind_compat.allreduce``). The wire format of parts
    is UNIFORM_8BIT as with "8bit"; averagers of this format meet only each other (their own prefix),
    since they read an answer as an average, not a difference.
    """


#: Tensor wire formats by their setting name (``HIVE_GRAD_COMPRESSION``, ``HIVE_STATE_COMPRESSION``).
COMPRESSIONS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "8bit": Uniform8BitQuantization,  # UNIFORM_8BIT on the wire, decoded by hivemind_compat's Uniform8Bit
    "8bit-shared": SharedRounding8Bit,  # the same on the wire; every peer applies one rounding of the average
}


def state_download_compression(name: str) -> CompressionBase:
    """How a peer serves its state to a joiner: parameters in the ``name`` format, optimizer statistics exact.

    Adam's second moments span many orders of magnitude: 8-bit (one codebook of 256 values per
    tensor) or fp16 (underflow below 6e-8) turn the small ones into wrong, often lr-sized steps,
    so a joiner that loaded them stepped away from the swarm at its first epoch (measured: its
    update's cosine with the server's was 0.52 in 8-bit). They are sent once per join.
    """
    return RoleAdaptiveCompression(optimizer=NoCompression(), default=COMPRESSIONS[name]())


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
    """AdamW that clips the gradient it is about to apply (the swarm-averaged one in gradient mode)
    and skips a step whose gradient is not finite.

    Clipping does not stop NaN: one NaN in an averaged gradient would make every parameter NaN.
    A skipped step leaves parameters and statistics as they were; ``skipped_steps`` counts them.
    """

    def __init__(self, params, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.skipped_steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if not torch.isfinite(norm):
                self.skipped_steps += 1
                logger.warning(
                    f"skipping an optimizer step: the gradient norm is {float(norm)} "
                    f"({self.skipped_steps} skipped so far)"
                )
                return None
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        return super().step(closure)


class OuterSGD(torch.optim.SGD):
    """DiLoCo's outer optimizer: SGD with Nesterov momentum on the swarm's averaged pseudo-gradient.

    A step whose pseudo-gradient is not finite is skipped (``skipped_steps`` counts them): momentum
    would carry one NaN into every later step.
    """

    def __init__(self, params, lr: float = 0.7, momentum: float = 0.9):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
        self.skipped_steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self.skipped_steps += 1
            logger.warning(f"skipping an outer step: the pseudo-gradient is not finite ({self.skipped_steps} skipped)")
            return None
        return super().step(closure)


def shared_optimizer(mode: str) -> Callable[[list[dict]], torch.optim.Optimizer]:
    """The optimizer class whose state peers share in ``mode`` (a validator builds it to download that state).

    gradient averaging and local updates share AdamW's statistics; DiLoCo shares the outer optimizer's
    momentum (its parameters are the global ones, not a miner's inner ones).
    """
    if mode == "diloco":
        return lambda params: OuterSGD(params)
    return lambda params: ClippedAdamW(params, lr=1e-3)
