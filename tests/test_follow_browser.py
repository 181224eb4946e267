"""The Job page's live output in a real browser (headless chromium, as in
tests/test_dashboard_browser.py): a real worker runs a followed shell job, and the page shows
its lines as the command prints them, as text."""

from __future__ import annotations

import threading
import time

from geartask.config import load_config
from geartask.fleet import Admin
from geartask.sender.sender import JobSender
from helpers import wait_until
from test_dashboard_browser import SCREENSHOTS, _text, browser  # noqa: F401 (browser is a fixture)
from test_follow import setup  # noqa: F401 (a fixture)

HOSTILE = "<img src=x onerror=\"window.pwned=1\">"


def test_job_page_shows_a_running_jobs_output_live(browser, setup, tmp_path):  # noqa: F811
    setup.worker()
    d = setup.dashboard()
    config = load_config(setup.path)
    flag = tmp_path / "go-on"
    unique = f"live-{time.monotonic_ns()}"
    script = (f"echo first line; echo '{HOSTILE}' >&2; "
              f"while [ ! -e {flag} ]; do sleep 0.1; done; echo second line; sleep 60")
    answer: dict = {}

    def run() -> None:
        with JobSender(config, record_background=False) as sender:
            answer["r"] = sender.submit("shell", {"cmd": ["sh", "-c", script], "follow": True}, unique=unique,
                                        timeout=120, on_data=lambda r, raw: None)
    thread = threading.Thread(target=run)
    thread.start()
    try:
        browser.get(d.url + f"/job?key={unique}")
        browser.execute_script("window.notReloaded = true;")
        # The page may come before the dashboard saw the job running: its own refresh then
        # brings the section, and the script fills it, without a reload.
        wait_until(lambda: "first line" in _text(browser, "#live-output pre"), 30, 0.2,
                   message="the live output on the page")
        assert HOSTILE in _text(browser, "#live-output pre")  # shown as text...
        assert not browser.find_elements("css selector", "#live-output img")  # ...never as HTML
        flag.write_text("")
        wait_until(lambda: "second line" in _text(browser, "#live-output pre"), 20, 0.2,
                   message="the next line, without reloading")
        assert browser.execute_script("return window.notReloaded === true && !window.pwned;")
        assert "bytes written" in _text(browser, "#live-output h3")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "live-output-running.png"))
    finally:
        admin = Admin.from_config(config)
        wait_until(lambda: admin.stop_job(unique).jobs, 30, message="the job stopped")
        thread.join(60)
    wait_until(lambda: not browser.find_elements("css selector", "#live-output"), 20, 0.2,
               message="the live section gone once the job ended")
    assert answer["r"].state == "failed"
