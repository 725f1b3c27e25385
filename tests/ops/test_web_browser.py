"""The status page of a real daemon in Debian's headless chromium (Selenium): progress
moving, a failed file with its reason, a paused backend, buttons only with the token;
screenshots are kept (in $TRAXD_ARTIFACTS when set). And the page under a 20,000-file
backlog."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.kit import ffmpeg
from tests.helpers import DaemonProcess, base_daemon, copy_step, wait_until, write_config
from tests.media.openai_server import FakeOpenAI, Request, error, verbose_json
from tests.ops.conftest import free_port, http_get

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "page-token-abcdef123456"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                   reason="chromium and chromedriver are not installed "
                                   "(.ci/run installs them)")


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TRAXD_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,1100", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def text_of(driver: Any, selector: str) -> str:
    return str(js(driver, f"var e = document.querySelector({selector!r}); "
                          "return e ? e.innerText : '';"))


def slow_chunks(request: Request) -> Any:
    return dataclasses.replace(verbose_json(request), pause=0.7)


def wait_for(predicate: Callable[[], Any], timeout: float, message: str) -> Any:
    return wait_until(predicate, timeout, 0.1, message)


def daemon_config(tmp_path: Path, transcriber: FakeOpenAI, enhancer: FakeOpenAI) -> Path:
    root = tmp_path / "site"
    for name in ("talks", "docs", "notes"):
        (root / name / "inbox").mkdir(parents=True)
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=40",
           str(root / "talks" / "inbox" / "lecture.wav"))
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=500:duration=1",
           str(root / "notes" / "inbox" / "memo.wav"))
    (root / "docs" / "inbox" / "bad.txt").write_bytes(b"FAIL: refused")
    return write_config(
        tmp_path / "traxd.toml",
        base_daemon(tmp_path, metrics_address=f"127.0.0.1:{free_port()}", max_retries=0),
        [{"name": "talks", "path": str(root / "talks" / "inbox"),
          "pipeline": ["preprocess", "transcribe"]},
         {"name": "docs", "path": str(root / "docs" / "inbox"),
          "pipeline": [{"command": copy_step(tmp_path / "ledger")}]},
         {"name": "notes", "path": str(root / "notes" / "inbox"),
          "pipeline": ["preprocess", "transcribe", "enhance"]}],
        transcribe={"backend": "openai", "base_url": transcriber.base_url,
                    "model": "whisper-1", "chunk_seconds": 4, "max_concurrent": 1},
        enhance={"base_url": enhancer.base_url, "model": "chat"},
        web={"control": True, "refresh_seconds": 0.5})


def page_url(config: Path) -> str:
    address = next(line.split('"')[1] for line in config.read_text().splitlines()
                   if line.startswith("metrics_address"))
    return f"http://{address}/"


@needs_browser
def test_status_page_in_a_browser(tmp_path: Path, browser: Any, artifacts: Path) -> None:
    transcriber, enhancer = FakeOpenAI(), FakeOpenAI()
    transcriber.transcribe = slow_chunks
    enhancer.script.extend([error(401, "invalid key")] * 20)
    with transcriber.running(), enhancer.running():
        config = daemon_config(tmp_path, transcriber, enhancer)
        url = page_url(config)
        env = {"TRAXD_WEB_TOKEN": TOKEN, "OPENAI_API_KEY": "sk-test-transcribe-0000",
               "DEEPSEEK_API_KEY": "sk-test-enhance-00000"}
        daemon = DaemonProcess(config, tmp_path / "daemon.log", env=env).start()
        try:
            browser.get(url)
            # A running job's progress moves (the page refreshes itself; no reload here).
            seen: set[int] = set()

            def progress_moved() -> bool:
                values = js(browser, "return Array.from(document.querySelectorAll("
                                     "'#running progress')).map(p => p.value);")
                seen.update(int(v) for v in values)
                return len({v for v in seen if 0 < v < 100}) >= 2

            wait_for(progress_moved, 90, "the progress bar to move")
            browser.save_screenshot(str(artifacts / "status-running.png"))
            wait_for(lambda: "refusing to copy" in text_of(browser, "#recent"), 60,
                     "the failed file with its reason")
            assert "bad.txt" in text_of(browser, "#recent")
            wait_for(lambda: "enhance" in text_of(browser, "#backends"), 90,
                     "the paused backend")
            assert "401" in text_of(browser, "#backends")
            browser.save_screenshot(str(artifacts / "status-page.png"))
            buttons_need_the_token(browser, url)
            browser.save_screenshot(str(artifacts / "status-control.png"))
            assert '"inbox": "docs"' in daemon.log_text() and "web_control" in daemon.log_text()
        finally:
            daemon.stop()
    assert TOKEN not in (tmp_path / "daemon.log").read_text()
    print(f"screenshots in {artifacts}")


def buttons_need_the_token(browser: Any, url: str) -> None:
    """No buttons without the token, a form posted without it refused, a wrong token
    refused; logged in with it, Pause pauses the inbox."""
    assert not browser.find_elements("css selector", "main button")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(
            url + "control/pause", data=b"inbox=docs", method="POST"), timeout=10)
    assert refused.value.code == 403
    log_in(browser, "not-the-token")
    wait_for(lambda: browser.find_elements("id", "login-failed"), 20, "the wrong token refused")
    browser.get(url)
    log_in(browser, TOKEN)
    wait_for(lambda: click(browser, "tr[data-inbox='docs'] button.pause"), 20,
             "the Pause button pressed")
    wait_for(lambda: "paused" in text_of(browser, "tr[data-inbox='docs']"), 20, "docs paused")


def click(browser: Any, selector: str) -> bool:
    """Press a button; False while it is missing or being replaced by a refresh."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        found = browser.find_elements("css selector", selector)
        if found:
            found[0].click()
        return bool(found)
    except StaleElementReferenceException:
        return False


