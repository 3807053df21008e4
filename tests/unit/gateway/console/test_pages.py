"""The console's pages against a real app (fake engine) and a seeded SQLite log."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.console.overview import Sampler, quantile, sparkline
from retort.db.store import PromptStore
from tests.browser.seed import SEED_ADAPTER, seed_records

from .conftest import ADMIN_KEY, USER_KEY, csrf_of, login

RECORDS = {r.request_id: r for r in seed_records()}


def _ids(html: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r'href="/console/requests/(req-\d+)[?"]', html)))


def _feedback(client: TestClient, request_id: str) -> list[dict[str, object]]:
    store = client.app.state.gateway.promptlog.store

    async def read() -> list[dict[str, object]]:
        return await store.feedback_for(request_id)

    return client.blocking_portal.call(read)


@pytest.fixture
def admin(client: TestClient) -> TestClient:
    login(client)
    return client


def test_traffic_lists_newest_first_and_paginates(admin: TestClient) -> None:
    page1 = admin.get("/console/traffic")
    assert page1.status_code == 200
    assert "30 requests" in page1.text
    assert "page 1 of 2" in page1.text
    ids = _ids(page1.text)
    assert ids[0] == "req-029"
    assert len(ids) == 25
    page2 = admin.get("/console/traffic?page=2")
    assert _ids(page2.text) == [f"req-{i:03d}" for i in range(4, -1, -1)]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("adapter=support", {k for k, r in RECORDS.items() if r.adapter == SEED_ADAPTER}),
        ("served_by=student", {k for k, r in RECORDS.items() if r.served_by == "student"}),
        ("status=error", {k for k, r in RECORDS.items() if r.status == "error"}),
        ("model=bot-student", {k for k, r in RECORDS.items() if r.model == "bot-student"}),
        ("q=number+12%3A", {"req-012"}),
        ("q=ANSWER+IS+4.", {"req-002"}),
        ("feedback=rated", {"req-000", "req-003"}),
        ("min_score=0.5", {"req-000", "req-003"}),
        ("max_score=0.5", set()),
        ("since=90m", {k for k, r in RECORDS.items() if r.created >= time.time() - 5400}),
    ],
)
def test_traffic_filters(admin: TestClient, query: str, expected: set[str]) -> None:
    r = admin.get(f"/console/traffic?{query}")
    assert r.status_code == 200
    got = set(_ids(r.text))
    if query.startswith("since"):  # rows are a minute apart: allow the one at the edge
        assert len(got ^ expected) <= 1
    else:
        assert got == expected


def test_traffic_filter_partial_for_htmx(admin: TestClient) -> None:
    r = admin.get("/console/traffic?adapter=sql", headers={"HX-Request": "true"})
    assert r.status_code == 200
    assert "<html" not in r.text
    assert "<table" in r.text


@pytest.mark.parametrize(
    "query", ["since=yesterday-ish", "status=maybe", "page=0", "min_score=abc"]
)
def test_traffic_bad_filter_is_400_not_500(admin: TestClient, query: str) -> None:
    r = admin.get(f"/console/traffic?{query}")
    assert r.status_code == 400
    assert 'role="alert"' in r.text


def test_request_page_shows_the_whole_exchange(admin: TestClient) -> None:
    r = admin.get("/console/requests/req-006")
    assert r.status_code == 200
    text = r.text
    for needle in ("Question number 6: what is 6 + 6?", "The answer is 12.", "Be brief.",
                   "18 prompt, 5 completion", "engine overloaded", "$0.000007"):  # fmt: skip
        assert needle in text, needle
    assert admin.get("/console/requests/nope").status_code == 404


def test_request_page_shows_its_shadow_pair(admin: TestClient) -> None:
    store = admin.app.state.gateway.promptlog.store
    pair = {
        "request_id": "req-006",
        "created": time.time(),
        "teacher": "support",
        "student": "support-student",
        "measure": "exact",
        "score": 0.0,
        "agree": False,
        "outcome": "disagree",
        "teacher_text": "The answer is 12.",
        "student_text": "It is twelve, I think.",
        "teacher_latency_s": 0.5,
        "student_latency_s": 0.05,
        "teacher_cost_usd": 1e-5,
        "student_cost_usd": 1e-6,
        "student_tokens": 6,
        "error": None,
    }

    async def add() -> None:
        await store.insert_shadow([pair])

    assert "Shadow pair" not in admin.get("/console/requests/req-006").text
    admin.blocking_portal.call(add)
    text = admin.get("/console/requests/req-006").text
    for needle in ("Shadow pair", "support-student", "It is twelve, I think.", "disagree", "50 ms"):
        assert needle in text, needle


def test_redacted_fields_stay_redacted(admin: TestClient) -> None:
    r = admin.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {USER_KEY}", "x-request-id": "req-pii"},
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": "mail bob@example.com"}],
        },
    )
    assert r.status_code == 200
    deadline = time.time() + 5
    while (
        time.time() < deadline
        and "/console/requests/req-pii" not in admin.get("/console/traffic?q=req-pii").text
    ):
        time.sleep(0.05)
    page = admin.get("/console/requests/req-pii")
    assert page.status_code == 200
    assert "[REDACTED:EMAIL]" in page.text
    assert "bob@example.com" not in page.text
    assert "bob@example.com" not in admin.get("/console/traffic").text


def test_rating_stores_feedback_through_the_feedback_path(admin: TestClient) -> None:
    token = csrf_of(admin.get("/console/requests/req-004").text)
    r = admin.post(
        "/console/requests/req-004/rate",
        data={"csrf_token": token, "score": "0.75", "comment": "close", "correction": "It is 8."},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"] == "/console/requests/req-004?saved=1"
    page = admin.get(r.headers["location"]).text
    assert "Rating saved." in page
    assert "It is 8." in page
    assert "0.75 (mean of 1)" in page
    # the same rows /v1/feedback writes (and its correction field)
    api = admin.post(
        "/v1/feedback",
        headers={"Authorization": f"Bearer {USER_KEY}"},
        json={"request_id": "req-004", "score": 0.25, "correction": "8"},
    )
    assert api.status_code == 201
    assert api.json()["correction"] == "8"
    rows = _feedback(admin, "req-004")
    assert [(f["score"], f["comment"], f["correction"]) for f in rows] == [
        (0.75, "close", "It is 8."),
        (0.25, None, "8"),
    ]


@pytest.mark.parametrize(
    "form", [{"score": "1.5"}, {"score": "x"}, {}, {"verdict": "sideways"}, {"score": "nan"}]
)
def test_bad_ratings_are_400(admin: TestClient, form: dict[str, str]) -> None:
    token = csrf_of(admin.get("/console/requests/req-004").text)
    r = admin.post("/console/requests/req-004/rate", data={"csrf_token": token, **form})
    assert r.status_code == 400
    assert _feedback(admin, "req-004") == []


def test_rating_unknown_request_is_404(admin: TestClient) -> None:
    token = csrf_of(admin.get("/console/traffic").text)
    r = admin.post("/console/requests/nope/rate", data={"csrf_token": token, "verdict": "up"})
    assert r.status_code == 404


def test_queue_page_lists_the_queues(admin: TestClient) -> None:
    page = admin.get("/console/queue").text
    unrated = [r for r in RECORDS.values() if r.request_id not in {"req-000", "req-003"}]
    for adapter in (SEED_ADAPTER, "sql"):
        n = sum(1 for r in unrated if r.adapter == adapter)
        assert re.search(rf'\?adapter={adapter}">adapter {adapter}</a></th><td>{n}</td>', page)
    n = sum(1 for r in unrated if r.model == "fake-model")
    assert re.search(rf'\?model=fake-model">model fake-model</a></th><td>{n}</td>', page)


def test_queue_is_unrated_oldest_first_and_rating_moves_on(admin: TestClient) -> None:
    queue = admin.get(f"/console/queue?adapter={SEED_ADAPTER}")
    unrated = [k for k, r in sorted(RECORDS.items()) if r.adapter == SEED_ADAPTER][2:]
    assert _ids(queue.text) == unrated
    start = re.search(r'id="start-rating" href="([^"]+)"', queue.text)
    assert start
    url = start.group(1).replace("&amp;", "&")
    first = admin.get(url)
    assert f"Request <code>{unrated[0]}</code>" in first.text
    assert f"/console/requests/{unrated[1]}?" in first.text  # next unrated link
    token = csrf_of(first.text)
    r = admin.post(
        f"/console/requests/{unrated[0]}/rate",
        data={"csrf_token": token, "verdict": "down", "queue": "1", "adapter": SEED_ADAPTER},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"] == f"/console/requests/{unrated[1]}?queue=1&adapter={SEED_ADAPTER}"
    # rate the rest: the last one leads back to the (empty) queue
    for rid in unrated[1:]:
        r = admin.post(
            f"/console/requests/{rid}/rate",
            data={"csrf_token": token, "verdict": "up", "queue": "1", "adapter": SEED_ADAPTER},
            follow_redirects=False,
        )
    assert r.headers["location"] == f"/console/queue?adapter={SEED_ADAPTER}&done=1"
    assert "Nothing to rate." in admin.get(r.headers["location"]).text


def test_export_is_the_filtered_log_as_jsonl(admin: TestClient) -> None:
    r = admin.get("/console/traffic/export.jsonl?adapter=sql&status=ok")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/jsonl")
    assert "attachment" in r.headers["content-disposition"]
    rows = [json.loads(line) for line in r.text.splitlines()]
    expected = sorted(k for k, v in RECORDS.items() if v.adapter == "sql" and v.status == "ok")
    assert [row["request_id"] for row in rows] == expected
    assert rows[0]["messages"][1]["role"] == "user"
    assert "score" in rows[0]
    assert admin.get("/console/traffic/export.jsonl?since=bogus").status_code == 400


def test_adapters_page_and_api_shaped_errors(admin: TestClient, tmp_path: Path) -> None:
    page = admin.get("/console/adapters")
    assert page.status_code == 200
    assert "No adapters in the registry." in page.text
    token = csrf_of(page.text)
    missing = admin.post("/console/adapters/load", data={"csrf_token": token, "name": "nope"})
    assert missing.status_code == 404
    assert "&#34;code&#34;: &#34;model_not_found&#34;" in missing.text
    bad = tmp_path / "home" / "adapters" / "broken"
    bad.mkdir(parents=True)
    (bad / "adapter_config.json").write_text("{}")
    listed = admin.get("/console/adapters")
    assert "broken" in listed.text
    assert "invalid" in listed.text
    invalid = admin.post("/console/adapters/load", data={"csrf_token": token, "name": "broken"})
    assert invalid.status_code == 400
    assert "invalid_request_error" in invalid.text
    assert "Invalid adapter" in invalid.text
    unload = admin.post("/console/adapters/nope/unload", data={"csrf_token": token})
    assert unload.status_code == 404
    assert "is not loaded" in unload.text


def test_students_page_report_and_png(admin: TestClient) -> None:
    page = admin.get("/console/students")
    assert page.status_code == 200
    assert "bot-student" in page.text
    assert "0.970" in page.text
    assert "440.2" in page.text
    assert "No distillation runs recorded." in page.text
    detail = admin.get("/console/students/bot-student")
    assert detail.status_code == 200
    assert 'src="/console/students/bot-student/report.png"' in detail.text
    png = admin.get("/console/students/bot-student/report.png")
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert admin.get("/console/students/nobody").status_code == 404
    assert admin.get("/console/students/..%2F..%2Fetc/report.png").status_code == 404


def test_distill_runs_link_to_their_reports(admin: TestClient, tmp_path: Path) -> None:
    from distill.runs import finish_run, start_run

    out = tmp_path / "run-out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"student_model": "bot-student", "agreement": 0.9}))
    (out / "report.png").write_bytes(b"\x89PNG\r\n\x1a\nrun")
    store: PromptStore = admin.app.state.gateway.promptlog.store

    async def record() -> str:
        run_id = await start_run(
            store,
            key="support:abc",
            adapter=SEED_ADAPTER,
            model=None,
            watermark={"created": None, "count": 30},
            out_dir=str(out),
        )
        await finish_run(
            store,
            run_id,
            status="succeeded",
            student_model="bot-student",
            gate_passed=True,
            published=True,
            summary={"agreement": 0.9},
        )
        return run_id

    run_id = admin.blocking_portal.call(record)
    page = admin.get("/console/students")
    assert f'href="/console/runs/{run_id}"' in page.text
    run = admin.get(f"/console/runs/{run_id}")
    assert run.status_code == 200
    assert "0.900" in run.text
    assert admin.get(f"/console/runs/{run_id}/report.png").content.endswith(b"run")
    assert admin.get("/console/runs/nope").status_code == 404


def test_overview_shows_rates_per_model_and_adapter(admin: TestClient) -> None:
    for _ in range(3):
        r = admin.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200
    page = admin.get("/console/")
    assert page.status_code == 200
    row = re.search(r"<th scope=\"row\">fake-model</th><td>none</td>\s*<td>(\d+)", page.text)
    assert row
    assert row.group(1) == "3"
    assert ADMIN_KEY not in page.text


def test_sampler_rates_from_snapshots() -> None:
    from prometheus_client import CollectorRegistry

    from gateway.metrics import Metrics

    m = Metrics(CollectorRegistry())
    s = Sampler(m, interval_s=10)
    t0 = time.time() - 60
    s.sample(now=t0)
    for _ in range(6):
        m.observe_request("base", "a1", "ok", 10, 20, 0.05, 0.5, 0.001)
    s.sample(now=t0 + 30)
    stats = {(x.model, x.adapter): x for x in s.stats(now=t0 + 60)}
    a1 = stats[("base", "a1")]
    assert a1.requests == 6
    assert a1.req_per_s == pytest.approx(6 / 60)
    assert a1.tokens_per_s == pytest.approx(120 / 60)
    assert a1.cost_per_hour == pytest.approx(0.006 / 60 * 3600)
    assert 0.04 <= (a1.ttft_p50_s or 0) <= 0.06
    assert a1.spark_req_per_s == pytest.approx([6 / 30, 0.0])
    assert sparkline(a1.spark_req_per_s)


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.15)
    assert quantile(0.5, {float("inf"): 0.0}) is None
    assert quantile(0.99, {0.1: 0.0, float("inf"): 5.0}) == pytest.approx(0.1)
