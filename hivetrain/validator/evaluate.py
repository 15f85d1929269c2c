"""Held-out loss and perplexity of the shared model on fixed validation blocks."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> tuple[float, float]:
    """Mean next-token loss over ``blocks`` (N, T) and its perplexity; the same blocks every time."""
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty (N, T) tensor, got {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)  # (B, T)
            loss = model(input_ids=batch, labels=batch).loss
            tokens = batch.shape[0] * (batch.shape[1] - 1)  # the causal LM predicts T-1 tokens per block
            total += loss.item() * tokens
            count += tokens
    finally:
        model.train(was_training)
    mean = total / count
    return mean, math.exp(min(mean, 50.0))
