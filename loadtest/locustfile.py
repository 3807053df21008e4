"""Locust load for more than one machine can generate (Locust is optional: ``pip install locust``).

One machine::

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \\
        --headless --users 64 --spawn-rate 8 --run-time 5m --csv out/locust

Distributed: start ``locust -f loadtest/locustfile.py --master --host URL`` once and
``locust -f loadtest/locustfile.py --worker --master-host MASTER`` on every load machine
(each needs this repository installed, ``pip install -e .``, plus ``pip install locust``).

Settings come from the environment: ``LOADTEST_MODEL`` (default: first of ``/v1/models``),
``LOADTEST_ADAPTER_MIX`` (``a:0.5,b:0.5``), ``LOADTEST_ENDPOINT`` (``chat`` | ``completions``),
``LOADTEST_MAX_TOKENS`` (64), ``LOADTEST_STREAM`` (1), ``LOADTEST_TEMPERATURE`` (0),
``LOADTEST_DATASET`` (``synthetic`` or a JSONL file), ``LOADTEST_API_KEY``.

Streamed requests add ``E2E``, ``TTFT`` and ``TPOT`` rows (as request types) to Locust's
statistics: Locust's own time for a streamed request stops at the response headers.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, task

from loadtest.client import PATHS, StreamAccumulator
from loadtest.dataset import AdapterMix, Endpoint, build_body, load_prompts, parse_adapter_mix
from loadtest.sse import SSEDecoder
from loadtest.stats import RequestResult

__all__ = ["OpenAIUser"]

ENDPOINT: Endpoint = (
    "completions" if os.environ.get("LOADTEST_ENDPOINT") == "completions" else "chat"
)
MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "64"))
STREAM = os.environ.get("LOADTEST_STREAM", "1") not in ("0", "false", "no")
TEMPERATURE = float(os.environ.get("LOADTEST_TEMPERATURE", "0"))
PROMPTS = load_prompts(os.environ.get("LOADTEST_DATASET", "synthetic"), 256)


class OpenAIUser(HttpUser):  # type: ignore[misc,unused-ignore]  # Any without locust
    """Sends one chat or completion request after another (no think time by default)."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        key = os.environ.get("LOADTEST_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        model = os.environ.get("LOADTEST_MODEL")
        if not model:
            model = str(self.client.get("/v1/models").json()["data"][0]["id"])
        spec = os.environ.get("LOADTEST_ADAPTER_MIX")
        self.mix = parse_adapter_mix(spec) if spec else AdapterMix((model,), (1.0,))
        self.rng = random.Random()

    def _report(self, kind: str, name: str, ms: float) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=ms,
            response_length=0,
            exception=None,
            context={},
        )

    @task  # type: ignore[untyped-decorator,unused-ignore]
    def generate(self) -> None:
        model = self.mix.pick(self.rng)
        body = build_body(
            ENDPOINT,
            model,
            self.rng.choice(PROMPTS),
            max_tokens=MAX_TOKENS,
            temperature=TEMPERATURE,
            stream=STREAM,
        )
        name = f"{ENDPOINT} {model}"
        kwargs: dict[str, Any] = {"json": body, "name": name, "catch_response": True}
        t0 = time.perf_counter()
        with self.client.post(PATHS[ENDPOINT], stream=STREAM, **kwargs) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            if not STREAM:
                return
            result = RequestResult(model=model)
            acc = StreamAccumulator(result, t0)
            decoder = SSEDecoder()
            try:
                for raw in resp.iter_content(chunk_size=None):
                    now = time.perf_counter()
                    for data in decoder.feed(raw):
                        acc.event(data, now)
            except (OSError, json.JSONDecodeError) as exc:
                resp.failure(f"{type(exc).__name__}: {exc}")
                return
            acc.finish()
            result.e2e_s = time.perf_counter() - t0
            if not result.ok:
                resp.failure(result.error or "stream failed")
                return
        # With stream=True, Locust's own time stops at the headers; report the whole stream.
        self._report("E2E", name, result.e2e_s * 1000)
        if result.ttft_s is not None:
            self._report("TTFT", name, result.ttft_s * 1000)
        if (tpot := result.tpot_s) is not None:
            self._report("TPOT", name, tpot * 1000)
