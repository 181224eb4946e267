"""The dashboard in a real browser: Selenium drives Debian's headless chromium through its
packaged chromedriver (never a downloaded one), against two real gearmand, real worker
processes and a real dashboard process. Each test leaves a screenshot in var/screenshots/."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dashboards import DashboardProc, queue_background
from helpers import REPO, missing_in_this_environment, wait_until
from workers import WorkerProc

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = REPO / "var" / "screenshots"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900"]


@pytest.fixture
def browser(tmp_path, request):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing_in_this_environment("chromium and chromium-driver are not installed: run scripts/install.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        try:
            driver.save_screenshot(str(SCREENSHOTS / f"{request.node.name}.png"))
        finally:
            driver.quit()


@pytest.fixture
def fleet(gearmand_factory, make_config, tmp_path):
    """Two servers, a config naming both, and a way to start workers and the dashboard."""
    s1, s2 = gearmand_factory(), gearmand_factory()
    path, _ = make_config([s1, s2], "worker:\n  shell:\n    allow: [sleep, sh]\n  retries: 0\n")
    procs: list = []

    class Fleet:
        servers = (s1, s2)
        config = path

        @staticmethod
        def worker(name: str, threads: int = 1) -> WorkerProc:
            w = WorkerProc(path, name, threads)
            procs.append(w)
            return w.wait_attached([s1.address, s2.address])

        @staticmethod
        def dashboard(*extra: str) -> DashboardProc:
            d = DashboardProc(path, *extra, refresh=1.0)
            procs.append(d)
            return d.wait_ready()

    yield Fleet
    for p in reversed(procs):
        p.stop()


def _text(driver, css: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    try:
        return driver.find_element("css selector", css).text
    except (NoSuchElementException, StaleElementReferenceException):  # replaced by a live update
        return ""


def _click(driver, css: str) -> None:
    """Click what the page shows now (a live update may replace the element between find and click)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def attempt():
        try:
            driver.find_element("css selector", css).click()
            return True
        except (StaleElementReferenceException, NoSuchElementException):  # or the next page is still loading
            return False
    wait_until(attempt, 10, 0.1, message=f"click {css}")


def _shows(driver, css: str, *texts: str) -> None:
    """Wait until the element shows every text (the page may still be loading after a click)."""
    wait_until(lambda: all(t in _text(driver, css) for t in texts), 10, 0.1, message=f"{css} showing {texts}")


def _gearadmin_queued(server, function: str) -> int:
    host, port = server.address.rsplit(":", 1)
    out = subprocess.run(["gearadmin", "-h", host, "-p", port, "--status"], capture_output=True, text=True,
                         timeout=15, check=True).stdout
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0] == function:
            return int(parts[1]) - int(parts[2])
    return 0


def test_overview_shows_both_servers_and_the_worker_ips_and_counts_change_live(browser, fleet, fname):
    s1, s2 = fleet.servers
    fleet.worker("bw1")
    d = fleet.dashboard()
    browser.get(d.url + "/")
    for s in (s1, s2):
        row = f'tr[data-server="{s.address}"]'
        wait_until(lambda: "up" in _text(browser, row), 10, message=f"{s.address} shown up")
    wait_until(lambda: "127.0.0.1" in _text(browser, ".hosts"), 10, message="the worker's IP shown")
    wait_until(lambda: _text(browser, "#total-queued") == "0", 10, message="0 queued")  # "" while replaced
    browser.execute_script("window.notReloaded = true;")
    queue_background(s1, fname, 5)
    queue_background(s2, fname, 2)
    wait_until(lambda: _text(browser, "#total-queued") == "7", 10, message="7 queued shown")
    assert browser.execute_script("return window.notReloaded === true;"), "the page was reloaded"
    # the per-function chart appeared for the new function, as inline SVG
    wait_until(lambda: fname in _text(browser, ".charts"), 10, message="a chart for the function")
    assert browser.find_elements("css selector", ".chart svg.tchart")
    browser.get(d.url + "/functions")
    browser.execute_script("window.notReloaded = true;")
    row = f'tr[data-function="{fname}"] td.queued'
    wait_until(lambda: _text(browser, row) == "7", 10, message="7 queued on the Functions page")
    queue_background(s1, fname, 3)
    wait_until(lambda: _text(browser, row) == "10", 10, message="10 queued, without reloading")
    assert browser.execute_script("return window.notReloaded === true;")


def test_clear_a_function_from_the_functions_page(browser, fleet, fname):
    s1, s2 = fleet.servers
    queue_background(s1, fname, 6)
    queue_background(s2, fname, 4)
    other = fname + ".other"
    queue_background(s1, other, 3)
    d = fleet.dashboard()
    browser.get(d.url + "/functions?sort=queued&desc=1")
    wait_until(lambda: _text(browser, f'tr[data-function="{fname}"] td.queued') == "10", 10, message="10 queued")
    _click(browser, f'tr[data-function="{fname}"] button.clear')
    _shows(browser, ".question", "Remove the 10 queued jobs")
    assert _gearadmin_queued(s1, fname) == 6  # asking changed nothing
    _click(browser, "#confirm")
    _shows(browser, "#message", "10 queued jobs", "cleared")
    assert _gearadmin_queued(s1, fname) == 0 and _gearadmin_queued(s2, fname) == 0
    assert _gearadmin_queued(s1, other) == 3  # only that function
    _click(browser, "#back")
    wait_until(lambda: _text(browser, f'tr[data-function="{fname}"] td.queued') == "0", 10, message="0 shown")


