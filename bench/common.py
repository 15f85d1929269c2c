"""Helpers the benchmarks share: robust statistics, a plain-text table, JSON results, machine info."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def spread(values: list[float]) -> dict:
    """Median, min, max and count of a list of measurements (the median is what tables report)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def machine() -> dict:
    """What the numbers were measured on; the load average says how shared the CPU was."""
    import torch

    info = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_at_start": os.getloadavg(),
    }
    try:
        import hivemind

        info["hivemind"] = hivemind.__version__
    except ImportError:
        pass
    return info


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (prints fine in a terminal and pastes into BENCHMARKS.md)."""

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, payload: dict, out: str | None = None) -> Path:
    """JSON under bench/results/<name>.json (or ``out``), with the machine and the time of the run."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=1))
    return path


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so a benchmark's ``finally`` stops what it started; forked children keep the
    default."""
    import signal
    import sys

    from hivetrain.runtime import reset_signal_handlers_in_children

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    reset_signal_handlers_in_children()
