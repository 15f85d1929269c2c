"""Training modes compared at equal samples: held-out loss, bytes sent per trained sample, utilization.

Modes (a swarm of ``--miners`` tiny miners on the bundled corpus, the same init seed, each run
until the swarm has trained ``--samples`` samples, then stopped: SIGTERM, final checkpoints):

* ``gradient``:      hivemind's gradient averaging, the tiny preset (target 96, parameters averaged each epoch);
* ``local_updates``: AdamW every batch, parameters averaged each epoch;
* ``diloco``:        HIVE_MODE=diloco, ``--inner-steps`` inner AdamW steps per outer Nesterov step, exact
                     pseudo-gradients;
* ``diloco_8bit``:   the same with 8-bit pseudo-gradients on the wire (parameters in state rounds exact);
* ``diloco_8bit_2h``: the same with twice the inner steps (INTELLECT-1's recipe at H = 100: int8, longer periods);
* ``diloco_shared``, ``diloco_shared_2h``: the same two with ``8bit-shared`` (DiLoCo's default: one rounding of
                     the average, applied by every member; the same bytes on the wire as 8-bit);
* ``ddp``:           an all-reduce of gradients after every local step (target = miners x batch), no
                     parameter averaging: what torch DDP sends.

Bytes are measured on the wire: the loopback interface's sent-bytes counter over the run (each
byte counted once, as sent), less the background rate measured just before; the loopback also
carries DHT records, Redis telemetry and heartbeats, which every mode pays alike. Samples come from
the miners' signed step records. Utilization is ``bench.swarm_runs.per_miner``'s: the share of
wall time a miner spent computing, by the miner's own timers (``StepRecord.compute_s``).

Held-out loss: every checkpoint of miner 0 is evaluated on the validation split (the validator's
``evaluate`` on the first ``--eval-blocks`` blocks); in DiLoCo mode at the global parameters its
checkpoint keeps. The swarm's samples at a checkpoint are miner 0's samples times the miners (they
train at the same pace). Losses are compared at the largest sample count every mode reached
(interpolated). Data shards follow from random hotkeys and a random salt per run (noted per run).

Run: ``.venv/bin/python -m bench.modes`` (about 20 minutes on 2 cores); writes
``bench/results/modes.json`` and ``bench/results/modes-loss-vs-samples.png``, ``modes-loss-vs-bytes.png``.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.common import RESULTS, exit_on_sigterm, table, write_result
from bench.plots import COLOUR_NAMES, plot
from bench.swarm_runs import background_lo_rate, lo_bytes, per_miner, tiny_swarm
from hivetrain.models import build_model, model_config
from hivetrain.protocol.checkpoints import list_checkpoints, read_trainer_state
from hivetrain.protocol.records import Keys, RoundRecord, StepRecord
from hivetrain.protocol.training import param_groups
from hivetrain.settings import domain_of
from hivetrain.store import connect_redis, read_stream
from hivetrain.tokenizer import load_tokenizer
from hivetrain.validator.evaluate import evaluate

BATCH = 4  # the tiny preset's
TINY_TARGET = 96


def modes(miners: int, inner_steps: int) -> dict[str, dict[str, str]]:
    diloco = {"HIVE_MODE": "diloco", "HIVE_INNER_STEPS": str(inner_steps)}
    longer = {"HIVE_MODE": "diloco", "HIVE_INNER_STEPS": str(2 * inner_steps)}
    return {
        "gradient": {},
        "local_updates": {"HIVE_USE_LOCAL_UPDATES": "true"},
        "diloco": {**diloco, "HIVE_GRAD_COMPRESSION": "none"},
        "diloco_8bit": {**diloco, "HIVE_GRAD_COMPRESSION": "8bit"},  # parameters (state rounds) stay exact
        "diloco_8bit_2h": {**longer, "HIVE_GRAD_COMPRESSION": "8bit"},
        "diloco_shared": {**diloco, "HIVE_GRAD_COMPRESSION": "8bit-shared"},  # DiLoCo's default
        "diloco_shared_2h": {**longer, "HIVE_GRAD_COMPRESSION": "8bit-shared"},
        # matchmaking shortened: with 3 s a round per step would be mostly waiting, and bytes are what it shows
        "ddp": {
            "HIVE_TARGET_BATCH_SIZE": str(miners * BATCH),
            "HIVE_AVERAGE_STATE_EVERY": "1000000",
            "HIVE_MATCHMAKING_TIME": "1",
        },
    }


def epoch_samples(env: dict[str, str], miners: int) -> int:
    if env.get("HIVE_MODE") == "diloco":
        return int(env["HIVE_INNER_STEPS"]) * BATCH * miners
    return int(env.get("HIVE_TARGET_BATCH_SIZE", TINY_TARGET))


def swarm_samples(client, keys, domain) -> int:
    latest: dict[str, int] = {}
    for record in read_stream(client, keys, domain, StepRecord):
        latest[record.peer_id] = max(latest.get(record.peer_id, 0), record.samples)
    return sum(latest.values())


def run_mode(
    name: str,
    env: dict[str, str],
    miners: int,
    samples: int,
    checkpoint_samples: int,
    idle_s: float = 5.0,
    timeout: float = 1800.0,
) -> dict:
    """One swarm run to ``samples`` trained samples; the workdir is kept for the evaluation (returned)."""
    save_every = max(1, round(checkpoint_samples / epoch_samples(env, miners)))
    env = {**env, "HIVE_SAVE_EVERY": str(save_every), "HIVE_KEEP_CHECKPOINTS": "1000", "HIVE_AVERAGING_TIMEOUT": "20"}
    background = background_lo_rate(idle_s)
    swarm, settings = tiny_swarm("modes", name, miners, 45, env)
    workdir = swarm.workdir
    try:
        swarm.start()
        client, keys, domain = connect_redis(swarm.redis_url), Keys(settings.run_id), domain_of(settings)
        started, bytes_before = time.time(), lo_bytes()
        deadline, trained, shown = time.monotonic() + timeout, 0, 0.0
        while trained < samples:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {trained} of {samples} samples after {timeout:.0f}s")
            time.sleep(2.0)
            trained = swarm_samples(client, keys, domain)
            if time.monotonic() - shown > 30:
                shown = time.monotonic()
                print(f"  {name}: {trained}/{samples} samples after {time.time() - started:.0f}s", flush=True)
        ended, bytes_after = time.time(), lo_bytes()
        steps = read_stream(client, keys, domain, StepRecord)
        rounds = read_stream(client, keys, domain, RoundRecord)
    finally:
        swarm.stop()
    wall = ended - started
    by_peer: dict[str, list[StepRecord]] = {}
    for step in steps:
        by_peer.setdefault(step.peer_id, []).append(step)
    figures = {peer: per_miner(records) for peer, records in by_peer.items() if len(records) > 2}
    trained = sum(max(r.samples for r in records) for records in by_peer.values())
    sent = max(0.0, bytes_after - bytes_before - background * wall)
    shards = sorted(
        set(
            re.findall(
                r"data shard (\d+) of",
                "\n".join(p.read_text(errors="replace") for p in (workdir / "logs").glob("miner-*.log")),
            )
        )
    )
    return {
        "name": name,
        "env": env,
        "miners": miners,
        "workdir": str(workdir),
        "wall_s": wall,
        "samples": trained,
        "bytes_sent": sent,
        "lo_background_bytes_per_s": background,
        "bytes_per_sample": sent / trained if trained else None,
        "utilization": [f["utilization"] for f in figures.values()],
        "full_rounds": len({(r.kind, r.epoch) for r in rounds if r.success and r.group_size >= miners}),
        "shards": shards,
    }


def _parameters(checkpoint: Path, model: torch.nn.Module, diloco: bool) -> None:
    """Load a checkpoint's evaluated parameters into ``model``: DiLoCo's global ones, else the model's."""
    if not diloco:
        model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
        return
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    with torch.no_grad():
        params = [p for group in param_groups(model, 0.0) for p in group["params"]]
        for param, value in zip(params, state["global"]):
            param.copy_(value)


