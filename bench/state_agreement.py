"""How far apart are two honest peers' states, and how far are plausible wrong ones (``state_distance``)?

Trains the tiny GPT-2 on the bundled corpus with the miner's optimizer (ClippedAdamW, betas 0.9/0.95,
weight decay 0.1 on matrices, clip 1.0, the peak learning rate throughout: the largest honest steps) as the
swarm's trajectory (one averaged batch per epoch), and at each stage measures ``state_distance`` to the
swarm's state of

* a peer at the same epoch whose round failed (it stepped with its own quarter of the batch),
* peers 1 and 2 epochs behind,
* the state after an 8-bit / fp16 round trip (``HIVE_STATE_COMPRESSION``),
* a peer in ``use_local_updates`` mode k local steps into an epoch beside another (each on its own batches),
* the swarm one DiLoCo outer step later (``--inner-steps`` local steps, outer Nesterov SGD at lr 0.7),

and of the wrong states: a random init of another seed, the state + 0.5σ / 0.25σ Gaussian noise (σ: each
tensor's own standard deviation), and the state with one MLP matrix replaced by another seed's.
Prints one line per case, one column per stage, and writes JSON (``--out``).
Run: ``.venv/bin/python -m bench.state_agreement`` (about a minute and a half on 2 idle CPU cores).

Measured (2 CPU cores; stages 3 / 10 / 40; lr 6e-4, lr 1e-3 in brackets), largest over the stages: honest at
the same epoch after a failed round 0.011 [0.018]; 1 / 2 epochs behind 0.031 / 0.062 [0.042 / 0.084]; 8-bit
round trip 0.021; fp16 0.0003; use_local_updates peers 5 / 20 steps apart 0.039 / 0.16 [0.061 / 0.27]; one
DiLoCo outer step of one peer, 10 inner steps 0.34 [0.63], 50 inner steps (``--inner-steps 50 --stages 3 10``)
0.97. Wrong states: random init of another seed 1.41, one MLP matrix of another seed 1.41, +0.5σ noise 0.45,
+0.25σ noise 0.24. Hence ``AGREE_TOL`` 0.15 (agreeing states are at most one epoch apart: 3.6x the largest
gradient-mode distance there, 0.042, and 2.4x that plus an 8-bit round trip; 3x below +0.5σ noise) and
``NAME_TOL`` 1.2 (above every honest figure, below a random init).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time

import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

from bench.common import RESULTS, machine
from hivetrain.data import iter_blocks, load_texts
from hivetrain.hivemind_compat import install_codecs
from hivetrain.hivemind_compat.agreement import AGREE_TOL, state_distance
from hivetrain.models import build_model
from hivetrain.protocol.training import COMPRESSIONS, ClippedAdamW, OuterSGD, param_groups
from hivetrain.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[3, 10, 40], help="epochs at which to measure")
    parser.add_argument("--batch-size", type=int, default=16, help="samples the swarm averages per epoch")
    parser.add_argument("--lr", type=float, default=6e-4, help="AdamW learning rate (the miner's peak)")
    parser.add_argument("--inner-steps", type=int, default=10, help="DiLoCo local steps per outer step")
    parser.add_argument("--out", default=str(RESULTS / "state_agreement.json"), help="where to write the JSON")
    return parser.parse_args(argv)


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for group in param_groups(model, 0.0) for p in group["params"]]


def optimizer_for(model, lr: float) -> ClippedAdamW:
    return ClippedAdamW(param_groups(model, 0.1), max_grad_norm=1.0, lr=lr, betas=(0.9, 0.95))


def step(model, optimizer, batch) -> None:
    optimizer.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()


def local_steps(model, optimizer, data, steps: int, batch_size: int) -> list[torch.Tensor]:
    """The parameters of a copy of (model, optimizer) after ``steps`` steps on its own batches."""
    model, optimizer_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    optimizer = optimizer_for(model, optimizer.param_groups[0]["lr"])
    optimizer.load_state_dict(optimizer_state)
    for _ in range(steps):
        step(model, optimizer, next(data)[:batch_size])
    return params(model)


def noisy(state: list[torch.Tensor], sigmas: float, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [t + sigmas * t.std() * torch.randn(t.shape, generator=generator) if t.numel() > 1 else t for t in state]


def round_trip(state: list[torch.Tensor], name: str) -> list[torch.Tensor]:
    codec = COMPRESSIONS[name]()
    return [deserialize_torch_tensor(codec.compress(t, CompressionInfo.from_tensor(t))) for t in state]


def outer_step(model, lr: float, data, inner_steps: int, batch_size: int) -> list[torch.Tensor]:
    """The global parameters one DiLoCo outer step after ``model``'s."""
    theta = params(model)
    inner = local_steps(model, optimizer_for(model, lr), data, inner_steps, batch_size)
    moved = [torch.nn.Parameter(t.clone()) for t in theta]
    outer = OuterSGD(moved)
    for param, start, end in zip(moved, theta, inner):
        param.grad = start - end  # the pseudo-gradient (one peer's: the average of many is smaller)
    outer.step()
    return [p.detach() for p in moved]


