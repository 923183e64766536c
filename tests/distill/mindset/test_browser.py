"""The Mindset UI in a real headless browser: Debian's chromium driven by Selenium.

These tests skip only when no chromium/chromedriver (or selenium) can be found on this machine,
saying why; in CI (``CI`` set) a missing browser is a failure, because .ci/run installs one.
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

from memstore import Store
from memstore_gpt2.mindset.session import check_student

PROMPT = "The for statement"
WAIT = 60  # seconds; the tiny model answers in well under one


def _browser_or_skip():
    problem = None
    try:
        import selenium  # noqa: F401
    except ImportError:
        problem = "selenium is not installed (pip install -e '.[dev]')"
    chromium = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )
    driver = shutil.which("chromedriver")
    if problem is None and not (chromium and driver):
        problem = (
            "Debian's chromium and chromium-driver are not installed "
            "(apt-get install chromium chromium-driver)"
        )
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {problem}")
        pytest.skip(problem)
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("flask", reason="the mindset extra (flask) is not installed")
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--disable-gpu"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


@pytest.fixture
def serve(student):
    from memstore_gpt2.mindset.web import MindsetServer, MindsetService

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    servers = []

    def start(allow_edits: bool):
        server = MindsetServer(MindsetService(str(student), allow_edits=allow_edits), 0).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _open(browser, server):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1"
    )


def _wait(browser, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT).until(lambda d: condition(d))


def _by_id(browser, name):
    return browser.find_element("id", name)


def test_trace_pick_a_token_switch_rows_off_and_regenerate(browser, serve):
    server = serve(False)
    _open(browser, server)
    service = server.service
    trace = service.trace(PROMPT, 8)
    chips = browser.find_elements("css selector", "#tokens .token")
    assert [c.text for c in chips] == trace["tokens"]  # shown as they are (no line breaks here)
    chips[1].click()  # ' for'
    assert "token 1" in _by_id(browser, "picked").text
    tables = browser.find_elements("css selector", "#fired table.fired")
    assert [t.get_attribute("data-layer") for t in tables] == ["layer0", "layer1"]
    shown = [
        int(r.get_attribute("data-id")) for r in tables[0].find_elements("css selector", "tbody tr")
    ]
    assert shown == trace["layers"]["layer0"]["ids"][1]
    first = tables[0].find_element("css selector", "tbody tr .off-box")
    first.click()
    assert f"layer0: {shown[0]}" in _by_id(browser, "off-list").text
    _by_id(browser, "regen-btn").click()
    _wait(browser, lambda d: _by_id(d, "gen-ablated").get_attribute("textContent"))
    expected = service.generate(PROMPT, {"layer0": [shown[0]]})
    assert _by_id(browser, "gen-normal").get_attribute("textContent") == expected["normal"]
    assert _by_id(browser, "gen-ablated").get_attribute("textContent") == expected["ablated"]
    assert "with 1 row(s) off" in _by_id(browser, "ablated-title").text
    assert not _by_id(browser, "error").is_displayed()
    png = browser.get_screenshot_as_png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # something was drawn


def test_browse_sort_search_and_explain_rows(browser, serve):
    from selenium.webdriver.support.ui import Select

    server = serve(False)
    _open(browser, server)
    Select(_by_id(browser, "rows-layer")).select_by_value("layer1")
    Select(_by_id(browser, "rows-sort")).select_by_value("hits")
    limit = _by_id(browser, "rows-limit")
    limit.clear()
    limit.send_keys("5")
    _by_id(browser, "rows-btn").click()
    _wait(browser, lambda d: "layer1:" in _by_id(d, "rows-summary").text)
    ids = [int(r.get_attribute("data-id"))
           for r in browser.find_elements("css selector", "#rows-result tbody tr")]  # fmt: skip
    expected = server.service.rows("layer1", "hits", None, 5)
    assert ids == [r["id"] for r in expected["rows"]]
    # search by promoted token: a plain word the first row promotes
    token = next(
        t["token"] for t in expected["rows"][0]["promotes"] if t["token"].strip().isalpha()
    )
    search = _by_id(browser, "rows-promotes")
    search.send_keys(token)
    Select(_by_id(browser, "rows-sort")).select_by_value("")
    _by_id(browser, "rows-btn").click()
    _wait(browser, lambda d: "promoting" in _by_id(d, "rows-summary").text)
    assert not _by_id(browser, "error").is_displayed()
    assert browser.find_elements("css selector", "#rows-result th")[4].text == "rank"
    rows = browser.find_elements("css selector", "#rows-result tbody tr")
    found = server.service.rows("layer1", None, token, 5)["rows"]
    assert [int(r.get_attribute("data-id")) for r in rows] == [r["id"] for r in found]
    assert ids[0] in [r["id"] for r in server.service.rows("layer1", None, token, 0)["rows"]]
    rows[0].find_element("css selector", "a.rid").click()
    _wait(browser, lambda d: "LRFU score" in _by_id(d, "explain").text)
    assert "promotes" in _by_id(browser, "explain").text
    # read-only: the edit form is switched off and says how to switch it on
    assert _by_id(browser, "edit-readonly").is_displayed()
    assert not _by_id(browser, "edit-preview").is_enabled()


def test_edit_needs_a_confirmation(browser, serve, student):
    from selenium.webdriver.support.ui import Select

    server = serve(True)
    _open(browser, server)
    url = check_student(student)
    with Store(url) as store:
        victim = int(store.collection("layer1").export_rows().ids[7])
    assert "edits allowed" in _by_id(browser, "mode").text
    Select(_by_id(browser, "edit-layer")).select_by_value("layer1")
    Select(_by_id(browser, "edit-action")).select_by_value("delete")
    _by_id(browser, "edit-ids").send_keys(str(victim))
    _by_id(browser, "edit-preview").click()
    _wait(browser, lambda d: _by_id(d, "edit-plan").is_displayed())
    assert f"Would delete layer1 row(s) {victim}" in _by_id(browser, "edit-description").text
    assert _by_id(browser, "edit-before").text.startswith(PROMPT)
    with Store(url) as store:
        assert victim in store.collection("layer1").export_rows().ids  # nothing written yet
    _by_id(browser, "edit-confirm").click()
    _wait(browser, lambda d: _by_id(d, "edit-result").is_displayed())
    assert "Done: delete layer1 row(s)" in _by_id(browser, "edit-result").text
    with Store(url) as store:
        assert victim not in store.collection("layer1").export_rows().ids
    assert not np.isin(victim, server.service.mindset.layer("layer1").layer.index.ids.numpy())


def test_a_grown_student_shows_its_extra_rows(browser, grown_student):
    from selenium.webdriver.support.ui import Select

    from memstore_gpt2.mindset.web import MindsetServer, MindsetService

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = MindsetServer(MindsetService(str(grown_student), allow_edits=True), 0).start()
    try:
        _open(browser, server)
        trace = server.service.trace(PROMPT, 8)
        tables = browser.find_elements("css selector", "#fired table.fired")
        names = ["layer0", "layer0.extra", "layer1", "layer1.extra"]
        assert [t.get_attribute("data-layer") for t in tables] == names
        titles = [d.text for d in browser.find_elements("css selector", "#fired .layer-name")]
        assert titles[0].startswith("layer0 (block 0) — ")
        assert titles[1].startswith("layer0.extra (block 0 extra) — 8 rows read")
        extra = tables[1].find_elements("css selector", "tbody tr")
        last = len(trace["tokens"]) - 1  # the page picks the last token
        shown = [int(r.get_attribute("data-id")) for r in extra]
        assert shown == trace["layers"]["layer0.extra"]["ids"][last]
        extra[0].find_element("css selector", "a.rid").click()
        _wait(browser, lambda d: "product key [" in _by_id(d, "explain").text)
        assert f"layer0.extra row {shown[0]}" in _by_id(browser, "explain-title").text
        # product-key rows are zeroed, never deleted: the form does not offer it
        Select(_by_id(browser, "edit-layer")).select_by_value("layer0.extra")
        action = Select(_by_id(browser, "edit-action"))
        assert action.first_selected_option.get_attribute("value") == "zero"
        delete = _by_id(browser, "edit-action").find_element("css selector", "[value=delete]")
        assert not delete.is_enabled()
        assert not _by_id(browser, "error").is_displayed()
    finally:
        server.stop()