def loss_curve(result: dict, blocks: torch.Tensor) -> list[tuple[int, float]]:
    """(swarm samples, held-out loss) at init and at every checkpoint of miner 0."""
    model = build_model("tiny")
    model.eval()
    curve = [(0, evaluate(model, blocks)[0])]
    diloco = result["env"].get("HIVE_MODE") == "diloco"
    for checkpoint in sorted(list_checkpoints(Path(result["workdir"]) / "miner-0"), key=lambda p: p.name):
        state = read_trainer_state(checkpoint)
        _parameters(checkpoint, model, diloco)
        curve.append((state.samples * result["miners"], evaluate(model, blocks)[0]))
    return sorted(curve)


def at(curve: list[tuple[int, float]], samples: float) -> float:
    """The curve's loss at ``samples``, linearly interpolated."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= samples <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (samples - x0) / (x1 - x0)
    return math.nan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--miners", type=int, default=2)
    parser.add_argument("--samples", type=int, default=3200, help="swarm-wide samples each mode trains")
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument(
        "--checkpoint-samples", type=int, default=400, help="checkpoint about this often (swarm samples)"
    )
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--modes", nargs="*", default=None, help="a subset of the modes (default: all)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/modes.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    chosen = {k: v for k, v in modes(args.miners, args.inner_steps).items() if not args.modes or k in args.modes}
    blocks = None
    results = []
    try:
        for name, env in chosen.items():
            print(f"{name}: {env}")
            results.append(run_mode(name, env, args.miners, args.samples, args.checkpoint_samples))
        from hivetrain.data import validation_blocks

        blocks = validation_blocks(load_tokenizer(), model_config("tiny").n_positions, args.eval_blocks)
        for result in results:
            result["loss_curve"] = loss_curve(result, blocks)
    finally:
        for result in results:
            shutil.rmtree(result.pop("workdir"), ignore_errors=True)
    common = min(r["loss_curve"][-1][0] for r in results)
    by_name = {r["name"]: r for r in results}
    for result in results:
        result["loss_at_common_samples"] = at(result["loss_curve"], common)
    rows = []
    for r in results:
        ddp = by_name.get("ddp", {}).get("bytes_per_sample")
        grad = by_name.get("gradient", {}).get("bytes_per_sample")
        r["fewer_bytes_than_ddp"] = ddp / r["bytes_per_sample"] if ddp and r["bytes_per_sample"] else None
        r["fewer_bytes_than_gradient"] = grad / r["bytes_per_sample"] if grad and r["bytes_per_sample"] else None
        rows.append(
            [
                r["name"],
                r["samples"],
                round(r["wall_s"]),
                r["bytes_per_sample"] / 1e3,
                r["fewer_bytes_than_ddp"] or "-",
                r["fewer_bytes_than_gradient"] or "-",
                r["loss_at_common_samples"],
                min(r["utilization"]) if r["utilization"] else "-",
                r["full_rounds"],
            ]
        )
    print(f"held-out loss at {common} swarm samples; bytes on the loopback")
    print(
        table(
            [
                "mode",
                "samples",
                "wall s",
                "KB sent/sample",
                "x fewer than ddp",
                "x fewer than gradient",
                "held-out loss",
                "utilization (min)",
                "full rounds",
            ],
            rows,
        )
    )
    legend = ", ".join(f"{COLOUR_NAMES[i]} = {r['name']}" for i, r in enumerate(results))
    for axis, path in (
        ("samples", RESULTS / "modes-loss-vs-samples.png"),
        ("bytes", RESULTS / "modes-loss-vs-bytes.png"),
    ):
        series = [
            [(x if axis == "samples" else x * (r["bytes_per_sample"] or 0), y) for x, y in r["loss_curve"]]
            for r in results
        ]
        x_range, y_range = plot(series, path)
        print(
            f"{path}: x = {axis} {x_range[0]:.3g}..{x_range[1]:.3g}, y = held-out loss "
            f"{y_range[0]:.3g}..{y_range[1]:.3g}; {legend}"
        )
    out = write_result("modes", {"args": vars(args), "common_samples": common, "runs": results}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
