"""A real gateway process (fake engine, SQLite log seeded, one student, one LoRA adapter in the
registry) and a real headless Chromium driven by Playwright.

Chromium is Debian's ``chromium`` (``apt-get install chromium``). Without it the tests skip,
except under ``CI=true``, where a missing browser fails them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from loadtest.servers import Gateway, fake_gateway_config, start_gateway
from tests.browser.seed import SEED_ADAPTER, seed_adapter, seed_log, seed_student

ADMIN_KEY = "sk-admin-browser-0123456789abcdef"
USER_KEY = "sk-user-browser-0123456789abcdef"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Chromium is not installed (Debian package chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must run the browser tests")
        pytest.skip(message)
    return path


def _install_adapter(home: Path) -> None:
    """A peft LoRA for the fake engine's model, imported into the registry as ``support``
    (``retort adapters import``'s path: validated, then copied in with its manifest)."""
    from adapters.registry import AdapterRegistry

    raw = seed_adapter(home.parent / "adapter-src")
    registry = AdapterRegistry(home / "adapters", "fake-model", None, max_lora_rank=16)
    registry.import_(raw, SEED_ADAPTER)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    chromium_path()
    tmp = tmp_path_factory.mktemp("console")
    gw = start_gateway(
        tmp,
        "console",
        fake_gateway_config(
            {
                "engine": {"enable_lora": True},
                "auth": {
                    "api_keys": [
                        {"id": "app", "sha256": hash_key(USER_KEY)},
                        {"id": "ops", "sha256": hash_key(ADMIN_KEY), "admin": True},
                    ]
                },
                "students": {"autoload": False},
            }
        ),
    )
    try:
        asyncio.run(seed_log(f"sqlite+aiosqlite:///{gw.home}/retort.db"))
        seed_student(gw.home / "students")
        _install_adapter(gw.home)
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def browser(gateway: Gateway) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def login(page: Any, base_url: str, key: str = ADMIN_KEY) -> None:
    page.goto(base_url + "/console/login")
    page.get_by_label("Admin API key").fill(key)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r".*/console/?$"))


@pytest.fixture(scope="module")
def admin_state(browser: Any, gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A logged-in browser state (the session cookie), made once through the login form."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    login(page, gateway.url)
    path = str(tmp_path_factory.mktemp("state") / "state.json")
    context.storage_state(path=path)
    context.close()
    return path


@pytest.fixture
def page(browser: Any, admin_state: str) -> Iterator[Any]:
    context = browser.new_context(
        storage_state=admin_state, viewport={"width": 1280, "height": 800}
    )
    context.set_default_timeout(10_000)
    p = context.new_page()
    yield p
    context.close()


def admin_get(gateway: Gateway, path: str) -> httpx.Response:
    return httpx.get(
        gateway.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    )


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)
