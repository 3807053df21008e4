"""The console in a real headless Chromium against a real gateway process.

Each main page is saved to ``docs/console/<page>.png`` (the README shows them).
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

import httpx

from loadtest.servers import Gateway
from tests.browser.conftest import (
    ADMIN_KEY,
    USER_KEY,
    admin_get,
    screenshot,
)
from tests.browser.seed import SEED_ADAPTER, seed_records

RECORDS = seed_records()


def _table_ids(page: Any) -> list[str]:
    links = page.locator("#traffic-table tbody a").all_inner_texts()
    return [t.strip() for t in links]


def _feedback(gateway: Gateway) -> list[tuple[str, float, str | None]]:
    with sqlite3.connect(gateway.home / "retort.db") as db:
        rows = db.execute(
            "SELECT request_id, score, correction FROM feedback WHERE comment IS NULL ORDER BY id"
        ).fetchall()
    return [(r[0], float(r[1]), r[2]) for r in rows]


def test_login_with_an_admin_key(browser: Any, gateway: Gateway) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    response = page.goto(gateway.url + "/console/traffic")
    assert response is not None
    assert response.status == 401
    key = page.get_by_label("Admin API key")
    assert key.get_attribute("type") == "password"
    screenshot(page, "login")
    key.fill(USER_KEY)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("alert").filter(has_text="not an admin key").wait_for()
    assert USER_KEY not in page.content()
    page.get_by_label("Admin API key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r".*/console/traffic$"))
    assert page.get_by_role("heading", name="Traffic").is_visible()
    assert ADMIN_KEY not in page.content()
    cookies = {c["name"]: c for c in context.cookies()}
    session = cookies["retort_console"]
    assert session["httpOnly"]
    assert session["sameSite"] == "Strict"
    assert ADMIN_KEY not in session["value"]
    context.close()


def test_filter_the_traffic(page: Any, gateway: Gateway) -> None:
    page.goto(gateway.url + "/console/traffic")
    assert len(_table_ids(page)) == 25
    page.get_by_label("Adapter").fill(SEED_ADAPTER)
    page.get_by_label("Status").select_option("ok")  # change: htmx swaps the table
    expected = [
        r.request_id for r in reversed(RECORDS) if r.adapter == SEED_ADAPTER and r.status == "ok"
    ]
    page.wait_for_function(
        "n => document.querySelectorAll('#traffic-table tbody a').length === n", arg=len(expected)
    )
    assert _table_ids(page) == expected
    assert "adapter=support" in page.url
    assert "status=ok" in page.url
    page.get_by_label("Text").fill("number 12:")
    page.wait_for_function("() => document.querySelectorAll('#traffic-table tbody a').length === 1")
    assert _table_ids(page) == ["req-012"]
    page.get_by_label("Text").fill("")
    page.get_by_label("Adapter").fill("")
    page.get_by_label("Status").select_option("")
    page.wait_for_function(
        "() => document.querySelectorAll('#traffic-table tbody a').length === 25"
    )
    screenshot(page, "traffic")
    with page.expect_download() as info:
        page.get_by_role("link", name="Export JSONL").click()
    lines = open(info.value.path()).read().splitlines()  # noqa: SIM115
    assert len(lines) == len(RECORDS)


def test_rate_three_requests_with_the_keyboard(page: Any, gateway: Gateway) -> None:
    before = _feedback(gateway)
    page.goto(gateway.url + f"/console/queue?adapter={SEED_ADAPTER}")
    queue = [r.request_id for r in RECORDS if r.adapter == SEED_ADAPTER][2:]  # 2 seeded ratings
    screenshot(page, "queue")
    page.get_by_role("link", name="Start rating").focus()
    page.keyboard.press("Enter")
    for i, key in enumerate(["u", "d", "3"]):
        page.get_by_role("heading", name=f"Request {queue[i]}").wait_for()
        if i == 2:
            page.keyboard.press("c")  # into the correction, type, leave with Escape
            page.keyboard.type("The answer is 24.")
            page.keyboard.press("Escape")
            screenshot(page, "rating")
        page.keyboard.press(key)
    page.get_by_role("heading", name=f"Request {queue[3]}").wait_for()
    rated = _feedback(gateway)[len(before) :]
    assert rated == [
        (queue[0], 1.0, None),
        (queue[1], 0.0, None),
        (queue[2], 0.5, "The answer is 24."),
    ]
    page.keyboard.press("n")  # skip one without rating
    page.get_by_role("heading", name=f"Request {queue[4]}").wait_for()
    assert len(_feedback(gateway)) == len(before) + 3


def test_load_and_unload_an_adapter(page: Any, gateway: Gateway) -> None:
    page.goto(gateway.url + "/console/adapters")
    row = page.locator(f"#adapter-{SEED_ADAPTER}")
    assert "registered" in row.inner_text()
    row.get_by_role("button", name=f"Load {SEED_ADAPTER}").click()
    page.get_by_role("status").filter(has_text=f"Loaded {SEED_ADAPTER}").wait_for()
    # keyboard focus moves to the outcome of the action
    page.wait_for_function("() => document.activeElement.textContent.startsWith('Loaded')")
    loaded = admin_get(gateway, "/admin/adapters").json()["data"]
    assert [a["loaded"] for a in loaded if a["name"] == SEED_ADAPTER] == [True]
    row.get_by_role("button", name=f"Pin {SEED_ADAPTER}").click()
    page.get_by_role("status").filter(has_text=f"Pinned {SEED_ADAPTER}").wait_for()
    row.get_by_role("button", name=f"Unload {SEED_ADAPTER}").click()  # pinned: the API says 409
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "409" in alert.inner_text()
    assert "is pinned" in alert.inner_text()
    row.get_by_role("button", name=f"Unpin {SEED_ADAPTER}").click()
    page.get_by_role("status").filter(has_text=f"Unpinned {SEED_ADAPTER}").wait_for()
    screenshot(page, "adapters")
    row.get_by_role("button", name=f"Unload {SEED_ADAPTER}").click()
    page.get_by_role("status").filter(has_text=f"Unloaded {SEED_ADAPTER}").wait_for()
    loaded = admin_get(gateway, "/admin/adapters").json()["data"]
    assert [a["loaded"] for a in loaded if a["name"] == SEED_ADAPTER] == [False]


def test_open_a_students_report(page: Any, gateway: Gateway) -> None:
    page.goto(gateway.url + "/console/students")
    assert "0.970" in page.locator("tbody tr", has_text="bot-student").inner_text()
    screenshot(page, "students")
    page.get_by_role("link", name="bot-student").first.click()
    page.get_by_role("heading", name="Student bot-student").wait_for()
    img = page.get_by_role("img", name=re.compile("Distillation report chart"))
    img.wait_for()
    assert page.evaluate("el => el.naturalWidth > 0", img.element_handle())
    screenshot(page, "student")


def test_overview_charts(page: Any, gateway: Gateway) -> None:
    for _ in range(4):
        r = httpx.post(
            gateway.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert r.status_code == 200
    page.goto(gateway.url + "/console/")
    row = page.locator("tbody tr", has_text="fake-model").first
    assert re.search(r"\b4\b", row.inner_text())
    assert page.locator("svg.spark").count() >= 4
    screenshot(page, "overview")


def test_accessibility(page: Any, gateway: Gateway) -> None:
    """Every form control has a label; the aria tree names the page's parts; Tab order."""
    for path in ["/console/", "/console/traffic", "/console/queue", "/console/adapters",
                 "/console/students", "/console/requests/req-000"]:  # fmt: skip
        page.goto(gateway.url + path)
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, button')]
                 .filter(el => el.type !== 'hidden')
                 .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                               && !(el.tagName === 'BUTTON' && el.textContent.trim()))
                 .map(el => el.outerHTML)"""
        )
        assert unlabelled == [], (path, unlabelled)
        tree = page.locator("body").aria_snapshot()
        assert '- navigation "Console"' in tree, path
        assert "- main" in tree, path
        assert "- heading" in tree, path
    page.goto(gateway.url + "/console/requests/req-000")
    tree = page.locator("#rate-form").aria_snapshot()
    for control in ['button "Good u"', 'button "Bad d"', "textbox", 'group "Verdict"']:
        assert control in tree, tree
    # keyboard focus order: skip link first, then the navigation, in reading order
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    names = []
    for _ in range(5):
        page.keyboard.press("Tab")
        names.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert names == ["Overview", "Traffic", "Rating queue", "Adapters", "Students"]
