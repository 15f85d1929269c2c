"""How similar are two honest answers to a gradient spot check, and how similar are cheats?

Builds the tiny GPT-2, trains it on the bundled corpus with the miner's optimizer settings
(AdamW, lr 6e-4 at peak, betas 0.9/0.95, weight decay 0.1, clip 1.0), and at two points
(``--stages``: after 10 and 60 steps by default) compares the validator's projection of a
challenge batch with answers computed

* honestly with a different thread count (1 vs the default),
* honestly under bf16 autocast on the CPU,
* by a model 1, 3 and 10 optimizer steps behind (a miner lagging one step / several epochs),
* for a different batch (a miner answering with work it already had),
* as Gaussian noise.

Every cosine is measured twice: raw, and centered on the validator's baseline (the mean
projected gradient of ``--references`` other batches, ``baseline_projection``). Prints
min / median / max per case and writes them as JSON (``--out``).
Run: ``.venv/bin/python bench/spot_check_threshold.py`` (about five minutes on 2 idle CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from hivetrain.data import iter_blocks, load_texts
from hivetrain.models import build_model
from hivetrain.protocol.projection import baseline_projection, cosine, projected_gradient
from hivetrain.protocol.spotcheck import SPOT_CHECK_THRESHOLD
from hivetrain.tokenizer import load_tokenizer

LAGS = (1, 3, 10)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[10, 60], help="optimizer steps at which to measure")
    parser.add_argument("--challenges", type=int, default=5, help="challenge batches per stage")
    parser.add_argument("--seeds", type=int, default=2, help="projection seeds per challenge batch")
    parser.add_argument("--references", type=int, default=4, help="batches averaged into the validator's baseline")
    parser.add_argument("--dim", type=int, default=64, help="projection size")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per challenge batch")
    parser.add_argument("--train-batch-size", type=int, default=32, help="samples per optimizer step")
    parser.add_argument("--lr", type=float, default=6e-4, help="AdamW learning rate (the miner's peak)")
    parser.add_argument("--out", default="bench/results/spot_check_threshold.json", help="where to write the JSON")
    return parser.parse_args(argv)


def batches(blocks, batch_size: int):
    """(B, T) batches cut from an iterator of (T,) blocks."""
    while len(group := list(itertools.islice(blocks, batch_size))) == batch_size:
        yield torch.stack(group)  # (B, T)


def train_with_snapshots(model, data, steps: int, lr: float, keep: set[int]) -> dict[int, torch.nn.Module]:
    """Train ``steps`` steps; return copies of the model after each step in ``keep`` (0 = untrained)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    snapshots = {0: copy.deepcopy(model)} if 0 in keep else {}
    model.train()
    for step in range(1, steps + 1):
        batch = next(data)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step in keep:
            snapshots[step] = copy.deepcopy(model)
    return snapshots


def measure_stage(
    snapshots: dict, step: int, challenges: list, others: list, references: list, seeds: int, dim: int
) -> dict:
    """Raw and centered cosines between the validator's answer at ``step`` and each kind of answer."""
    current = snapshots[step]
    cases: dict[str, dict[str, list[float]]] = {}
    default_threads = torch.get_num_threads()
    for seed in range(seeds):
        baseline = baseline_projection(current, references, seed, dim)
        for batch, other in zip(challenges, others):
            expected = projected_gradient(current, batch, seed, dim)
            torch.set_num_threads(1)
            answers = {"honest, 1 vs default threads": projected_gradient(current, batch, seed, dim)}
            torch.set_num_threads(default_threads)
            answers["honest, bf16 autocast"] = projected_gradient(
                current, batch, seed, dim, autocast_dtype=torch.bfloat16
            )
            for lag in LAGS:
                answers[f"lags by {lag} step{'s' if lag > 1 else ''}"] = projected_gradient(
                    snapshots[step - lag], batch, seed, dim
                )
            answers["answer for a different batch"] = projected_gradient(current, other, seed, dim)
            answers["noise"] = (
                torch.randn(dim, generator=torch.Generator().manual_seed(seed + 1000)) * expected.norm() / dim**0.5
            )
            for name, answer in answers.items():
                case = cases.setdefault(name, {"raw": [], "centered": []})
                case["raw"].append(cosine(expected, answer))
                case["centered"].append(cosine(expected - baseline, answer - baseline))
    return cases


def summarize(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def print_table(results: dict, dim: int) -> None:
    print(
        f"spot-check cosine to the validator's answer (dim {dim}, threshold {SPOT_CHECK_THRESHOLD}): min / median / max"
    )
    for stage, cases in results.items():
        print(f"\n{stage:36s}{'raw':>30s}{'centered on baseline':>30s}")
        for name, kinds in cases.items():
            cells = "".join(
                f"{kinds[k]['min']:>10.4f}{kinds[k]['median']:>10.4f}{kinds[k]['max']:>10.4f}"
                for k in ("raw", "centered")
            )
            print(f"{name:36s}{cells}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    model = build_model("tiny", seed=0)
    block_size = model.config.n_positions
    blocks = iter_blocks(load_texts(), load_tokenizer(), block_size)  # bundled corpus, file order
    challenge_data = batches(blocks, args.batch_size)
    challenges = [next(challenge_data) for _ in range(args.challenges)]
    others = [next(challenge_data) for _ in range(args.challenges)]
    references = [next(challenge_data) for _ in range(args.references)]
    keep = {s - lag for s in args.stages for lag in (0, *LAGS)}
    if min(keep) < 0:
        raise SystemExit(f"every stage needs at least {max(LAGS)} steps of history; got --stages {args.stages}")
    train_data = batches(blocks, args.train_batch_size)  # what follows: training never sees a challenge
    snapshots = train_with_snapshots(model, train_data, max(args.stages), args.lr, keep)

    results: dict[str, dict] = {}
    for step in args.stages:
        cases = measure_stage(snapshots, step, challenges, others, references, args.seeds, args.dim)
        results[f"step {step}"] = {
            name: {kind: summarize(v) for kind, v in values.items()} for name, values in cases.items()
        }
    print_table(results, args.dim)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"args": vars(args), "threshold": SPOT_CHECK_THRESHOLD, "torch": torch.__version__, "results": results},
            indent=2,
        )
    )
    print(f"wrote {out} in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