def test_shut_down_worker_processes_from_the_workers_page(browser, fleet):
    wa, wb = fleet.worker("wa"), fleet.worker("wb")
    d = fleet.dashboard()
    browser.get(d.url + "/workers")
    wait_until(lambda: "answering" in _text(browser, f'tr[data-name="wa"][data-pid="{wa.pid}"]'), 15,
               message="wa listed and answering")
    _shows(browser, 'section.host[data-host="127.0.0.1"] h2', "127.0.0.1")
    # graceful: one confirmation
    _click(browser, f'tr[data-name="wa"][data-pid="{wa.pid}"] button.shutdown')
    _shows(browser, ".question", "Shut down worker process wa")
    _click(browser, "#confirm")
    _shows(browser, "#message", "shutdown sent to 1 of 1")
    assert wa.wait(30) == 0
    assert wb.proc.poll() is None  # the other one runs on
    # now: a second confirmation first
    browser.get(d.url + "/workers")
    wait_until(lambda: not browser.find_elements("css selector", 'tr[data-name="wa"]'), 15, message="wa gone")
    _click(browser, f'tr[data-name="wb"][data-pid="{wb.pid}"] input[name="now"]')
    _click(browser, f'tr[data-name="wb"][data-pid="{wb.pid}"] button.shutdown')
    _click(browser, "#confirm")
    _shows(browser, ".question", "Second confirmation")
    assert wb.proc.poll() is None
    _click(browser, "#confirm")
    _shows(browser, "#message", "shutdown now sent")
    assert wb.wait(30) == 0


def test_requeue_a_failed_job_from_the_failed_page(browser, fleet, fname, tmp_path):
    s1, _ = fleet.servers
    flag = tmp_path / "flag"
    fleet.worker("rw")
    d = fleet.dashboard()
    # fails while the flag file is missing, succeeds once it is there
    from geartask.config import load_config
    from geartask.sender.sender import JobSender
    with JobSender(load_config(fleet.config), record_background=False) as sender:
        (res,) = sender.submit_many([{"task": "shell", "data": {"cmd": ["sh", "-c", f"test -e {flag}"]},
                                      "unique": fname, "background": True, "retries": 0}], wait=False)
    assert res.state == "queued", res
    browser.get(d.url + "/failed")
    wait_until(lambda: fname in _text(browser, "table.failed"), 30, message="the failed job listed")
    flag.write_text("now it works")
    _click(browser, f'tr[data-unique="{fname}"] button.requeue-one')
    _click(browser, "#confirm")
    _shows(browser, "#message", "1 of 1 failed job requeued")
    browser.get(d.url + f"/job?key={fname}")
    wait_until(lambda: "complete" in _text(browser, "h1 .badge"), 30, message="the requeued job succeeded")


def test_overview_draws_the_throughput_chart_with_axes_and_the_job_page_a_traceback(browser, fleet, fname):
    from dashboards import report_outcome
    s1, _ = fleet.servers
    d = fleet.dashboard()
    tb = "Traceback (most recent call last):\n  File \"ingest.py\", line 7, in parse_row\nValueError: bad row"
    report_outcome(s1, handle="H:b:1", task="billing.ingest", unique=fname, data=b'{"row": "1042,<b>x</b>"}',
                   reason={"error": "ValueError: bad row", "traceback": tb}, extra={"traceback": tb})
    browser.get(d.url + "/")
    wait_until(lambda: _text(browser, "#throughput-failed") == "1", 15, message="the failed outcome charted")
    svg = browser.find_element("css selector", "#throughput svg.tchart")
    labels = [t.text for t in svg.find_elements("css selector", "text")]
    assert "jobs per minute" in labels and "time (UTC)" in labels and "0" in labels  # axes and a scale
    assert len(svg.find_elements("css selector", "polyline.line")) == 2  # completed and failed
    size = svg.size
    assert size["width"] >= 600 and size["height"] >= 200  # drawn, not collapsed
    browser.get(d.url + f"/job?key={fname}")
    _shows(browser, "pre.traceback", "Traceback (most recent call last)", "line 7, in parse_row", "ValueError: bad row")
    _shows(browser, "pre.data", "1042,<b>x</b>")  # shown as text: the markup is not rendered
    assert not browser.find_elements("css selector", "pre.data b")
    assert browser.find_element("css selector", "button.requeue-one").is_displayed()


def test_long_function_names_are_not_broken_mid_word(browser, fleet, fname):
    s1, _ = fleet.servers
    long_name = fname + ".reports_nightly_export_to_the_warehouse_with_every_partition_included"
    queue_background(s1, long_name, 2)
    d = fleet.dashboard()
    browser.set_window_size(700, 900)
    browser.get(d.url + "/functions")
    cell = f'tr[data-function="{long_name}"] td.fn'
    wait_until(lambda: browser.find_elements("css selector", cell), 10, message="the function listed")
    el = browser.find_element("css selector", cell)
    line = float(browser.execute_script("return parseFloat(getComputedStyle(arguments[0]).lineHeight)", el))
    assert el.size["height"] < 2 * line + 12, el.size  # one line: never wrapped inside the name
    assert el.get_attribute("title") == long_name  # the whole name, even when cut with an ellipsis
    browser.get(d.url + "/")
    caption = f'figure[data-function="{long_name}"] .fn'
    wait_until(lambda: browser.find_elements("css selector", caption), 10, message="its chart")
    el = browser.find_element("css selector", caption)
    assert el.size["height"] < 2 * line and el.get_attribute("title") == long_name
