"""Schemathesis fuzzing of chat, completions, responses and models: no input may produce a 5xx.

The gateway runs for real (uvicorn on a loopback port) over the deterministic fake engine,
so hundreds of cases finish in seconds. Positive and negative (schema-violating) cases
are generated from the gateway's own OpenAPI document at ``/schema/openapi.json``.
"""

from __future__ import annotations

import tempfile
from collections import Counter

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from gateway.app import create_app
from gateway.engines.fake import FakeEngine
from gateway.promptlog import PromptLogSettings
from gateway.settings import EngineSettings, ServerSettings, Settings
from loadtest.servers import AppServer
from tests.openai_schema import assert_valid

EXAMPLES_PER_OPERATION = 200  # x 3 POST operations, models, responses GET/DELETE: > 500 cases


def _serve() -> str:
    settings_ = Settings(
        engine=EngineSettings(kind="fake", max_model_len=256),
        server=ServerSettings(max_body_bytes=256 * 1024),
        # Its own database: stored responses and log records never reach $RETORT_HOME.
        promptlog=PromptLogSettings(url=f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/retort.db"),
    )
    app = create_app(settings_, engine=FakeEngine(model_name="fake-model", max_model_len=256))
    return AppServer(app).start()  # a daemon thread: it ends with the test run


BASE_URL = _serve()
schema = schemathesis.openapi.from_url(BASE_URL + "/schema/openapi.json")
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=EXAMPLES_PER_OPERATION,
)
seen: Counter[str] = Counter()


@schema.include(
    path_regex="^/v1/(chat/completions|completions|models(/.*)?|responses(/[^/]+)?)$"
).parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case) -> None:
    if isinstance(case.body, dict) and "model" in case.body and sum(seen.values()) % 2 == 0:
        # Half the cases name the served model, so generation (not only 404) is exercised.
        case.body["model"] = "fake-model"
    response = case.call(base_url=BASE_URL, timeout=30)
    seen[case.operation.label] += 1
    seen[f"status {response.status_code}"] += 1
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert_valid("ErrorResponse", response.json())
        assert "Traceback" not in response.text
    elif (
        case.operation.path.startswith("/v1/responses")
        and case.method != "DELETE"
        and "application/json" in str(response.headers.get("content-type"))
    ):
        assert_valid("Response", response.json())


def test_enough_cases_ran() -> None:
    """Runs after the fuzz test (file order): at least 500 cases, and many were served."""
    total = sum(v for k, v in seen.items() if not k.startswith("status"))
    print(dict(seen))
    assert total >= 500, seen
    assert seen["status 200"] >= 50, seen
