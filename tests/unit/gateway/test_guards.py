"""Access rules sit on the /v1 and /admin route groups, never on single handlers: the API-key
middleware on /v1, the admin guard on /admin and the adapter endpoints. (The one middleware
a handler may carry is the lean path of the hot routes, :class:`LeanRoute`, which is no
access rule: it runs inside the group's.)"""

from __future__ import annotations

from gateway.app import create_app
from gateway.console.session import console_guard
from gateway.engines.fake import FakeEngine
from gateway.guards import admin_guard, api_auth
from gateway.openai.lean import LeanRoute
from gateway.settings import EngineSettings, Settings

ADMIN_UNDER_V1 = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
OPEN = {"/health", "/ready", "/metrics"}


def _guards() -> dict[str, set[object]]:
    app = create_app(
        Settings(engine=EngineSettings(kind="fake")),
        engine=FakeEngine(model_name="m", max_model_len=64),
    )
    out: dict[str, set[object]] = {}
    for route in app.routes:
        for handler in route.route_handlers:
            if "OPTIONS" in handler.http_methods:
                continue
            assert not handler.guards, f"{route.path}: a guard on the handler itself"
            assert set(handler.middleware or ()) <= {LeanRoute}, (
                f"{route.path}: middleware on the handler itself"
            )
            owners = handler.ownership_layers
            out[route.path] = {g for layer in owners for g in (layer.guards or [])}
            out[route.path] |= {
                m for layer in owners for m in (layer.middleware or []) if m is not LeanRoute
            }
    return out


def test_each_group_has_its_guard() -> None:
    guards = _guards()
    for path, found in guards.items():
        if path in ADMIN_UNDER_V1 or path.startswith("/admin"):
            assert found == {admin_guard}, path
        elif path.startswith("/v1"):
            assert found == {api_auth}, path
        elif path.startswith("/console"):
            # The console's pages sit behind its session guard (on their router); its login
            # form and static files are open.
            assert found <= {console_guard}, path
        else:
            assert not found, path
    assert {"/v1/chat/completions", "/v1/models", "/admin/adapters"} <= guards.keys()
    assert guards.keys() >= OPEN
    assert guards["/console/traffic"] == {console_guard}
    assert guards["/console/logout"] == {console_guard}
    assert guards["/console/login"] == set()
