"""A student's rollout on its console page: the panel, and the operator's actions (htmx and
plain forms, CSRF-checked), through the same code as the admin API."""

from __future__ import annotations

from litestar.testing import TestClient

from .conftest import ADMIN_KEY, csrf_of, login

PAGE = "/console/students/bot-student"
HX = {"hx-request": "true"}


def test_rollout_panel_and_actions(client: TestClient) -> None:
    login(client)
    page = client.get(PAGE)
    assert page.status_code == 200
    assert "No rollout yet" in page.text
    token = csrf_of(page.text)
    # Without the session's CSRF token the action is refused.
    r = client.post(f"{PAGE}/rollout/start", data={}, headers=HX)
    assert r.status_code == 403
    # The seeded student was distilled from an adapter this gateway does not have.
    r = client.post(f"{PAGE}/rollout/start", data={"csrf_token": token}, headers=HX)
    assert r.status_code == 404
    assert "`support` is neither the base model nor an adapter" in r.text
    form = {"csrf_token": token, "teacher": "fake-model", "reason": "try it"}
    r = client.post(f"{PAGE}/rollout/start", data=form, headers=HX)
    assert r.status_code == 200, r.text
    assert 'id="rollout-panel"' in r.text
    assert "start: none -&gt; shadow (share 0)." in r.text
    assert "<dd>fake-model</dd>" in r.text
    assert "try it" in r.text
    assert "waiting for shadow pairs: 0 of 50" in r.text
    assert 'aria-label="Pause the rollout of bot-student"' in r.text
    # promote, then pause: a plain form posts and comes back to the page.
    r = client.post(f"{PAGE}/rollout/promote", data={"csrf_token": token}, headers=HX)
    assert "advance: shadow -&gt; canary (share 0.05)." in r.text
    assert "5.0% of the teacher's requests" in r.text
    r = client.post(f"{PAGE}/rollout/pause", data={"csrf_token": token}, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, PAGE)
    html = client.get(PAGE).text
    assert "canary</span> (paused)" in html
    assert 'aria-label="Resume the rollout of bot-student"' in html
    # A refused transition shows the API's own error body.
    r = client.post(f"{PAGE}/rollout/pause", data={"csrf_token": token}, headers=HX)
    assert r.status_code == 409
    assert "The API answered 409" in r.text
    assert "already paused" in r.text
    r = client.post(f"{PAGE}/rollout/rollback", data={"csrf_token": token}, headers=HX)
    assert "rolled_back</span> (rolled_back)" in r.text
    assert "Start again" in r.text
    # The admin API sees the same rollout and its events.
    api = client.get(
        "/admin/students/bot-student/rollout", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert api.status_code == 200
    assert [e["action"] for e in api.json()["events"]] == ["rollback", "pause", "advance", "start"]
