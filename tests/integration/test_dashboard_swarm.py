"""The dashboard of a real local swarm (Redis, the bootstrap, 2 tiny miners, the validator) in headless Chromium."""

from __future__ import annotations

import pytest
from browser import chromium, console_errors, require_chromium, screenshot, wait_for
from swarm_helpers import stop_and_check

from hivetrain.settings import SwarmSettings
from hivetrain.swarm.launcher import Swarm

pytestmark = pytest.mark.integration

MINERS = 2
TEST_ENV = {
    "HIVE_TORCH_THREADS": "1",
    "HIVE_SYNC_EVERY_S": "8",
    "HIVE_CHECK_EVERY_S": "8",
    "HIVE_WEIGHTS_EVERY_S": "20",
    "HIVE_EVAL_BLOCKS": "4",
    "HIVE_SAVE_EVERY": "1",
}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    require_chromium()  # before starting anything
    workdir = tmp_path_factory.mktemp("dswarm")
    settings = SwarmSettings(
        miners=MINERS,
        workdir=str(workdir),
        preset="tiny",
        bootstrap_port=0,
        validator_port=0,
        run_id="dtest",
        stop_timeout=45,
    )
    swarm = Swarm(settings, extra_env=TEST_ENV)
    try:
        swarm.start()
        yield swarm
    finally:
        stop_and_check(swarm)


def test_the_dashboard_shows_the_live_swarm(swarm):
    with chromium() as driver:
        driver.get(f"{swarm.validator_url}/")
        rows = """[...document.querySelectorAll('#miners tbody tr.miner')].map(tr => ({
                     peer: tr.dataset.peer, samples: tr.querySelector('td.samples').textContent,
                     cells: [...tr.children].map(td => td.textContent)}))"""
        wait_for(driver, f"{rows}.length === {MINERS}", 180, f"{MINERS} miners in the table")
        for chart in ("chart-loss", "chart-swarm", "chart-tokens"):
            wait_for(driver, f"Number(document.getElementById('{chart}').dataset.points) > 0", 60, f"data in {chart}")
        # the validator needs a synced state for its evaluations and a scoring window for claims; the
        # miners need an averaging round: wait for each chart and for both miners' verified samples
        wait_for(driver, "Number(document.getElementById('chart-eval').dataset.points) >= 2", 240, "two evaluations")
        wait_for(
            driver, "Number(document.getElementById('chart-rounds').dataset.points) > 0", 240, "an averaging round"
        )
        table = wait_for(
            driver,
            f"(r => r.filter(m => /^[1-9][0-9.kM]* \\/ [1-9]/.test(m.samples)).length === {MINERS} && r)({rows})",
            300,
            "both miners with claimed and verified samples",
        )
        facts = driver.execute_script("return [...document.querySelectorAll('.fact .value')].map(v => v.textContent)")
        assert "tiny" in " ".join(facts) and "–" not in facts[:3], facts
        errors = console_errors(driver)
        path = screenshot(driver, "dashboard-swarm.png")
    assert errors == [], errors
    assert {row["peer"] for row in table} == {peer.peer_id for peer in swarm.registry().live_peers(role="miner")}
    assert path.stat().st_size > 10_000