def log_in(browser: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.CSS_SELECTOR, "form.login input[name='token']")
    field.send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()


@needs_browser
def test_page_is_readable_without_javascript(tmp_path: Path, artifacts: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    inbox = tmp_path / "box" / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "broken.txt").write_bytes(b"FAIL: nope")
    address = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "traxd.toml",
                          base_daemon(tmp_path, metrics_address=address, max_retries=0),
                          [{"name": "box", "path": str(inbox),
                            "pipeline": [{"command": copy_step(tmp_path / "ledger")}]}])
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        driver.get(f"http://{address}/")
        # The meta refresh (no script runs) brings the failure in.
        wait_for(lambda: "refusing to copy" in recent_text(driver), 60,
                 "the failure, by meta refresh")
        driver.save_screenshot(str(artifacts / "status-no-js.png"))
    finally:
        driver.quit()
        daemon.stop()


def recent_text(driver: Any) -> str:
    """The recent files' text; "" while the page is between two (meta) refreshes."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        return " ".join(e.text for e in driver.find_elements("id", "recent"))
    except StaleElementReferenceException:
        return ""


def test_page_stays_responsive_with_a_20000_file_backlog(tmp_path: Path) -> None:
    inbox = tmp_path / "big" / "inbox"
    inbox.mkdir(parents=True)
    for index in range(20_000):
        (inbox / f"f{index:05}.txt").write_bytes(b"%d" % index)
    address = f"127.0.0.1:{free_port()}"
    config = write_config(
        tmp_path / "traxd.toml", base_daemon(tmp_path, metrics_address=address),
        [{"name": "big", "path": str(inbox), "pipeline": [{"command": copy_step(
            tmp_path / "ledger")}]}])
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    latencies: list[float] = []
    pages: list[str] = []
    try:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # the backlog is being worked meanwhile
            started = time.monotonic()
            status, html = http_get(f"http://{address}/", timeout=10)
            latencies.append(time.monotonic() - started)
            assert status == 200
            pages.append(html)
            time.sleep(0.2)
    finally:
        daemon.stop()
    done = (tmp_path / "big" / "done")
    finished = len(list(done.iterdir())) if done.is_dir() else 0
    latencies.sort()
    worst, median = latencies[-1], latencies[len(latencies) // 2]
    print(f"status page with a 20,000-file backlog being worked ({finished} done meanwhile): "
          f"{len(latencies)} requests, median {median * 1000:.0f} ms, "
          f"worst {worst * 1000:.0f} ms")
    queued = [int(m) for m in re.findall(r'<td class="n">(\d+)</td>', pages[0])[:1]]
    assert queued and queued[0] > 15_000  # the backlog is on the page
    assert finished > 0 and median < 0.5 and worst < 2.0
