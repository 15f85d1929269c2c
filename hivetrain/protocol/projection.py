"""The projection behind the gradient spot check, computed the same way by miner and validator.

``projected_gradient(model, batch, seed)`` is the LM-loss gradient at the model's current
parameters, projected to ``dim`` numbers by a random sign matrix drawn from ``seed``. The matrix
is generated on the CPU chunk by chunk (``PROJECTION_CHUNK`` elements per block, each block seeded
from the challenge seed and its index), so it is identical on every device and never held whole.
Changing any of it changes every answer: it is part of the protocol.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from typing import Iterable

import torch

#: Flattened gradient elements per generated block of the projection.
PROJECTION_CHUNK = 1 << 16


def projected_gradient(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seed: int,
    dim: int = 64,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The LM-loss gradient of ``input_ids`` at the model's current parameters, projected to ``(dim,)``.

    Labels are the inputs (the causal LM shifts them). Dropout is off while computing, and the
    parameters' ``.grad`` are left untouched. Deterministic given (parameters, batch, seed):
    the projection is drawn on the CPU, so a GPU miner and a CPU validator use the same matrix.
    """
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer (B, T) tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
    if dim < 1 or dim % 8:
        raise ValueError(f"dim must be a positive multiple of 8, got {dim}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters; unfreeze them (requires_grad=True) before a spot check"
        )
    device = params[0].device
    was_training = model.training
    model.eval()
    try:
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with amp:
            loss = model(input_ids=input_ids.to(device), labels=input_ids.to(device)).loss
        grads = torch.autograd.grad(loss, params)
    finally:
        model.train(was_training)
    flat = torch.cat([g.detach().reshape(-1).to("cpu", torch.float32) for g in grads])  # (n_params,)
    return _project(flat, seed, dim)


def _project(flat: torch.Tensor, seed: int, dim: int) -> torch.Tensor:
    """``R @ flat / sqrt(dim)`` with R a (dim, n) random +-1 matrix drawn block by block from ``seed``."""
    out = torch.zeros(dim, dtype=torch.float64)
    generator = torch.Generator(device="cpu")
    for index, start in enumerate(range(0, flat.numel(), PROJECTION_CHUNK)):
        block = flat[start : start + PROJECTION_CHUNK]  # (c,)
        generator.manual_seed(_block_seed(seed, index))
        packed = torch.empty((dim // 8, block.numel()), dtype=torch.uint8).random_(
            0, 256, generator=generator
        )  # (dim/8, c)
        ones = torch.empty(dim // 8, 8)  # (dim/8, 8): row 8*r + k of R is bit k of byte row r
        for bit in range(8):
            ones[:, bit] = ((packed >> bit) & 1).to(torch.float32) @ block  # one bit plane at a time: fast on CPU
        out += (2.0 * ones.reshape(dim) - block.sum()).double()  # sign = 2 * bit - 1, without building the signs
    return (out / math.sqrt(dim)).to(torch.float32)


def _block_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"hivetrain-projection/{seed}/{index}".encode()).digest()[:8], "little") & (
        2**63 - 1
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors; 0.0 when either is zero."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    denom = a.norm() * b.norm()
    return 0.0 if denom == 0 else float(a @ b / denom)


def baseline_projection(
    model: torch.nn.Module, reference_batches: Iterable[torch.Tensor], seed: int, dim: int = 64
) -> torch.Tensor:
    """The mean projected gradient of ``reference_batches`` (validator-chosen): the direction all batches share.

    Gradients of different batches share a large common component (the cosine of two answers
    for different batches reaches 0.9 on the tiny model), so comparing answers after subtracting
    this baseline separates "right batch" from "some batch" far better (measured in ``hivetrain.protocol.spotcheck``).
    """
    projections = [projected_gradient(model, batch, seed, dim) for batch in reference_batches]
    if not projections:
        raise ValueError("baseline_projection needs at least one reference batch")
    return torch.stack(projections).mean(dim=0)  # (dim,)
