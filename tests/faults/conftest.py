"""The fault tests' report: each case records its figures; they are printed at the end and saved as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FIGURES: dict[str, dict] = {}
REPORT = Path(os.environ.get("HIVE_TEST_ARTIFACTS", "test-artifacts")) / "faults.json"


@pytest.fixture
def report():
    """``report(case, **figures)``: the figures of one fault case, for the session's report."""

    def record(case: str, **figures) -> None:
        FIGURES[case] = figures

    return record


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")
    terminalreporter.write_sep("-", f"fault report ({REPORT})")
    for case, figures in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{case}: " + ", ".join(f"{key} {value}" for key, value in figures.items()))
