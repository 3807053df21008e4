"""Every Prometheus metric of the gateway, in one place (namespace ``retort_``).

Past ~400 lines on purpose: DESIGN.md keeps every metric here, declared and observed by one
:class:`Metrics`, so a new metric has one home.

Labels stay bounded: ``model``, ``adapter`` (``"none"`` for the base model), ``status``,
``reason`` and, only when enabled, ``key_id`` (ids come from the configuration, so the set
is finite). Never a prompt, a user or any request text.

Several worker processes: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before the
workers start (before ``prometheus_client`` is imported); :func:`render` then aggregates
every process's values with a ``MultiProcessCollector``. Gauges declare how they aggregate
(``livesum``, ``livemax``).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import msgspec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client import values as _values

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from prometheus_client.metrics_core import Metric

__all__ = [
    "ADAPTER_LOAD_BUCKETS",
    "CONTENT_TYPE_LATEST",
    "DROP_REASONS",
    "NO_ADAPTER",
    "REQUEST_DURATION_BUCKETS",
    "TIME_PER_OUTPUT_TOKEN_BUCKETS",
    "TTFT_BUCKETS",
    "EngineStats",
    "Metrics",
    "MetricsSettings",
    "ReportsStats",
    "adapter_label",
    "render",
]

log = logging.getLogger("retort.metrics")

NAMESPACE = "retort"
NO_ADAPTER = "none"
"""The ``adapter`` label of requests served by the base model (or a student)."""
NO_KEY = "none"
"""The ``key_id`` label of requests without an API key (auth off)."""

REQUEST_DURATION_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0,
    20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
)  # fmt: skip
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0,
)  # fmt: skip
TIME_PER_OUTPUT_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
ADAPTER_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

DROP_REASONS = ("queue_full", "db_error", "shutdown", "error", "spool_full")
"""Why prompt-log records get dropped; each is exported from the start (at 0)."""


class MetricsSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    key_label: bool = False
    """Add a ``key_id`` label to the request, token and cost counters (bounded: ids come
    from the configured keys)."""


def adapter_label(adapter: str | None) -> str:
    """The ``adapter`` label value: the adapter's name, or ``"none"`` for the base model."""
    return adapter or NO_ADAPTER


class EngineStats(NamedTuple):
    """What the engine-stats callback returns (read from vLLM's scheduler stats)."""

    running: int
    """Requests the engine is running now."""
    waiting: int
    """Requests queued in the engine."""
    kv_cache_usage: float
    """KV-cache usage, 0..1."""


@runtime_checkable
class ReportsStats(Protocol):
    """The engine-stats capability (vLLM): ``isinstance(engine, ReportsStats)``."""

    def stats(self) -> EngineStats | None: ...


class _RequestChildren(NamedTuple):
    requests: Counter
    prompt_tokens: Counter
    completion_tokens: Counter
    cost: Counter
    duration: Histogram
    ttft: Histogram
    tpot: Histogram


def _bucket(bounds: list[float], amount: float) -> int:
    """The histogram bucket ``Histogram.observe`` adds ``amount`` to (the first upper bound
    ``>=`` it); ``len(bounds)`` for NaN, which no bucket counts."""
    i = bisect.bisect_left(bounds, amount)
    return i if amount <= bounds[-1] else len(bounds)


