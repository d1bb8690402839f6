"""Headless Chromium (Debian's chromium + chromium-driver) driven by Selenium.

One browser per test module (`browser`); each test gets a fresh cookie jar
and its own screenshots directory (`console`). Where Chromium cannot start,
the tests are skipped with the reason, loudly (a warning in the summary).
No browser is ever downloaded: Selenium is given Debian's binaries.

``SENDENSE_SCREENSHOTS=docs/img/console`` also writes the named screenshots
the guide (docs/console.md) shows into that directory.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Debian's packages (chromium, chromium-driver); elsewhere point these at a
# matching browser and driver.
CHROMIUM = os.environ.get("SENDENSE_CHROMIUM", "/usr/bin/chromium")
DRIVER = os.environ.get("SENDENSE_CHROMEDRIVER", "/usr/bin/chromedriver")
WIDTH, HEIGHT = 1280, 900


def _start() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # as root in a container: the sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WIDTH},{HEIGHT}",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.prompt_for_download": False})
    return webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = None
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        reason = f"{CHROMIUM} or {DRIVER} missing (apt-get install chromium chromium-driver)"
    else:
        try:
            driver = _start()
        except Exception as e:  # the browser cannot start here: say why
            reason = f"chromium could not start: {type(e).__name__}: {str(e).splitlines()[0]}"
    if reason is not None:
        message = f"BROWSER TESTS SKIPPED: {reason}"
        warnings.warn(message, stacklevel=1)
        print(f"\n*** {message} ***")
        pytest.skip(message)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


class Console:
    """The console in the browser, for one test: its hub, screenshots, waits."""

    def __init__(self, driver: Any, base: str, shots: Path) -> None:
        self.driver = driver
        self.base = base
        self.shots = shots
        self.docs = os.environ.get("SENDENSE_SCREENSHOTS")

    def go(self, path: str) -> None:
        self.driver.get(self.base + path)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self) -> str:
        return str(self.find("body").text)

    def wait(self, check: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = check()
            except Exception:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                self.shot("timeout")
                raise TimeoutError(f"waited {timeout} s for {what or check}")
            time.sleep(0.2)

    def sign_in(self, token: str) -> None:
        self.go("/ui/signin")
        self.find("#token").send_keys(token)
        self.find("#signin-form button[type=submit]").click()
        self.wait(lambda: self.finds("#signout"), 30, "the signed-in page")

    def sign_out(self) -> None:
        self.find("#signout").click()
        self.wait(lambda: self.finds("#signin-form"), 30, "the sign-in page")

    def shot(self, name: str, *, doc: str | None = None, full: bool = False) -> Path:
        """A screenshot into the test's directory; ``doc``: also the guide's
        image of that name when SENDENSE_SCREENSHOTS is set."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        if full:  # the whole page, not just the window (Chrome DevTools Protocol)
            size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
            shot = self.driver.execute_cdp_cmd(
                "Page.captureScreenshot",
                {
                    "captureBeyondViewport": True,
                    "clip": {
                        "x": 0,
                        "y": 0,
                        "width": size["width"],
                        "height": min(size["height"], 4000),
                        "scale": 1,
                    },
                },
            )
            path.write_bytes(base64.b64decode(shot["data"]))
        else:
            self.driver.save_screenshot(str(path))
        if doc and self.docs:
            target = Path(self.docs)
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / f"{doc}.png")
        return path


@pytest.fixture
def console(browser: Any, cluster: Any, tmp_path: Path) -> Iterator[Console]:
    browser.delete_all_cookies()
    c = Console(browser, cluster.hub_url, tmp_path / "screenshots")
    c.go("/ui/signin")  # cookies are per site: clear this hub's too
    browser.delete_all_cookies()
    yield c
    browser.delete_all_cookies()


@pytest.fixture(autouse=True)
def templates_complete(console: Console, cluster: Any) -> Iterator[None]:
    """A page rendered with a value missing (shown empty, logged by the hub)
    fails the test that showed it."""
    yield
    missing = [line for line in cluster.log("hub").splitlines() if "Template variable" in line]
    assert not missing, missing[:5]
