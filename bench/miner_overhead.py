"""Miner overhead: tokens/s of the miner's step with hivemind.Optimizer over a plain PyTorch loop.

One process, one peer (nobody to average with). Each preset builds identical models, one driven by a
plain ``torch.optim.AdamW`` (the miner's two param groups, lr, betas, clipping to 1.0) and one per
hivemind mode, all from ``hivetrain.miner.optim.make_optimizer``:

* ``accumulate``: the miner's default gradient mode with target_batch_size far away, so a step only
  accumulates gradients and reports progress (the brief's case; the AdamW step is deferred to the epoch);
* ``epoch``: target_batch_size = batch_size, so every step ends an epoch alone: accumulate, load into
  the optimizer, AdamW, tracker update, background matchmaking (the amortised worst case);
* ``local``: use_local_updates, AdamW every step through hivemind's state averager;
* ``accumulate-copy``, ``epoch-copy`` (``--modes``): the first two with ``reuse_grad_buffers`` off, as
  the miner ran before: every step's gradients copied into hivemind's accumulators.

The plain loop and the modes run in interleaved blocks (the order rotates every repeat) on the same
fixed batches, so load from other processes hits them alike; the ratio is computed per repeat and
reported as median [min, max]. On CUDA the seed preset also runs in bf16 with and without
torch.compile; on a CPU-only machine those rows are skipped with a note.

Run: ``.venv/bin/python -m bench.miner_overhead`` (about two minutes on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import hivemind
import torch

from bench.common import exit_on_sigterm, spread, table, write_result
from hivetrain.log import get_logger
from hivetrain.miner.optim import make_optimizer
from hivetrain.models import build_model
from hivetrain.protocol.training import param_groups
from hivetrain.settings import MinerSettings

logger = get_logger("bench.miner_overhead")

PRESETS = {  # preset -> (batch size, block size, steps per block); seed is kept small for a CPU
    "tiny": (4, 64, 6),
    "seed": (1, 128, 2),
}
MODES = ("accumulate", "epoch", "local")
#: The same modes with HIVE_REUSE_GRAD_BUFFERS=false: each step's gradients copied into hivemind's accumulators.
COPY_MODES = ("accumulate-copy", "epoch-copy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES + COPY_MODES))
    parser.add_argument("--repeats", type=int, default=0, help="interleaved repeats per preset; 0 = 4 (tiny), 3 (seed)")
    parser.add_argument("--steps", type=int, default=0, help="steps per timed block; 0 = the preset's default")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/miner_overhead.json)")
    return parser.parse_args(argv)


class Runner:
    """One model and its optimizer; ``block(steps)`` trains that many steps and returns the time spent."""

    def __init__(self, name: str, model, opt, clip: float, device: torch.device, autocast, compiled: bool = False):
        self.name, self.model, self.opt, self.clip, self.device = name, model, opt, clip, device
        self.autocast = autocast
        self.train_model = torch.compile(model) if compiled else model
        self.opt_time = 0.0

    def step(self, batch: torch.Tensor) -> float:
        with self.autocast():
            loss = self.train_model(input_ids=batch, labels=batch).loss
        loss.backward()
        started = time.perf_counter()
        if self.clip and isinstance(self.opt, torch.optim.AdamW):  # the miner clips inside ClippedAdamW
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad()
        value = loss.item()  # the miner's sync point
        self.opt_time += time.perf_counter() - started
        return value

    def block(self, batches: list[torch.Tensor], steps: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(steps):
            self.step(batches[i % len(batches)])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


def miner_settings(preset: str, mode: str, batch_size: int, block_size: int) -> MinerSettings:
    base = mode.removesuffix("-copy")
    return MinerSettings(
        preset=preset,
        run_id=f"bench-overhead-{preset}-{mode}",
        batch_size=batch_size,
        block_size=block_size,
        target_batch_size=batch_size if base == "epoch" else 10_000_000,
        use_local_updates=base == "local",
        reuse_grad_buffers=not mode.endswith("-copy"),
        matchmaking_time=2.0,
        averaging_timeout=10.0,
        warmup_epochs=0,
    )


def measure(
    preset: str,
    modes: list[str],
    repeats: int,
    steps: int,
    device: torch.device,
    bf16: bool = False,
    compiled: bool = False,
) -> dict:
    batch_size, block_size, default_steps = PRESETS[preset]
    steps = steps or default_steps
    settings = miner_settings(preset, "plain", batch_size, block_size)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50257, (batch_size, block_size), generator=generator).to(device) for _ in range(4)]
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if bf16 and device.type == "cuda"
        else contextlib.nullcontext
    )
    setup_started = time.perf_counter()
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    runners: list[Runner] = []
    try:
        model = build_model(preset, seed=settings.seed).to(device)
        plain = torch.optim.AdamW(
            param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95), fused=True
        )  # as the miner
        runners.append(Runner("plain", model, plain, settings.grad_clip, device, autocast, compiled))
        for mode in modes:
            mode_settings = miner_settings(preset, mode, batch_size, block_size)
            model = build_model(preset, seed=settings.seed)
            opt = make_optimizer(model, dht, mode_settings)  # averagers fork here, before the model moves
            model.to(device)
            runners.append(Runner(mode, model, opt, 0.0, device, autocast, compiled))
        for runner in runners:  # warm-up: allocator, first optimizer state, compilation
            runner.block(batches, 2)
        logger.info(f"{preset}: set up and warmed up in {time.perf_counter() - setup_started:.1f}s")
        # step-level interleaving: each step of a repeat runs every runner once, in a rotating order,
        # so a burst of load from other processes lands on all of them alike
        times: dict[str, list[float]] = {r.name: [] for r in runners}
        for repeat in range(repeats):
            spent = {r.name: 0.0 for r in runners}
            for i in range(steps):
                shift = (repeat * steps + i) % len(runners)
                for runner in runners[shift:] + runners[:shift]:
                    spent[runner.name] += runner.block(batches[i % len(batches) :], 1)
            for name, value in spent.items():
                times[name].append(value)
        tokens = steps * batch_size * block_size
        result = {
            "batch_size": batch_size,
            "block_size": block_size,
            "steps_per_block": steps,
            "repeats": repeats,
            "device": str(device),
            "bf16": bf16,
            "compile": compiled,
            "tokens_per_s": {},
            "ratio": {},
            "opt_step_ms": {},
            "epochs": {},
        }
        for runner in runners:
            result["tokens_per_s"][runner.name] = spread([tokens / t for t in times[runner.name]])
            result["opt_step_ms"][runner.name] = 1000 * runner.opt_time / (repeats * steps + 2)
            if runner.name != "plain":
                result["epochs"][runner.name] = runner.opt.local_epoch
                result["ratio"][runner.name] = spread([p / t for p, t in zip(times["plain"], times[runner.name])])
        return result
    finally:
        for runner in runners:
            if isinstance(runner.opt, hivemind.Optimizer):
                runner.opt.shutdown()
        dht.shutdown()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [(preset, torch.device("cpu"), False, False) for preset in args.presets]
    notes = []
    if torch.cuda.is_available():
        configs += [
            (preset, torch.device("cuda"), True, compiled) for preset in args.presets for compiled in (False, True)
        ]
    else:
        notes.append(
            "CUDA rows (bf16 autocast with and without torch.compile) skipped: torch.cuda.is_available() is False"
        )
    results, rows = [], []
    for preset, device, bf16, compiled in configs:
        repeats = args.repeats or {"tiny": 4, "seed": 3}[preset]
        result = measure(preset, args.modes, repeats, args.steps, device, bf16, compiled)
        result["preset"] = preset
        results.append(result)
        label = f"{preset} {device.type}" + (" bf16" if bf16 else "") + (" compile" if compiled else "")
        plain = result["tokens_per_s"]["plain"]["median"]
        for mode in args.modes:
            ratio = result["ratio"][mode]
            rows.append(
                [
                    label,
                    f"B={result['batch_size']} T={result['block_size']}",
                    mode,
                    plain,
                    result["tokens_per_s"][mode]["median"],
                    ratio["median"],
                    f"[{ratio['min']:.3f}, {ratio['max']:.3f}]",
                    result["opt_step_ms"]["plain"],
                    result["opt_step_ms"][mode],
                ]
            )
    print(
        table(
            [
                "config",
                "batch",
                "hivemind mode",
                "plain tok/s",
                "hivemind tok/s",
                "ratio (median)",
                "ratio [min, max]",
                "plain opt ms/step",
                "hivemind opt ms/step",
            ],
            rows,
        )
    )
    for note in notes:
        print(f"note: {note}")
    path = write_result(
        "miner_overhead",
        {"threads": torch.get_num_threads(), "results": results, "notes": notes, "goal": "ratio >= 0.97"},
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
