"""The dashboard with 200 synthetic miners in a real Redis: its data through the test client, and the
page served by real gunicorn and drawn by headless Chromium (layout, live data, hostile strings)."""

from __future__ import annotations

import math
import time

import pytest
from bound_peers import KeyWallet, bound
from bound_peers import peer_id as pid
from browser import chromium, console_errors, require_chromium, screenshot, wait_for
from validator_api import local_run
from validator_api import served as serve_api

from hivetrain.protocol.records import (
    VALIDATOR_TTL_S,
    EvalRecord,
    MinerScore,
    OffenceRecord,
    PeerRecord,
    RoundRecord,
    ScoreBoard,
    StepRecord,
    ValidatorStatus,
)
from hivetrain.store import Registry, append, connect_redis
from hivetrain.validator.app import create_app
from hivetrain.validator.dashboard import BUCKET_S, SERIES_SHOWN

RUN = "dash"
KEYS, DOMAIN, _settings = local_run(RUN)
MINERS = 200
CHARTS = ("chart-eval", "chart-loss", "chart-swarm", "chart-tokens", "chart-rounds", "chart-durations")
HOSTILE = '<img src=x onerror="window.__xss=1">'


def peer_id(i: int) -> str:
    return pid(f"miner-{i:03d}")


def populate(redis_url: str, validator: str, now: float) -> list[KeyWallet]:
    """200 registered miners, three step buckets each, rounds, offences, a score board, evals and a status."""
    db = connect_redis(redis_url)
    registry = Registry(db, KEYS, DOMAIN)
    wallets = [KeyWallet(i + 1) for i in range(MINERS)]
    for i, w in enumerate(wallets):
        device = HOSTILE if i == 5 else ("cuda:0" if i % 3 == 0 else "cpu")
        record = PeerRecord(
            peer_id=peer_id(i),
            role="miner",
            multiaddrs=[f"/ip4/127.0.0.1/tcp/{4000 + i}"],
            device=device,
            preset="tiny",
            started_at=now - 600,
        )
        registry.register(bound(record, w.hotkey.ss58_address, DOMAIN, name=f"miner-{i:03d}"), w)
        for k, age in enumerate((2 * BUCKET_S, BUCKET_S, 0.0)):
            append(
                db,
                KEYS,
                DOMAIN,
                StepRecord(
                    peer_id=peer_id(i),
                    step=k,
                    local_epoch=k,
                    global_epoch=k,
                    loss=6.0 - k + i / 1000,
                    samples=8 * (k + 1),
                    samples_per_s=1.0,
                    tokens_per_s=100.0 + i,
                    checkpoint_epoch=k - 1,
                    time=now - age,
                ),
                signer=w,
            )
    # an impostor's step for miner 0 (validly signed, by the wrong hotkey): must draw nothing
    append(
        db,
        KEYS,
        DOMAIN,
        StepRecord(
            peer_id=peer_id(0),
            step=9,
            local_epoch=9,
            global_epoch=9,
            loss=1e6,
            samples=10**9,
            samples_per_s=1.0,
            tokens_per_s=1e9,
            time=now,
        ),
        signer=wallets[1],
    )
    for epoch in range(1, 4):
        for member in (0, 1, 2):
            append(
                db,
                KEYS,
                DOMAIN,
                RoundRecord(
                    peer_id=peer_id(member),
                    epoch=epoch,
                    group_size=3,
                    duration_s=0.2 * epoch,
                    group=[peer_id(0), peer_id(1), peer_id(2)],
                    success=True,
                    time=now - 30 + epoch,
                ),
                signer=wallets[member],
            )
    append(
        db,
        KEYS,
        DOMAIN,
        OffenceRecord(
            peer_id=peer_id(1),
            offender=peer_id(7),
            averager="run_grad",
            role="sender",
            reason="non-finite part",
            banned_s=600.0,
            time=now - 5,
        ),
        signer=wallets[1],
    )
    # a "ban" by a peer that is not registered: no one is framed by it
    append(
        db,
        KEYS,
        DOMAIN,
        OffenceRecord(
            peer_id="QmNobody",
            offender=peer_id(8),
            averager="run_grad",
            role="sender",
            reason="forged",
            banned_s=600.0,
            time=now - 5,
        ),
        signer=KeyWallet(9999),
    )
    miners = [
        MinerScore(
            hotkey=w.hotkey.ss58_address,
            uid=i,
            peer_id=peer_id(i),
            score=(MINERS - i) / MINERS,
            weight=(MINERS - i) / (MINERS * (MINERS + 1) / 2),
            evidence=[
                {
                    "claimed_samples": 24,
                    "verified_samples": 24 if i != 9 else 0,
                    "reasons": [f"claim: ok ({i})", "spot check pass: cosine 0.98"],
                    "checks": [{"verdict": "pass", "cosine": 0.98}, {"verdict": "fail", "cosine": 0.1}],
                }
            ],
        )
        for i, w in enumerate(wallets)
    ]
    db.set(
        KEYS.scores(validator),
        ScoreBoard(validator=validator, uid=0, epoch=2, rounds=4, weights_set_at=now - 3, miners=miners).to_json(),
    )
    for k in range(3):
        append(
            db,
            KEYS,
            DOMAIN,
            EvalRecord(
                validator=validator,
                epoch=k,
                loss=7.0 - k,
                perplexity=math.exp(7.0 - k),
                blocks=4,
                tokens=1024,
                duration_s=0.5,
                time=now - 30 + 10 * k,
            ),
        )
    append(
        db,
        KEYS,
        DOMAIN,
        EvalRecord(
            validator="5SomeoneElse", epoch=9, loss=0.1, perplexity=1.1, blocks=4, tokens=1024, duration_s=0.5, time=now
        ),
    )
    db.set(
        KEYS.validator_alive(validator),
        ValidatorStatus(validator=validator, preset="tiny", parameters=3_300_000, epoch=2, synced_at=now - 4).to_json(),
        ex=VALIDATOR_TTL_S,
    )
    return wallets


