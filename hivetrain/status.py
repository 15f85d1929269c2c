"""``hivetrain status``: one miner's standing at a glance, from the validator's API.

Reads the validator's ``/api/dashboard`` (what its page draws): every live peer the miner's hotkey
registered, its epoch against the swarm's, samples trained, claimed and credited, its recent spot
checks, score and weight, and the offences peers caught it at. Prints a table (``--json``: one JSON
document) and exits 0 when nothing is wrong, 1 when something is (not registered, no weight yet,
its last spot check failed, banned, behind the swarm, or the validator did not answer), 2 on a
configuration error.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import requests

from hivetrain.identity import existing_hotkey
from hivetrain.runtime import EXIT_CONFIG
from hivetrain.settings import ConfigError, StatusSettings, load_settings

EXIT_OK, EXIT_PROBLEM = 0, 1
#: How many epochs a miner may trail the swarm's newest before it counts as behind (one is a transition).
BEHIND_EPOCHS = 1


def standing(dashboard: dict, hotkey: str) -> dict:
    """What ``dashboard`` (the validator's ``/api/dashboard`` document) says of ``hotkey``, with its problems.

    Raises ``ValueError`` when the document is not a dashboard's.
    """
    try:
        swarm_epoch = dashboard["swarm"]["epoch"]
        validator = dashboard["validator"]["hotkey"]
        rows = [row for row in dashboard["miners"] if row["hotkey"] == hotkey]
        peers = [_peer(row, swarm_epoch) for row in rows]
    except (KeyError, TypeError) as error:
        raise ValueError(f"not a dashboard document ({type(error).__name__}: {error})") from None
    problems = [problem for peer in peers for problem in peer.pop("problems")]
    if not peers:
        problems.append(
            "no live peer is registered with this hotkey: the miner is not running, has not registered with the "
            "bootstrap yet, or its registration expired"
        )
    return {
        "hotkey": hotkey,
        "validator": validator,
        "run_id": dashboard.get("run_id"),
        "swarm_epoch": swarm_epoch,
        "peers": peers,
        "problems": problems,
    }


def _peer(row: dict, swarm_epoch: int | None) -> dict:
    checks = row["checks"]
    passed = sum(1 for check in checks if check.get("verdict") == "pass")
    peer = {
        "peer_id": row["peer_id"],
        "device": row["device"],
        "local_epoch": row["local_epoch"],
        "loss": row["loss"],
        "samples": row["samples"],
        "claimed": row["claimed"],
        "credited": row["verified"],
        "checks_passed": passed,
        "checks_failed": len(checks) - passed,
        "last_check": checks[-1].get("verdict") if checks else None,
        "score": row["score"],
        "weight": row["weight"],
        "banned": row["banned"],
        "offences": row["offences"],
        "problems": [],
    }
    name, problems = f"peer {row['peer_id']}", peer["problems"]
    if row["banned"]:
        reasons = "; ".join(o["reason"] for o in row["offences"][-2:])
        problems.append(f"{name} is banned by {row['named_by']} peer(s): {reasons}")
    if peer["last_check"] == "fail":
        why = row["reasons"][-1] if row["reasons"] else "no reason given"
        problems.append(f"{name}'s last spot check failed: {why}")
    if not row["weight"] > 0:
        problems.append(f"{name} has no weight yet (it gets some once its samples are credited and a check passed)")
    epoch = row["local_epoch"]
    if epoch is not None and swarm_epoch is not None and epoch < swarm_epoch - BEHIND_EPOCHS:
        problems.append(f"{name} is at epoch {epoch}, the swarm at {swarm_epoch}")
    return peer


def render(report: dict) -> str:
    """The standing as a few lines of text."""
    lines = [
        f"miner {report['hotkey']}",
        f"  validator {report['validator']} (run {report['run_id']}), swarm at epoch {report['swarm_epoch']}",
    ]
    for peer in report["peers"]:
        lines += [
            f"  peer {peer['peer_id']} on {peer['device']}: epoch {peer['local_epoch']}, loss {peer['loss']}, "
            f"{peer['samples']} samples trained",
            f"    last round: claimed {peer['claimed']}, credited {peer['credited']}; spot checks "
            f"{peer['checks_passed']} passed, {peer['checks_failed']} failed (last: {peer['last_check']})",
            f"    score {peer['score']:.4f}, weight {peer['weight']:.4f}, banned: {'yes' if peer['banned'] else 'no'}"
            + (f", {len(peer['offences'])} offences" if peer["offences"] else ""),
        ]
    lines.append("  problems: " + ("none" if not report["problems"] else ""))
    lines += [f"    - {problem}" for problem in report["problems"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the standing of the miner the settings name; return 0, 1 (something is wrong) or 2 (configuration)."""
    args = ["--as-json" if arg == "--json" else arg for arg in (sys.argv[1:] if argv is None else argv)]
    try:
        settings = load_settings(StatusSettings, args)
        hotkey = settings.hotkey or existing_hotkey(settings.wallet_dir, settings.wallet_name, settings.wallet_hotkey)
    except (ConfigError, ValueError) as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    try:
        report = standing(_dashboard(settings), hotkey)
    except (requests.RequestException, ValueError) as error:
        print(f"the validator at {settings.validator_url} gave no standing: {error}", file=sys.stderr)
        return EXIT_PROBLEM
    print(json.dumps(report, indent=2) if settings.as_json else render(report))
    return EXIT_PROBLEM if report["problems"] else EXIT_OK


def _dashboard(settings: StatusSettings) -> Any:
    response = requests.get(f"{settings.validator_url}/api/dashboard", timeout=settings.timeout_s)
    response.raise_for_status()
    return response.json()


if __name__ == "__main__":
    raise SystemExit(main())
