"""The console's guard: login, session cookie, CSRF, loopback-only without admin keys."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.console.session import SESSION_COOKIE, Sessions

from .conftest import ADMIN_KEY, USER_KEY, csrf_of, login

PAGES = ["/console/", "/console/traffic", "/console/queue", "/console/adapters",
         "/console/students", "/console/requests/req-000"]  # fmt: skip


@pytest.mark.parametrize("path", PAGES)
def test_no_session_is_401_with_the_login_form(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("text/html")
    assert 'name="key"' in r.text
    assert 'type="password"' in r.text
    assert "www-authenticate" not in r.headers


def test_bearer_keys_follow_the_admin_rule(client: TestClient) -> None:
    assert (
        client.get("/console/traffic", headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    user = client.get("/console/traffic", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert user.status_code == 403
    admin = client.get("/console/traffic", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 200
    assert ADMIN_KEY not in admin.text


def test_login_sets_a_strict_httponly_cookie_and_never_echoes_the_key(client: TestClient) -> None:
    login(client)
    cookie = client.cookies.get(SESSION_COOKIE)
    assert cookie
    assert cookie != ADMIN_KEY
    assert ADMIN_KEY not in cookie
    for path in PAGES:
        r = client.get(path)
        assert r.status_code == 200, path
        assert ADMIN_KEY not in r.text
        assert "ops" in r.text  # the key's id is shown instead


def test_login_cookie_attributes(client: TestClient) -> None:
    page = client.get("/console/login")
    token = re.search(r'name="login_csrf" value="([^"]+)"', page.text)
    assert token
    r = client.post(
        "/console/login",
        data={"login_csrf": token.group(1), "key": ADMIN_KEY},
        follow_redirects=False,
    )
    header = next(
        v for k, v in r.headers.multi_items() if k == "set-cookie" and SESSION_COOKIE + "=" in v
    )
    lowered = header.lower()
    assert "httponly" in lowered
    assert "samesite=strict" in lowered
    assert "path=/console" in lowered
    assert ADMIN_KEY not in header


def test_wrong_or_non_admin_key_is_refused_without_echo(client: TestClient) -> None:
    for key, status in (("sk-wrong-key-123456789", 401), (USER_KEY, 403)):
        page = client.get("/console/login")
        token = re.search(r'name="login_csrf" value="([^"]+)"', page.text)
        assert token
        r = client.post("/console/login", data={"login_csrf": token.group(1), "key": key})
        assert r.status_code == status
        assert key not in r.text
        assert client.cookies.get(SESSION_COOKIE) is None
    assert client.get("/console/traffic").status_code == 401


def test_login_form_needs_its_token(client: TestClient) -> None:
    client.get("/console/login")
    r = client.post("/console/login", data={"login_csrf": "forged", "key": ADMIN_KEY})
    assert r.status_code == 403
    assert client.cookies.get(SESSION_COOKIE) is None


def test_state_changing_forms_need_the_session_csrf_token(client: TestClient) -> None:
    login(client)
    page = client.get("/console/requests/req-010")
    token = csrf_of(page.text)
    url = "/console/requests/req-010/rate"
    assert client.post(url, data={"verdict": "up"}).status_code == 403
    assert client.post(url, data={"verdict": "up", "csrf_token": "wrong"}).status_code == 403
    assert client.post("/console/adapters/load", data={"name": "x"}).status_code == 403
    assert client.post("/console/logout", data={}).status_code == 403
    detail = client.get("/console/requests/req-010")
    assert "unrated" in detail.text  # nothing was stored
    ok = client.post(url, data={"verdict": "up", "csrf_token": token}, follow_redirects=False)
    assert ok.status_code == 303
    assert "1.00 (mean of 1)" in client.get("/console/requests/req-010").text


def test_csrf_header_is_accepted(client: TestClient) -> None:
    login(client)
    token = csrf_of(client.get("/console/adapters").text)
    r = client.post(
        "/console/adapters/load",
        data={"name": "nope"},
        headers={"X-CSRF-Token": token, "HX-Request": "true"},
    )
    assert r.status_code == 404  # the API's answer for an unknown adapter, not a CSRF refusal


def test_logout_ends_the_session(client: TestClient) -> None:
    login(client)
    token = csrf_of(client.get("/console/traffic").text)
    r = client.post("/console/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/console/traffic").status_code == 401


def test_session_cookie_of_another_process_is_refused(client: TestClient) -> None:
    client.cookies.set(SESSION_COOKIE, "made-up", path="/console")
    assert client.get("/console/traffic").status_code == 401


def test_without_admin_keys_loopback_only(
    open_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = open_client.get("/console/traffic")
    assert r.status_code == 200
    assert open_client.cookies.get(SESSION_COOKIE)  # an anonymous session, for its CSRF token
    token = csrf_of(r.text)
    rated = open_client.post(
        "/console/requests/req-001/rate",
        data={"verdict": "down", "csrf_token": token},
        follow_redirects=False,
    )
    assert rated.status_code == 303
    assert (
        open_client.post("/console/requests/req-001/rate", data={"verdict": "down"}).status_code
        == 403
    )
    # The same client seen as a remote host: refused, as /admin refuses it.
    from litestar.testing.transport import TestClientTransport

    parse = TestClientTransport.parse_request

    def remote(self: Any, request: Any) -> dict[str, Any]:
        scope = parse(self, request)
        scope["client"] = ("10.1.2.3", 50000)
        return scope

    monkeypatch.setattr(TestClientTransport, "parse_request", remote)
    assert open_client.get("/console/traffic").status_code == 403
    assert open_client.get("/admin/adapters").status_code == 403


def test_sessions_expire_and_are_bounded() -> None:
    s = Sessions(ttl_s=10.0, max_sessions=2)
    t1, first = s.create("a")
    assert s.get(t1) is first
    first.seen = time.time() - 11
    assert s.get(t1) is None
    s.create("b")
    s.create("c")
    s.create("d")
    assert len(s) == 2
    assert s.get(None) is None
    assert s.get("") is None


def test_framework_errors_keep_their_status() -> None:
    from litestar.exceptions import ClientException, NotFoundException

    from gateway.console.views import _as_api_error

    assert _as_api_error(NotFoundException("gone")).status_code == 404
    err = _as_api_error(ClientException("bad form", status_code=413))
    assert (err.status_code, err.message, err.type) == (413, "bad form", "invalid_request_error")
    assert _as_api_error(RuntimeError("boom")).status_code == 500