def measure(args, model, optimizer, before, history, data) -> dict[str, float]:
    """Each case's distance to the swarm's state (``history[-1]``); ``before``: (model, optimizer) an epoch back."""
    swarm = history[-1]
    other_seed = params(build_model("tiny", seed=7))
    fell_back = local_steps(*before, data, 1, args.batch_size // 4)
    one_layer = [t.clone() for t in swarm]
    index = next(i for i, t in enumerate(swarm) if t.shape == (model.config.n_embd, model.config.n_inner))  # c_fc
    one_layer[index] = other_seed[index]
    cases = {
        "honest: same epoch, its round failed": state_distance(swarm, fell_back),
        "honest: 1 epoch behind": state_distance(swarm, history[-2]),
        "honest: 2 epochs behind": state_distance(swarm, history[-3]),
        "honest: 8-bit round trip": state_distance(swarm, round_trip(swarm, "8bit")),
        "honest: fp16 round trip": state_distance(swarm, round_trip(swarm, "fp16")),
        "honest: one DiLoCo outer step later": state_distance(
            swarm, outer_step(model, args.lr, data, args.inner_steps, args.batch_size // 4)
        ),
        "wrong: random init, another seed": state_distance(swarm, other_seed),
        "wrong: + 0.5 sigma noise": state_distance(swarm, noisy(swarm, 0.5, 1)),
        "wrong: + 0.25 sigma noise": state_distance(swarm, noisy(swarm, 0.25, 2)),
        "wrong: one MLP matrix of another seed": state_distance(swarm, one_layer),
    }
    for k in (1, 5, 20):
        a = local_steps(model, optimizer, data, k, args.batch_size // 4)
        b = local_steps(model, optimizer, data, k, args.batch_size // 4)
        cases[f"honest: local updates, {k} steps each"] = state_distance(a, b)
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_codecs()
    torch.manual_seed(0)
    started = time.time()
    model = build_model("tiny", seed=0)
    model.train()
    optimizer = optimizer_for(model, args.lr)
    blocks = iter_blocks(load_texts(), load_tokenizer(), model.config.n_positions)
    data = iter(lambda: torch.stack(list(itertools.islice(blocks, args.batch_size))), None)
    history = [params(model)]  # the swarm's parameters per epoch
    results: dict[int, dict[str, float]] = {}
    for epoch in range(1, max(args.stages) + 1):
        peer = copy.deepcopy(model)  # a peer's copy, an epoch back
        before = (peer, optimizer_for(peer, args.lr))
        before[1].load_state_dict(copy.deepcopy(optimizer.state_dict()))
        step(model, optimizer, next(data))
        history.append(params(model))
        if epoch in args.stages:
            results[epoch] = measure(args, model, optimizer, before, history, data)
    names = list(next(iter(results.values())))
    print(f"state_distance to the swarm's state (AGREE_TOL {AGREE_TOL}, lr {args.lr}), at epochs {args.stages}")
    for name in names:
        values = [results[e][name] for e in args.stages]
        print(f"{name:44s}" + "".join(f"{v:>9.4f}" for v in values))
    out = {"args": vars(args), "machine": machine(), "seconds": time.time() - started, "results": results}
    with open(args.out, "w") as file:
        json.dump(out, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
