"""Swarm utilization: the fraction of wall time 2 (or 4) tiny miners spend computing, per hivemind mode.

For each configuration (``default`` gradient averaging; ``delayed``: delay_grad_averaging +
delay_optimizer_step + offload_optimizer; ``local_updates``) a local swarm of ``--miners`` tiny
miners runs on 127.0.0.1 and a window of ``--duration`` seconds is measured from the miners' step
telemetry in Redis (see ``bench.swarm_runs``): utilization = the seconds the miners' own timers
spent in forward, backward and (inner) optimizer steps / wall time, i.e. the share of the window
not spent waiting at epoch boundaries (matchmaking, all-reduce, the global step) or loading state.
samples/s per miner is reported next to it, since background
averaging can hide waiting while slowing every step down.

Run: ``.venv/bin/python -m bench.swarm_utilization`` (3 runs of about a minute each on 2 shared CPU
cores; ``--configs default`` for one).
"""

from __future__ import annotations

import argparse
import statistics

from bench.common import exit_on_sigterm, table, write_result
from bench.swarm_runs import CONFIGS, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--miners", type=int, nargs="+", default=[2], help="swarm sizes (4 works, slowly, on 2 cores)")
    parser.add_argument("--duration", type=float, default=40.0, help="measured seconds per run")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/swarm_utilization.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    runs, rows = [], []
    for miners in args.miners:
        for name in args.configs:
            try:
                result = run(name, CONFIGS[name], miners=miners, duration=args.duration)
            except TimeoutError as error:  # a mode whose miners never step is a result too
                runs.append({"name": name, "miners": miners, "error": str(error)})
                rows.append([name, miners, 0, "-", "-", "-", "-", "-", "-", f"failed: {str(error)[:120]}"])
                continue
            runs.append(result)
            figures = list(result["per_miner"].values())
            utilization = [f["utilization"] for f in figures if f["utilization"] is not None]
            rows.append(
                [
                    name,
                    miners,
                    len(figures),
                    result["rounds"],
                    sum(f["epochs"] for f in figures) / max(1, len(figures)),
                    statistics.mean(f["samples_per_s"] for f in figures) if figures else 0.0,
                    statistics.median(f["compute_step_s"] for f in figures) if figures else 0.0,
                    statistics.median(f["epoch_step_s"] for f in figures if f["epoch_step_s"])
                    if any(f["epoch_step_s"] for f in figures)
                    else "-",
                    statistics.mean(utilization) if utilization else "-",
                    f"{min(utilization):.3f}-{max(utilization):.3f}" if utilization else "-",
                ]
            )
    print(
        table(
            [
                "config",
                "miners",
                "stepping",
                "rounds",
                "epochs/miner",
                "samples/s/miner",
                "compute step s",
                "epoch step s",
                "utilization (mean)",
                "utilization range",
            ],
            rows,
        )
    )
    path = write_result("swarm_utilization", {"duration_s": args.duration, "runs": runs}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