def test_dashboard_data_for_200_miners(redis_url, wallet_dir, hotkey):
    now = time.time()
    wallets = populate(redis_url, hotkey, now)
    client = create_app(_settings(redis_url, wallet_dir)).test_client()

    response = client.get("/api/dashboard")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    assert len(response.data) < 1_000_000, f"{len(response.data)} bytes per poll"
    body = response.get_json()
    rows = {row["peer_id"]: row for row in body["miners"]}
    assert len(body["miners"]) == MINERS and body["swarm"]["live_miners"] == MINERS
    weights = [row["weight"] for row in body["miners"]]
    assert weights == sorted(weights, reverse=True) and body["miners"][0]["peer_id"] == peer_id(0)
    assert rows[peer_id(0)]["loss"] == pytest.approx(4.0) and rows[peer_id(0)]["samples"] == 24  # not the impostor's
    assert rows[peer_id(0)]["checks"] == [{"verdict": "pass", "cosine": 0.98}, {"verdict": "fail", "cosine": 0.1}]
    assert rows[peer_id(9)]["claimed"] == 24 and rows[peer_id(9)]["verified"] == 0
    assert rows[peer_id(5)]["device"] == HOSTILE  # data, not markup: the page sets it as text
    assert rows[peer_id(7)]["banned"] and rows[peer_id(7)]["named_by"] == 1
    assert rows[peer_id(7)]["offences"][0]["reason"] == "non-finite part"
    assert not rows[peer_id(8)]["banned"] and rows[peer_id(8)]["offences"] == []

    swarm = body["swarm"]
    assert swarm["epoch"] == 2 and swarm["newest_checkpoint"] == 1 and swarm["miners_with_it"] == MINERS
    assert swarm["tokens_per_s"] == pytest.approx(sum(100.0 + i for i in range(MINERS)))
    assert body["validator"] | {"synced_at": None, "weights_set_at": None} == {
        "hotkey": hotkey,
        "running": True,
        "preset": "tiny",
        "parameters": 3_300_000,
        "epoch": 2,
        "synced_at": None,
        "weights_set_at": None,
        "scoring_rounds": 4,
    }

    charts = body["charts"]
    assert [p[1] for p in charts["eval_loss"]] == [7.0, 6.0, 5.0]  # only this validator's evaluations
    loss = charts["train_loss"]
    assert len(loss["miners"]) == SERIES_SHOWN and loss["miners"][0]["peer_id"] == peer_id(0)
    assert len(loss["median"]) == 3 and max(p[1] for p in loss["high"]) < 7
    assert charts["tokens_per_s"]["total"][-1][1] == pytest.approx(swarm["tokens_per_s"])
    assert [(r["epoch"], r["group_size"]) for r in charts["rounds"]] == [(1, 3), (2, 3), (3, 3)]

    # the next poll reads only what is new
    db = connect_redis(redis_url)
    append(
        db,
        KEYS,
        DOMAIN,
        StepRecord(
            peer_id=peer_id(3),
            step=3,
            local_epoch=3,
            global_epoch=3,
            loss=2.5,
            samples=32,
            samples_per_s=1.0,
            tokens_per_s=50.0,
            time=now + BUCKET_S,
        ),
        signer=wallets[3],
    )
    again = {row["peer_id"]: row for row in client.get("/api/dashboard").get_json()["miners"]}
    assert again[peer_id(3)]["loss"] == 2.5 and again[peer_id(3)]["global_epoch"] == 3
    # a flushed stream is read afresh, not waited on forever
    db.delete(KEYS.steps)
    append(
        db,
        KEYS,
        DOMAIN,
        StepRecord(
            peer_id=peer_id(4),
            step=0,
            local_epoch=0,
            global_epoch=0,
            loss=3.25,
            samples=8,
            samples_per_s=1.0,
            tokens_per_s=50.0,
            time=now + 2 * BUCKET_S,
        ),
        signer=wallets[4],
    )
    assert {row["peer_id"]: row for row in client.get("/api/dashboard").get_json()["miners"]}[peer_id(4)][
        "loss"
    ] == 3.25


