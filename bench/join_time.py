"""Join time: a late miner's seconds from process start to its first step counted by the swarm.

Starts a local swarm (``hivetrain.swarm.launcher.Swarm``: Redis, the bootstrap, ``--miners`` tiny
miners, no validator) on 127.0.0.1, waits until it has finished ``--epochs`` global epochs (so the
newcomer must download state), then starts one more miner and splits its way in, from its log's
timestamps and from Redis:

* ``imports``: process start -> its first ``hivetrain`` log line (Python, torch, transformers,
  hivemind imports; settings; the wallet; bittensor only with ``HIVE_CHAIN=bittensor``);
* ``dht``: -> ``DHT up`` (asking the bootstrap for initial peers, starting p2pd, joining the DHT);
* ``setup``: -> ``loading state from peers`` (model, data, telemetry, optimizer with its averagers,
  waiting for the swarm's progress);
* ``state download``: -> ``loaded state from peers``;
* ``first step``: -> ``step 1``; ``counted``: -> its first StepRecord readable from Redis.

Run: ``.venv/bin/python -m bench.join_time`` (one to three minutes on 2 shared CPU cores: under load, imports alone
took 30 s).
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.common import exit_on_sigterm, table, write_result
from hivetrain.log import get_logger
from hivetrain.protocol.records import Keys, StepRecord
from hivetrain.settings import SwarmSettings, domain_of
from hivetrain.store import connect_redis, read_stream
from hivetrain.swarm.launcher import Swarm

logger = get_logger("bench.join_time")
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \w+ \[hivetrain[^\]]*\] (.*)$")
MILESTONES = [  # (name, pattern of the log line that ends it)
    ("imports", r""),
    ("dht", r"^DHT up: peer (\S+),"),
    ("setup", r"loading state from peers$"),
    ("state download", r"^loaded state from peers in"),
    ("first step", r"^step 1 "),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--miners", type=int, default=2, help="miners already training when the newcomer starts")
    parser.add_argument(
        "--epochs", type=int, default=1, help="global epochs the swarm finishes before the newcomer starts"
    )
    parser.add_argument("--timeout", type=float, default=150.0, help="give up on any wait after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the swarm's work folder (logs)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/join_time.json)")
    return parser.parse_args(argv)


def log_events(path: Path) -> list[tuple[float, str]]:
    """(unix time, message) of every hivetrain log line of a service."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if match := _LINE.match(line):
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            events.append((stamp, match.group(2)))
    return events


def milestones(events: list[tuple[float, str]]) -> dict[str, float]:
    """Unix time at which each milestone's log line appeared (the first line for ``imports``)."""
    found: dict[str, float] = {}
    for name, pattern in MILESTONES:
        for stamp, message in events:
            if (not pattern and events) or (pattern and re.search(pattern, message)):
                found[name] = stamp
                break
    return found


def wait_for(condition, timeout: float, what: str, period: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()) is not None:
            return value
        time.sleep(period)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="bench-join-"))
    settings = SwarmSettings(
        miners=args.miners,
        validator=False,
        workdir=str(workdir),
        bootstrap_port=0,
        run_id="bench-join",
        preset="tiny",
        stop_timeout=20,
    )
    swarm = Swarm(settings)
    try:
        swarm.start()
        keys, domain = Keys(settings.run_id), domain_of(settings)
        client = connect_redis(swarm.redis_url)

        def swarm_epoch():
            epochs = [s.local_epoch for s in read_stream(client, keys, domain, StepRecord, count=50)]
            return max(epochs) if epochs and max(epochs) >= args.epochs else None

        epoch = wait_for(swarm_epoch, args.timeout, f"the swarm reaching epoch {args.epochs}")
        started = time.time()
        service = swarm.add_miner()

        def joined_peer():
            match = [m for _, m in log_events(service.log_path) if m.startswith("DHT up: peer ")]
            return match[0].split()[3].rstrip(",") if match else None

        peer_id = wait_for(joined_peer, args.timeout, "the newcomer's DHT")

        def counted():
            mine = [s for s in read_stream(client, keys, domain, StepRecord, count=200) if s.peer_id == peer_id]
            return time.time() if mine else None

        counted_at = wait_for(counted, args.timeout, "the newcomer's first step in Redis", period=0.2)
        events = log_events(service.log_path)
    finally:
        swarm.stop()
    marks = milestones(events)
    rows, previous, phases = [], started, {}
    for name, _ in MILESTONES:
        if name in marks:
            phases[name] = marks[name] - previous
            previous = marks[name]
            rows.append([name, phases[name], marks[name] - started])
    phases["counted in Redis"] = counted_at - previous
    rows.append(["counted in Redis", phases["counted in Redis"], counted_at - started])
    print(table(["phase", "seconds", "since process start"], rows))
    state_line = [m for _, m in events if m.startswith("loaded state from peers")]
    print(
        f"newcomer joined a swarm of {args.miners} tiny miners at epoch {epoch}; "
        f"{state_line[0] if state_line else 'it did not need to load state'}"
    )
    path = write_result(
        "join_time",
        {
            "miners": args.miners,
            "swarm_epoch": epoch,
            "phases_s": phases,
            "total_s": counted_at - started,
            "state_log": state_line[:1],
        },
        args.out,
    )
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs in {workdir / 'logs'}")


if __name__ == "__main__":
    main()
