from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.promptlog.policy import CapturePolicy, run_retention, sample
from gateway.promptlog.settings import PromptLogSettings
from tests import waits

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_global_key_and_header_switches() -> None:
    p = CapturePolicy(disabled_keys=["secret-team"])
    assert p.should_capture("r1")
    assert p.should_capture("r1", "team-a", "on")
    assert not p.should_capture("r1", "secret-team")
    for off in ("off", "OFF", " false ", "0", "no"):
        assert not p.should_capture("r1", "team-a", off)
    assert not CapturePolicy(enabled=False).should_capture("r1", header="on")


async def test_sampling_is_deterministic_and_proportional() -> None:
    ids = [uuid.uuid4().hex for _ in range(20000)]
    kept = [i for i in ids if sample(i, 0.25)]
    assert 0.23 < len(kept) / len(ids) < 0.27
    assert kept == [i for i in ids if sample(i, 0.25)]
    assert all(sample(i, 1.0) for i in ids[:100])
    assert not any(sample(i, 0.0) for i in ids[:100])
    p = CapturePolicy.from_settings(PromptLogSettings(sample_rate=0.25))
    assert [i for i in ids if p.should_capture(i)] == kept
    with pytest.raises(ValueError, match="sample_rate"):
        CapturePolicy(sample_rate=1.5)


class FakeStore:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def purge_older_than(self, days: float) -> int:
        self.calls.append(days)
        if len(self.calls) == 1:
            raise ConnectionError("database down")  # logged, retried next interval
        return 3


async def test_retention_loop_purges_periodically_and_survives_errors() -> None:
    store = FakeStore()
    task = asyncio.create_task(run_retention(store, 30, interval_s=0.01))  # type: ignore[arg-type]
    await waits.until(lambda: len(store.calls) >= 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert set(store.calls) == {30}


async def test_parse_tags() -> None:
    from gateway.promptlog.policy import parse_tags

    assert parse_tags() == {}
    assert parse_tags(" team = search , env=prod,bad,=x,") == {"team": "search", "env": "prod"}
    assert parse_tags("env=prod", {"env": "dev", "app": "a", "n": 3, "nested": {"x": 1}}) == {
        "env": "prod",
        "app": "a",
        "n": "3",
    }
    many = ",".join(f"k{i}=v" for i in range(100))
    assert len(parse_tags(many)) == 32
    assert parse_tags("k=" + "v" * 1000)["k"] == "v" * 256
