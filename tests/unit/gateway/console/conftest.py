from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.auth.keys import APIKey, AuthSettings, hash_key
from gateway.engines.fake import FakeEngine
from gateway.promptlog import PromptLogSettings
from gateway.settings import EngineSettings, Settings
from gateway.studentpool import StudentsSettings
from tests.browser.seed import seed_log, seed_student

ADMIN_KEY = "sk-admin-console-0123456789abcdef"
USER_KEY = "sk-user-console-0123456789abcdef"


def make_settings(tmp_path: Path, *, admin: bool = True) -> Settings:
    keys = [APIKey(id="app", sha256=hash_key(USER_KEY))]
    if admin:
        keys.append(APIKey(id="ops", sha256=hash_key(ADMIN_KEY), admin=True))
    return Settings(
        home=str(tmp_path / "home"),
        engine=EngineSettings(kind="fake", max_model_len=256, enable_lora=True),
        promptlog=PromptLogSettings(
            url=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", flush_interval_s=0.05
        ),
        auth=AuthSettings(api_keys=keys),
        students=StudentsSettings(autoload=False),
    )


def _client(tmp_path: Path, *, admin: bool) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, admin=admin)
    asyncio.run(seed_log(settings.promptlog.url or ""))
    seed_student(tmp_path / "home" / "students", png=b"\x89PNG\r\n\x1a\nfake")
    engine = FakeEngine(model_name="fake-model", max_model_len=256)
    with TestClient(create_app(settings, engine=engine)) as c:
        yield c


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """A gateway with an admin key configured, a seeded log and one student."""
    yield from _client(tmp_path, admin=True)


@pytest.fixture
def open_client(tmp_path: Path) -> Iterator[TestClient]:
    """The same without admin keys: the console is open to loopback clients."""
    yield from _client(tmp_path, admin=False)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(client: TestClient, key: str = ADMIN_KEY) -> None:
    page = client.get("/console/login")
    assert page.status_code == 200
    token = re.search(r'name="login_csrf" value="([^"]+)"', page.text)
    assert token
    r = client.post(
        "/console/login",
        data={"login_csrf": token.group(1), "key": key, "next": "/console/traffic"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/console/traffic"
