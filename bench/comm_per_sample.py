"""Communication per sample: loopback bytes per trained sample for gradient averaging, local updates and
a DDP-equivalent (all-reduce every step), measured on a swarm of tiny miners and computed analytically.

Measured (``bench.swarm_runs``): a swarm of ``--miners`` tiny miners runs each mode for
``--duration`` seconds; bytes = loopback bytes sent in the window (less the background rate measured
just before), samples = what the miners' StepRecords say they trained in the window. The loopback
carries everything: all-reduce, DHT progress records, Redis telemetry and heartbeats.

DDP-equivalent: gradient mode's measured bytes per averaging round, as if a round ran after every
local step of ``batch_size`` samples.

Analytic: in a butterfly all-reduce each of N peers sends 2 (N-1)/N x S bytes, S = 4 x parameters
(float32, no compression). Gradient mode per epoch: one gradient round and one parameter round
(average_state_every=1); local updates: the parameter round only; DDP: one gradient round per step.
All figures are swarm-wide: bytes all peers sent per sample the swarm trained (per peer: divide the
bytes by N, the samples too, so the per-peer figure is the same). Per sample: divide a round's
2 (N-1) S by target_batch_size (an epoch) or N x batch_size (a synchronous step).

Run: ``.venv/bin/python -m bench.comm_per_sample`` (2 runs of about a minute each on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import exit_on_sigterm, table, write_result
from bench.swarm_runs import CONFIGS, run
from hivetrain.models import build_model, num_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--miners", type=int, default=2)
    parser.add_argument("--duration", type=float, default=40.0, help="measured seconds per run")
    parser.add_argument(
        "--from-results",
        default="",
        help="reuse the default and local_updates runs of a "
        "bench/results/swarm_utilization.json instead of running the swarm again",
    )
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/comm_per_sample.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    if args.from_results:
        saved = json.loads(Path(args.from_results).read_text())["runs"]
        runs = {
            r["name"]: r
            for r in saved
            if r["name"] in ("default", "local_updates") and r["miners"] == args.miners and "error" not in r
        }
    else:
        runs = {}
        for name in ("default", "local_updates"):
            try:
                runs[name] = run(name, CONFIGS[name], miners=args.miners, duration=args.duration)
            except TimeoutError as error:  # reported below as not measured
                print(f"{name}: not measured: {error}")
    defaults = runs["default"]["defaults"]
    batch, target = int(defaults["HIVE_BATCH_SIZE"]), int(defaults["HIVE_TARGET_BATCH_SIZE"])
    n = args.miners
    size = 4 * num_parameters(build_model("tiny"))
    round_bytes = 2 * (n - 1) * size  # a butterfly round, all peers together
    analytic = {
        "gradient averaging": 2 * round_bytes / target,
        "local updates": round_bytes / target,
        "DDP-equivalent": round_bytes / (n * batch),
    }
    measured = {}
    for label, name in (("gradient averaging", "default"), ("local updates", "local_updates")):
        r = runs.get(name)
        measured[label] = r["lo_bytes_net"] / r["samples"] if r and r["samples"] else None
    grad = runs["default"]
    # an epoch of gradient mode is one gradient round plus one parameter round; a DDP step is one gradient round
    per_round = grad["lo_bytes_net"] / grad["rounds"] / 2 if grad["rounds"] else None
    measured["DDP-equivalent"] = per_round / (n * batch) if per_round else None
    rows = [
        [
            label,
            f"{measured[label] / 1e3:,.1f}" if measured[label] else "-",
            f"{analytic[label] / 1e3:,.1f}",
            f"{measured[label] / analytic[label]:.2f}" if measured[label] else "-",
        ]
        for label in analytic
    ]
    print(table(["mode", "measured KB sent/sample", "analytic KB sent/sample", "measured / analytic"], rows))
    for name, r in runs.items():
        print(
            f"{name}: {r['samples']} samples, {r['rounds']} rounds, {r['lo_bytes_net'] / 1e6:,.1f} MB on lo "
            f"(background {r['lo_background_bytes_per_s'] / 1e3:,.1f} KB/s subtracted) in {r['window_s']:.0f}s"
        )
    for name in ("default", "local_updates"):
        if name not in runs:
            print(f"{name}: not measured (its miners never stepped; see bench.swarm_utilization)")
    print(f"tiny GPT-2: {size / 1e6:.1f} MB of float32 parameters; {n} miners, batch {batch}, target {target}")
    path = write_result(
        "comm_per_sample",
        {
            "source": args.from_results or "own runs",
            "miners": n,
            "param_bytes": size,
            "batch_size": batch,
            "target_batch_size": target,
            "analytic_bytes_per_sample": analytic,
            "measured_bytes_per_sample": measured,
            "runs": runs,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