def test_an_empty_swarm_and_a_malformed_status(redis_url, wallet_dir, hotkey):
    connect_redis(redis_url).set(KEYS.validator_alive(hotkey), "1", ex=VALIDATOR_TTL_S)  # an older validator's value
    client = create_app(_settings(redis_url, wallet_dir)).test_client()
    body = client.get("/api/dashboard").get_json()
    assert body["miners"] == [] and body["swarm"]["epoch"] is None and body["swarm"]["newest_checkpoint"] is None
    assert body["validator"]["running"] is False and body["charts"]["eval_loss"] == []
    page = client.get("/")
    assert page.status_code == 200 and b'src="static/dashboard.js"' in page.data
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert client.get("/static/dashboard.js").status_code == 200


@pytest.fixture
def served(redis_url, wallet_dir):
    """The validator's API under real gunicorn (2 workers, so polls land on separate per-worker histories)."""
    require_chromium()
    with serve_api(_settings, redis_url, wallet_dir, workers=2) as url:
        yield url


def test_the_page_stays_readable_with_200_miners(served, redis_url, hotkey):
    populate(redis_url, hotkey, time.time())
    with chromium(width=1280, height=900) as driver:
        driver.get(served)
        wait_for(driver, "document.querySelectorAll('#miners tbody tr.miner').length === 200", 30, "200 miner rows")
        for chart in CHARTS:
            wait_for(driver, f"Number(document.getElementById('{chart}').dataset.points) > 0", 10, f"data in {chart}")
        lines = driver.execute_script("return document.querySelectorAll('#chart-loss polyline').length")
        assert lines == SERIES_SHOWN + 1, "each shown miner and the median, not 200 lines"
        layout = driver.execute_script(
            """
            const wrap = document.querySelector('.table-wrap');
            return {overflow: document.documentElement.scrollWidth - window.innerWidth,
                    tableScrolls: wrap.scrollHeight > wrap.clientHeight,
                    tableHeight: wrap.clientHeight, viewport: window.innerHeight,
                    xss: window.__xss === undefined ? null : window.__xss,
                    hostile: [...document.querySelectorAll('#miners td')].some(td => td.textContent === arguments[0]),
                    images: document.querySelectorAll('#miners img').length,
                    banned: document.querySelectorAll('#miners td.status.banned').length,
                    connection: document.getElementById('connection').dataset.state};""",
            HOSTILE,
        )
        assert layout["overflow"] <= 0, f"page is {layout['overflow']}px wider than the window"
        assert layout["tableScrolls"] and layout["tableHeight"] <= layout["viewport"], layout
        assert layout["xss"] is None and layout["hostile"] and layout["images"] == 0, "a peer's string ran as markup"
        assert layout["banned"] == 1 and layout["connection"] == "live"
        screenshot(driver, "dashboard-200-miners.png")
        driver.find_element("css selector", "#filter").send_keys(peer_id(7))
        wait_for(driver, "document.querySelectorAll('#miners tbody tr.miner').length === 1", 5, "the filter")
        driver.find_element("css selector", "#miners tbody tr.miner").click()
        details = wait_for(driver, "document.querySelector('#miners tr.details')?.textContent", 5, "the evidence row")
        assert "non-finite part" in details and "claim: ok (7)" in details
        assert console_errors(driver) == []
