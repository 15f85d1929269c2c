"""What an audit of a gradient round costs the validator, and how far apart honest and negated parts land.

For each preset (``--presets``) and number of blocks a sender declares (``--blocks``):

* **cost**: the validator's CPU seconds for one audit (``declared_gradient``: forward and backward over the
  declared blocks, dropout off) against a baseline run in the same process, the miner's own forward and backward
  over the same blocks in steps of ``--batch`` (the work the audit repeats). Median of ``--repeats``.
* **agreement**: what a reducer's cosine would be for an honest sender, the way the audit takes it: three
  "senders" each accumulate the mean gradient of their own blocks as a miner does (train mode: the seed preset's
  dropout on), the vector is cut into 4 partitions, each "reducer" draws 4096 candidates and names the 16 where
  the three senders' mean is largest; the cosine is that of the first sender's values there with the validator's
  recomputation (eval mode). A negated sender scores the opposite. min / median over ``--trials`` x 4 partitions.

Run: ``.venv/bin/python bench/audits.py`` (a few minutes on 2 CPU cores; ``--presets tiny`` for a quick look).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bench.common import spread, table, write_result
from hivetrain.data import BUNDLED_DATASET, BlockStream
from hivetrain.models import build_model, model_config
from hivetrain.tokenizer import load_tokenizer
from hivetrain.validator.audits import AUDIT_FLOOR, averaged_parameters, declared_gradient

CANDIDATES, NAMED, PARTITIONS = 4096, 16, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "seed"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 64], help="blocks a sender declares")
    parser.add_argument("--batch", type=int, default=8, help="blocks per step (the miner) and per pass (the audit)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3, help="rounds of three senders per preset, for agreement")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def miner_gradient(model, stream, first: int, blocks: int, batch: int) -> torch.Tensor:
    """What a miner's gradient averager sends: the mean of its per-step gradients, trained with dropout on."""
    params = averaged_parameters(model)
    total = [torch.zeros_like(p) for p in params]
    model.train()
    steps = range(first, first + blocks, batch)
    for start in steps:
        input_ids = stream.get_batch(start, min(batch, first + blocks - start))
        for acc, grad in zip(total, torch.autograd.grad(model(input_ids=input_ids, labels=input_ids).loss, params)):
            acc += grad / len(steps)
    model.eval()
    return torch.cat([t.reshape(-1) for t in total])


def cost(model, stream, blocks: int, batch: int, repeats: int) -> dict:
    audit, miner = [], []
    for repeat in range(repeats):
        first = 1000 * repeat
        started = time.process_time()
        miner_gradient(model, stream, first, blocks, batch)
        miner.append(time.process_time() - started)
        started = time.process_time()
        declared_gradient(model, stream, first, blocks, batch)
        audit.append(time.process_time() - started)
    return {
        "audit_cpu_s": spread(audit),
        "miner_cpu_s": spread(miner),
        "ratio": statistics.median(a / m for a, m in zip(audit, miner)),
    }


def agreement(model, stream, blocks: int, batch: int, trials: int) -> dict:
    honest, negated = [], []
    rng = random.Random(0)
    for trial in range(trials):
        firsts = [5000 * trial + 400 * k for k in range(3)]
        sent = [miner_gradient(model, stream, first, blocks, batch) for first in firsts]
        aggregate = torch.stack(sent).mean(dim=0)
        recomputed = declared_gradient(model, stream, firsts[0], blocks, batch)
        size = recomputed.numel() // PARTITIONS
        for part in range(PARTITIONS):
            start = part * size
            candidates = torch.tensor(sorted(rng.sample(range(start, start + size), CANDIDATES)))
            named = candidates[torch.topk(aggregate[candidates].abs(), NAMED).indices]
            expected, received = recomputed[named].double(), sent[0][named].double()
            cosine = float(expected @ received / (expected.norm() * received.norm()))
            honest.append(cosine)
            negated.append(-cosine)
    return {"honest": spread(honest), "negated": spread(negated), "below_floor": sum(c <= AUDIT_FLOOR for c in honest)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    results, rows = {}, []
    for preset in args.presets:
        block_size = model_config(preset).n_positions
        stream = BlockStream(BUNDLED_DATASET, "train", "text", tokenizer, block_size, num_shards=1, shard=0, seed=0)
        model = build_model(preset, seed=0)
        for blocks in args.blocks:
            found = {**cost(model, stream, blocks, args.batch, args.repeats)}
            found.update(agreement(model, stream, blocks, args.batch, args.trials))
            results[f"{preset}/{blocks}"] = found
            rows.append(
                [
                    preset,
                    blocks,
                    found["audit_cpu_s"]["median"],
                    found["miner_cpu_s"]["median"],
                    found["ratio"],
                    found["honest"]["min"],
                    found["honest"]["median"],
                    found["negated"]["max"],
                ]
            )
            print(rows[-1], flush=True)
    headers = ["preset", "blocks", "audit CPU s", "miner CPU s", "ratio", "honest min", "honest median", "negated max"]
    print(table(headers, rows))
    print(write_result("audits", {"args": vars(args), "results": results}, args.out))


if __name__ == "__main__":
    main()
