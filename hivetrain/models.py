"""Model presets as functions, and the seeded construction every miner shares."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel

GPT2_VOCAB_SIZE = 50257


def seed_gpt2() -> GPT2Config:
    """The original HiveMiner miner's GPT-2: 2 layers, 2 heads, n_embd 512, 512 positions (32.3M parameters)."""
    return GPT2Config(
        vocab_size=GPT2_VOCAB_SIZE,
        n_embd=512,
        n_positions=512,
        n_ctx=512,
        n_layer=2,
        n_head=2,
        n_inner=2048,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        layer_norm_epsilon=1e-5,
        initializer_range=0.05,
        bos_token_id=50256,
        eos_token_id=50256,
    )


def tiny_gpt2() -> GPT2Config:
    """The seed model shrunk for CPU tests: same vocabulary and tokenizer, 64-wide, 64 positions (3.3M parameters)."""
    config = seed_gpt2()
    config.n_embd, config.n_inner = 64, 256
    config.n_positions = config.n_ctx = 64
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return config


PRESETS: dict[str, Callable[[], GPT2Config]] = {"seed": seed_gpt2, "tiny": tiny_gpt2}


def model_config(preset: str) -> GPT2Config:
    """The config of a named preset; ValueError listing the choices otherwise."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]()


def build_model(preset: str, seed: int = 0) -> GPT2LMHeadModel:
    """The preset's model, initialised from ``seed`` so every miner of a run starts from the same weights."""
    config = model_config(preset)
    devices = []  # fork_rng on CPU only: never touch CUDA before hivemind forks its children
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # named, or transformers warns that it guessed
    return model


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
