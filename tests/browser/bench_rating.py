"""Benchmark: rate a queue of 20 requests with the keyboard alone, in headless Chromium
against a real gateway process (fake engine, seeded SQLite log). Prints the wall time of the
20 ratings (each: a key press, the rating stored, the next unrated request's page loaded).

    PYTHONPATH=$PWD .venv/bin/python -m tests.browser.bench_rating
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from loadtest.servers import fake_gateway_config, start_gateway
from tests.browser.conftest import CHROMIUM_ARGS, chromium_path
from tests.browser.seed import SEED_ADAPTER, seed_log

N = 20


def main() -> None:
    from playwright.sync_api import sync_playwright

    config = fake_gateway_config({"students": {"autoload": False}})
    gw = start_gateway(Path(tempfile.mkdtemp()), "bench", config)
    try:
        records = asyncio.run(seed_log(f"sqlite+aiosqlite:///{gw.home}/retort.db", 70, rated=0))
        queue = [r.request_id for r in records if r.adapter == SEED_ADAPTER][: N + 1]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(gw.url + f"/console/queue?adapter={SEED_ADAPTER}")
            page.get_by_role("link", name="Start rating").click()
            page.get_by_role("heading", name=f"Request {queue[0]}").wait_for()
            t0 = time.perf_counter()
            for i in range(N):
                page.keyboard.press("u" if i % 2 else "d")
                page.get_by_role("heading", name=f"Request {queue[i + 1]}").wait_for()
            elapsed = time.perf_counter() - t0
            browser.close()
        print(f"{N} ratings with the keyboard: {elapsed:.1f} s ({elapsed / N * 1000:.0f} ms each)")
    finally:
        gw.stop()


if __name__ == "__main__":
    main()