class _HistogramTally:
    """Observations of one histogram child not yet added to it: their sum and per-bucket
    counts (bounded memory, however many requests come between two scrapes)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot: NaN, counted by no bucket
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.total += amount
        self.counts[_bucket(self.bounds, amount)] += 1

    def flush(self, histogram: Histogram) -> None:
        """Add the tally to ``histogram``'s child: what one ``observe`` per observation
        would have added (prometheus_client's value objects, as ``observe`` uses them)."""
        if not any(self.counts) and not self.total:
            return
        histogram._sum.inc(self.total)
        buckets = histogram._buckets
        for i, n in enumerate(self.counts[:-1]):
            if n:
                buckets[i].inc(n)
        self.counts = [0] * len(self.counts)
        self.total = 0.0


class _RequestTally:
    """The finished requests of one label set since the last scrape."""

    __slots__ = ("children", "completion", "cost", "duration", "prompt", "requests", "tpot", "ttft")

    def __init__(self, children: _RequestChildren) -> None:
        self.children = children
        self.requests = 0
        self.prompt = 0
        self.completion = 0
        self.cost = 0.0
        self.duration = _HistogramTally(children.duration._upper_bounds)
        self.ttft = _HistogramTally(children.ttft._upper_bounds)
        self.tpot = _HistogramTally(children.tpot._upper_bounds)

    def flush(self) -> None:
        c = self.children
        if self.requests:
            c.requests.inc(self.requests)
            self.requests = 0
        if self.prompt:
            c.prompt_tokens.inc(self.prompt)
            self.prompt = 0
        if self.completion:
            c.completion_tokens.inc(self.completion)
            self.completion = 0
        if self.cost:
            c.cost.inc(self.cost)
            self.cost = 0.0
        self.duration.flush(c.duration)
        self.ttft.flush(c.ttft)
        self.tpot.flush(c.tpot)


class _FlushFirst:
    """A collector registered before every metric: each collection of the registry (a
    scrape, ``get_sample_value``) first adds the tallied requests to the metrics."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def describe(self) -> list[Metric]:
        return []  # no series of its own, so no name to collide with

    def collect(self) -> Iterable[Metric]:
        self._flush()
        return []


class Metrics:
    """Every metric, registered in ``registry`` (a fresh one per test; the default otherwise).

    ``key_label`` adds a ``key_id`` label to the request, token and cost counters (never to
    histograms). The hot path (:meth:`observe_request`, :meth:`request_started`,
    :meth:`request_finished`) caches the labelled children per label tuple and, in a
    single-process server, tallies each request in plain numbers under one lock (its
    histogram observations as per-bucket counts); the tallies are added to the metrics
    whenever the registry is collected (every scrape and ``get_sample_value``), so what is
    exported is what one ``inc``/``observe`` per value would give, for a fraction of the
    cost (~1 µs a request instead of ~13). With ``PROMETHEUS_MULTIPROC_DIR`` set, another
    process may answer the scrape, so every value is written through at once.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        key_label: bool = False,
        engine_stats: Callable[[], EngineStats | None] | None = None,
    ) -> None:
        from prometheus_client import REGISTRY

        self.registry: CollectorRegistry = registry if registry is not None else REGISTRY
        self.key_label = key_label
        self.engine_stats = engine_stats
        """Called by :meth:`refresh_engine` (each scrape and each poll) to set the engine
        gauges; return ``None`` when the engine has nothing to report."""
        r = self.registry
        self.batched = not getattr(_values.ValueClass, "_multiprocess", True)
        """Tally the request metrics until the next collection (single process only)."""
        self._lock = threading.Lock()
        self._tallies: dict[tuple[str, str, str, str | None], _RequestTally] = {}
        self._endpoint_tally: dict[tuple[str, str], int] = {}
        self._inflight_tally: dict[str, int] = {}
        if self.batched:
            r.register(_FlushFirst(self.flush))  # first: collected before every metric
        by_key = ("key_id",) if key_label else ()
        self.requests_total = Counter(
            "requests",
            "Completed requests by model, adapter and status (ok, error, ...).",
            ("model", "adapter", "status", *by_key),
            namespace=NAMESPACE,
            registry=r,
        )
        self.endpoint_requests_total = Counter(
            "endpoint_requests",
            "Completed requests by API endpoint (chat, completions, responses) and status.",
            ("endpoint", "status"),
            namespace=NAMESPACE,
            registry=r,
        )
        self.request_duration_seconds = Histogram(
            "request_duration_seconds",
            "Request latency from arrival to the last byte.",
            ("model", "adapter"),
            namespace=NAMESPACE,
            buckets=REQUEST_DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_token_seconds = Histogram(
            "time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            ("model", "adapter"),
            namespace=NAMESPACE,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token_seconds = Histogram(
            "time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            ("model", "adapter"),
            namespace=NAMESPACE,
            buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens_total = Counter(
            "prompt_tokens",
            "Prompt tokens processed.",
            ("model", "adapter", *by_key),
            namespace=NAMESPACE,
            registry=r,
        )
        self.completion_tokens_total = Counter(
            "completion_tokens",
            "Completion tokens generated.",
            ("model", "adapter", *by_key),
            namespace=NAMESPACE,
            registry=r,
        )
        self.cost_usd_total = Counter(
            "cost_usd",
            "Cost of the requests served, in US dollars.",
            ("model", "adapter", *by_key),
            namespace=NAMESPACE,
            registry=r,
        )
        self.inflight_requests = Gauge(
            "inflight_requests",
            "Requests being served now.",
            ("model",),
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.adapter_load_seconds = Histogram(
            "adapter_load_seconds",
            "Time to load a LoRA adapter into the engine.",
            ("adapter",),
            namespace=NAMESPACE,
            buckets=ADAPTER_LOAD_BUCKETS,
            registry=r,
        )
        self.adapters_loaded = Gauge(
            "adapters_loaded",
            "LoRA adapters loaded in the engine now.",
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.promptlog_queue_depth = Gauge(
            "promptlog_queue_depth",
            "Prompt-log records queued or being written.",
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.promptlog_written_total = Counter(
            "promptlog_written",
            "Prompt-log records written to the database.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.promptlog_dropped_total = Counter(
            "promptlog_dropped",
            "Prompt-log records dropped, by reason (queue_full, db_error, shutdown, error, "
            "spool_full).",
            ("reason",),
            namespace=NAMESPACE,
            registry=r,
        )
        self.promptlog_degraded = Gauge(
            "promptlog_degraded",
            "1 while the prompt-log database is unreachable (records wait in the queue or "
            "the spool), else 0.",
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.promptlog_spooled_total = Counter(
            "promptlog_spooled",
            "Prompt-log records written to the disk spool while the database was down.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.promptlog_spool_bytes = Gauge(
            "promptlog_spool_bytes",
            "Bytes in the prompt log's disk spool, waiting to be replayed into the database.",
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.limits_degraded = Gauge(
            "limits_degraded",
            "1 while Redis (limits.redis_url) is unreachable: limits are per replica "
            "(fail_open) or requests are refused, else 0.",
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.engine_running_requests = Gauge(
            "engine_running_requests",
            "Requests the engine is running (from vLLM).",
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.engine_waiting_requests = Gauge(
            "engine_waiting_requests",
            "Requests waiting in the engine's queue (from vLLM).",
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.engine_kv_cache_usage_ratio = Gauge(
            "engine_kv_cache_usage_ratio",
            "KV-cache usage of the engine, 0..1 (from vLLM).",
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.structured_output_failures_total = Counter(
            "structured_output_failures",
            "Answers whose constrained output did not parse (JSON cut by max_tokens, or no "
            "tool call found), by kind (json_schema, json_object, tool_call).",
            ("model", "kind"),
            namespace=NAMESPACE,
            registry=r,
        )
        self.shadow_requests_total = Counter(
            "shadow_requests",
            "Shadow requests to a candidate student, by outcome (agree, disagree, dropped, error).",
            ("teacher", "student", "outcome"),
            namespace=NAMESPACE,
            registry=r,
        )
        self.shadow_agreement_ratio = Gauge(
            "shadow_agreement_ratio",
            "Share of the last shadow pairs (shadow.window) where the student agreed.",
            ("teacher", "student"),
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.shadow_student_latency_seconds = Histogram(
            "shadow_student_latency_seconds",
            "The student's latency on shadow requests (whole answer).",
            ("teacher", "student"),
            namespace=NAMESPACE,
            buckets=REQUEST_DURATION_BUCKETS,
            registry=r,
        )
        # Staged rollouts (gateway/rollout): every replica reads the same state from the
        # database, so the gauges aggregate with livemax.
        self.rollout_stage = Gauge(
            "rollout_stage",
            "A rollout's stage: 0 shadow, 1 canary, 2.. ramp, the plan's last step full; "
            "-1 rolled back.",
            ("teacher", "student"),
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_split_ratio = Gauge(
            "rollout_split_ratio",
            "Share of the teacher's live requests its student answers (the rollout's split).",
            ("teacher", "student"),
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_agreement_ratio = Gauge(
            "rollout_agreement_ratio",
            "Agreement over the current stage's shadow pairs (what the policy judges).",
            ("teacher", "student"),
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_projected_saving_ratio = Gauge(
            "rollout_projected_saving_ratio",
            "Projected share of the teacher's cost saved at the current split, from the "
            "measured cost per 1k tokens of teacher and student.",
            ("teacher", "student"),
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_decisions_total = Counter(
            "rollout_decisions",
            "Rollout decisions stored by this replica (start, advance, hold, rollback, pause, "
            "resume).",
            ("teacher", "student", "action"),
            namespace=NAMESPACE,
            registry=r,
        )
        self.engine_start_seconds = Gauge(
            "engine_start_seconds",
            "Seconds the engine took to start (model load, compile or compile-cache load, "
            "warm-up, pinned adapters) until the gateway could serve; 0 while starting.",
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.admission_rejected_total = Counter(
            "admission_rejected",
            "Requests refused with 503 + Retry-After because the engine was at capacity, by "
            "reason (full: the wait queue was full; timeout: waited past engine.max_queue_wait_s).",
            ("reason",),
            namespace=NAMESPACE,
            registry=r,
        )
        self.admission_waiting_sequences = Gauge(
            "admission_waiting_sequences",
            "Sequences waiting in the gateway for a place in the engine (engine.max_queue).",
            namespace=NAMESPACE,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.stream_stalls_total = Counter(
            "stream_stalls",
            "Streams cut because the client read nothing for server.stream_stall_s.",
            namespace=NAMESPACE,
            registry=r,
        )
        self._dropped = {
            reason: self.promptlog_dropped_total.labels(reason) for reason in DROP_REASONS
        }
        self._children: dict[tuple[str, str, str, str | None], _RequestChildren] = {}
        self._by_endpoint: dict[tuple[str, str], Counter] = {}
        self._inflight: dict[str, Gauge] = {}

    # -- requests -------------------------------------------------------------------------

    def shadow_request(self, teacher: str, student: str, outcome: str) -> None:
        self.shadow_requests_total.labels(teacher, student, outcome).inc()

    def shadow_agreement(self, teacher: str, student: str, ratio: float) -> None:
        self.shadow_agreement_ratio.labels(teacher, student).set(ratio)

    def shadow_latency(self, teacher: str, student: str, seconds: float) -> None:
        self.shadow_student_latency_seconds.labels(teacher, student).observe(seconds)

    def rollout_state(self, teacher: str, student: str, stage: int, share: float) -> None:
        self.rollout_stage.labels(teacher, student).set(stage)
        self.rollout_split_ratio.labels(teacher, student).set(share)

    def rollout_figures(
        self, teacher: str, student: str, agreement: float | None, saving: float | None
    ) -> None:
        if agreement is not None:
            self.rollout_agreement_ratio.labels(teacher, student).set(agreement)
        if saving is not None:
            self.rollout_projected_saving_ratio.labels(teacher, student).set(saving)

    def rollout_forget(self, teacher: str, student: str) -> None:
        """Drop a replaced rollout's series (a teacher's newer rollout names another student)."""
        for gauge in (
            self.rollout_stage,
            self.rollout_split_ratio,
            self.rollout_agreement_ratio,
            self.rollout_projected_saving_ratio,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(teacher, student)

    def rollout_decision(self, teacher: str, student: str, action: str) -> None:
        self.rollout_decisions_total.labels(teacher, student, action).inc()

    def structured_output_failed(self, model: str, kind: str) -> None:
        self.structured_output_failures_total.labels(model, kind).inc()

    def _request_children(
        self, model: str, adapter: str, status: str, key_id: str | None
    ) -> _RequestChildren:
        cache_key = (model, adapter, status, key_id)
        children = self._children.get(cache_key)
        if children is None:
            keyed: tuple[str, ...] = (key_id or NO_KEY,) if self.key_label else ()
            children = _RequestChildren(
                requests=self.requests_total.labels(model, adapter, status, *keyed),
                prompt_tokens=self.prompt_tokens_total.labels(model, adapter, *keyed),
                completion_tokens=self.completion_tokens_total.labels(model, adapter, *keyed),
                cost=self.cost_usd_total.labels(model, adapter, *keyed),
                duration=self.request_duration_seconds.labels(model, adapter),
                ttft=self.time_to_first_token_seconds.labels(model, adapter),
                tpot=self.time_per_output_token_seconds.labels(model, adapter),
            )
            self._children[cache_key] = children
        return children

    def observe_request(
        self,
        model: str,
        adapter: str | None,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        latency_s: float,
        cost_usd: float,
        key_id: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        """Record one finished request (call once, after its last byte).

        ``status`` is bounded by the caller: ``ok``, ``error`` or an error type. TTFT is
        skipped when ``None`` (nothing generated); the time per output token is
        ``(latency - ttft) / (completion_tokens - 1)`` when there are two tokens or more.
        """
        cache_key = (model, adapter or NO_ADAPTER, status, key_id)
        with self._lock:
            t = self._tallies.get(cache_key)
            if t is None:
                t = self._tallies[cache_key] = _RequestTally(self._request_children(*cache_key))
            t.requests += 1
            if endpoint is not None:
                by_endpoint = self._endpoint_tally
                by_endpoint[(endpoint, status)] = by_endpoint.get((endpoint, status), 0) + 1
            t.duration.observe(latency_s)
            if prompt_tokens:
                t.prompt += prompt_tokens
            if completion_tokens:
                t.completion += completion_tokens
            if cost_usd > 0:
                t.cost += cost_usd
            if ttft_s is not None:
                t.ttft.observe(ttft_s)
                if completion_tokens > 1 and latency_s >= ttft_s:
                    t.tpot.observe((latency_s - ttft_s) / (completion_tokens - 1))
        if not self.batched:
            self.flush()  # several processes share the values: write them through now

    def _endpoint_counter(self, endpoint: str, status: str) -> Counter:
        counter = self._by_endpoint.get((endpoint, status))
        if counter is None:
            counter = self._by_endpoint[(endpoint, status)] = self.endpoint_requests_total.labels(
                endpoint, status
            )
        return counter

    def _inflight_gauge(self, model: str) -> Gauge:
        gauge = self._inflight.get(model)
        if gauge is None:
            gauge = self._inflight[model] = self.inflight_requests.labels(model)
        return gauge

    def request_started(self, model: str) -> None:
        """``retort_inflight_requests{model}`` + 1; pair with :meth:`request_finished`."""
        self._inflight_add(model, 1)

    def request_finished(self, model: str) -> None:
        self._inflight_add(model, -1)

    def _inflight_add(self, model: str, delta: int) -> None:
        if not self.batched:
            self._inflight_gauge(model).inc(delta)
            return
        with self._lock:
            self._inflight_tally[model] = self._inflight_tally.get(model, 0) + delta

    def flush(self) -> None:
        """Add the tallied requests to the metrics (called first by every collection)."""
        with self._lock:
            for t in self._tallies.values():
                t.flush()
            for (endpoint, status), n in self._endpoint_tally.items():
                self._endpoint_counter(endpoint, status).inc(n)
            self._endpoint_tally.clear()
            for model, delta in self._inflight_tally.items():
                gauge = self._inflight_gauge(model)  # the series exists from the first request
                if delta:
                    gauge.inc(delta)
            self._inflight_tally.clear()

    # -- adapters -------------------------------------------------------------------------

    def observe_adapter_load(self, adapter: str, seconds: float) -> None:
        self.adapter_load_seconds.labels(adapter).observe(seconds)

    def set_adapters_loaded(self, count: int) -> None:
        self.adapters_loaded.set(count)

    # -- prompt log (used by gateway.promptlog.writer) -------------------------------------

    def promptlog_written(self, count: int) -> None:
        self.promptlog_written_total.inc(count)

    def promptlog_dropped(self, reason: str, count: int = 1) -> None:
        child = self._dropped.get(reason)
        if child is None:
            child = self._dropped[reason] = self.promptlog_dropped_total.labels(reason)
        child.inc(count)

    def set_promptlog_queue_depth(self, depth: int) -> None:
        self.promptlog_queue_depth.set(depth)

    def set_promptlog_degraded(self, degraded: bool) -> None:
        self.promptlog_degraded.set(1 if degraded else 0)

    def promptlog_spooled(self, count: int) -> None:
        self.promptlog_spooled_total.inc(count)

    def set_promptlog_spool_bytes(self, size: int) -> None:
        self.promptlog_spool_bytes.set(size)

    # -- limits (used by gateway.auth.redis_limits) ----------------------------------------

    def set_limits_degraded(self, degraded: bool) -> None:
        self.limits_degraded.set(1 if degraded else 0)

    # -- engine ---------------------------------------------------------------------------

    def set_engine_start(self, seconds: float) -> None:
        self.engine_start_seconds.set(seconds)

    def admission_rejected(self, reason: str) -> None:
        self.admission_rejected_total.labels(reason).inc()

    def watch_admission(self, waiting: Callable[[], int]) -> None:
        """Read the waiting sequences from ``waiting`` at each scrape."""
        self.admission_waiting_sequences.set_function(waiting)

    def stream_stalled(self) -> None:
        self.stream_stalls_total.inc()

    def set_engine_stats(self, stats: EngineStats) -> None:
        self.engine_running_requests.set(stats.running)
        self.engine_waiting_requests.set(stats.waiting)
        self.engine_kv_cache_usage_ratio.set(stats.kv_cache_usage)

    def refresh_engine(self) -> None:
        """Read :attr:`engine_stats` (if set) into the engine gauges; never raises."""
        if self.engine_stats is None:
            return
        try:
            stats = self.engine_stats()
        except Exception:  # a scrape must not fail because the engine is busy or gone
            log.debug("engine stats callback failed", exc_info=True)
            return
        if stats is not None:
            self.set_engine_stats(stats)

    def render(self) -> bytes:
        """The ``/metrics`` body: refresh the engine gauges, then :func:`render`."""
        self.refresh_engine()
        return render(self.registry)


def render(registry: CollectorRegistry | None = None) -> bytes:
    """Prometheus text exposition (content type :data:`CONTENT_TYPE_LATEST`).

    With ``PROMETHEUS_MULTIPROC_DIR`` set, every worker process's values are aggregated
    from that folder; otherwise ``registry`` (the default registry when ``None``) is used.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        _multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    return generate_latest(registry)
