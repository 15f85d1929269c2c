"""Headless Chromium for the dashboard tests: Debian's ``chromium`` driven by its ``chromedriver`` through selenium.

Nothing is downloaded: the driver and the browser are the system's (``.ci/run`` installs them
with apt), and the tests skip, saying so, on a machine without them (in CI they fail instead). Screenshots go to
``$HIVE_TEST_ARTIFACTS`` (default ``test-artifacts/``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("HIVE_TEST_ARTIFACTS", "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def require_chromium() -> None:
    """Skip without the browser, except in CI (``CI`` set), where ``.ci/run`` installs it: there a skip would hide a
    gap."""
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000):
    """A headless Chromium session; quits (and so stops the browser and its driver) on exit."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--no-proxy-server",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[str]:
    """Messages the page logged at SEVERE (uncaught errors, failed loads, CSP violations)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for(driver, script: str, timeout: float, what: str, interval: float = 0.5):
    """Run ``script`` (a JS expression, returned) until truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        time.sleep(interval)
    pytest.fail(
        f"timed out after {timeout:.0f}s waiting for {what} (last value {value!r}); "
        f"console errors: {console_errors(driver)}"
    )


def screenshot(driver, name: str) -> Path:
    """Save the whole page as ``ARTIFACTS/name`` and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    for _ in range(3):  # the layout follows the window's height (the table's max-height is in vh): settle it
        height = driver.execute_script("window.scrollTo(0, 0); return document.documentElement.scrollHeight")
        driver.set_window_size(driver.get_window_size()["width"], min(max(height + 140, 800), 4000))
    driver.save_screenshot(str(path))
    return path
