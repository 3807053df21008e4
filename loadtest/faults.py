"""Serving faults, injected and measured against a real gateway process (fake engine).

Each scenario is a function the integration tests call with small numbers and
``python -m loadtest.faults`` runs with the published ones (BENCHMARKS.md, "Faults"):

- :func:`stalled_reader`: a raw-socket client that sends a streaming request and reads
  nothing; the gateway must cut it after ``server.stream_stall_s`` and abort its engine
  request, its memory flat meanwhile.
- :func:`vanishing_client`: a raw-socket client that closes mid-stream; its engine request
  must be aborted within one step.
- :func:`idle_streams`: N streams open and idle at once; the gateway's memory per stream,
  and a new request is still served.
- :func:`overload`: an open-loop load at a multiple of the engine's capacity; refusals are
  503 + ``Retry-After``, and the admitted requests' p99 stays bounded.

Clients are raw asyncio sockets (HTTP/1.1 by hand): one costs a few KiB, so a thousand fit
in the test process, and a client that reads nothing is exactly that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

from loadtest.servers import Server, free_port, gateway_spec, running

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "FAKE_MODEL",
    "IdleResult",
    "OverloadResult",
    "StallResult",
    "engine_gauge",
    "fake_gateway",
    "idle_streams",
    "open_stream",
    "overload",
    "raise_fd_limit",
    "stalled_reader",
    "vanishing_client",
    "wait_engine_idle",
]

FAKE_MODEL = "fake-model"


def raise_fd_limit(want: int) -> int:
    """Raise this process's open-files soft limit towards ``want`` (children inherit it);
    returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


@contextlib.contextmanager
def fake_gateway(root: Path, name: str, config: dict[str, Any]) -> Iterator[Server]:
    """``retort serve`` with the fake engine and ``config`` merged over it, ready."""
    root.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {
        "home": str(root / f"{name}-home"),
        "model": {"served_name": FAKE_MODEL},
        "engine": {"kind": "fake", "enable_lora": False},
        "server": {"log_level": "warning"},
        "promptlog": {"flush_interval_s": 0.1},
        "students": {"autoload": False},
    }
    for section, values in config.items():
        base[section] = {**base.get(section, {}), **values}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    with running([gateway_spec(name, path, free_port())], root / "logs", 120) as (gw,):
        yield gw


def engine_gauge(url: str, name: str = "retort_engine_running_requests") -> float:
    """One unlabelled gauge from ``/metrics`` (the fake engine reports like vLLM)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise LookupError(f"{name} not in /metrics")


def wait_engine_idle(url: str, timeout_s: float) -> float | None:
    """Seconds until the engine runs no request (polled), or ``None`` if it never did."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if engine_gauge(url) == 0:
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def _request(path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def open_stream(
    url: str,
    body: dict[str, Any],
    *,
    path: str = "/v1/completions",
    rcvbuf: int | None = None,
    wait_first: bool = True,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a request on a raw socket; with ``wait_first``, read up to its first SSE event
    (``b""`` otherwise). ``rcvbuf`` shrinks the socket's receive buffer before connecting."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    writer.write(_request(path, body))
    await writer.drain()
    got = b""
    if wait_first:
        got = await reader.readuntil(b"\n\n")  # headers end with \r\n\r\n
        while b"data: " not in got:
            got += await reader.readuntil(b"\n\n")
    return reader, writer, got


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


# -- slow and vanishing clients ---------------------------------------------------------------


@dataclass
class StallResult:
    cut_after_s: float | None
    """Seconds from the request until the engine ran nothing again (``None``: never)."""
    rss_growth_bytes: int
    """Gateway RSS at the cut minus before the request."""
    bytes_read: int
    """What the client had read when it stopped (headers and the first event)."""


async def _stalled(gw: Server, max_tokens: int, n: int, timeout_s: float) -> StallResult:
    before = gw.rss_bytes()[0]
    body: dict[str, Any] = {
        "model": FAKE_MODEL,
        "prompt": "go",
        "max_tokens": max_tokens,
        "stream": True,
        "logprobs": 5,  # larger events: the socket buffers fill sooner
    }
    if n > 1:
        body["n"] = n
    t0 = time.monotonic()
    _, writer, got = await open_stream(gw.url, body, rcvbuf=4096)
    peak = before
    cut: float | None = None
    while time.monotonic() - t0 < timeout_s:
        peak = max(peak, gw.rss_bytes()[0])
        if await asyncio.to_thread(engine_gauge, gw.url) == 0:
            cut = time.monotonic() - t0
            break
        await asyncio.sleep(0.1)
    _close(writer)
    return StallResult(cut, peak - before, len(got))


def stalled_reader(
    gw: Server, *, max_tokens: int = 1_000_000, n: int = 1, timeout_s: float = 60
) -> StallResult:
    """A client that sends a streaming request and reads nothing more."""
    return asyncio.run(_stalled(gw, max_tokens, n, timeout_s))


async def _vanish(gw: Server, timeout_s: float) -> float | None:
    body = {"model": FAKE_MODEL, "prompt": "go", "max_tokens": 100_000, "stream": True}
    _, writer, _ = await open_stream(gw.url, body)
    _close(writer)  # gone mid-stream, without a word
    return await asyncio.to_thread(wait_engine_idle, gw.url, timeout_s)


def vanishing_client(gw: Server, *, timeout_s: float = 10) -> float | None:
    """Seconds from a client's close mid-stream until the engine runs nothing."""
    return asyncio.run(_vanish(gw, timeout_s))


# -- many idle streams -------------------------------------------------------------------------


@dataclass
class IdleResult:
    streams: int
    rss_before_bytes: int
    rss_open_bytes: int
    bytes_per_stream: int
    running_open: float
    """The engine's running requests while they were open."""
    new_request_status: int
    new_request_s: float
    idle_after_close_s: float | None


async def _idle(gw: Server, n: int) -> IdleResult:
    body = {"model": FAKE_MODEL, "prompt": "idle", "max_tokens": 10_000, "stream": True}
    writers: list[asyncio.StreamWriter] = []
    before = gw.rss_bytes()[0]
    try:
        for start in range(0, n, 100):  # in waves: the accept queue stays short
            opened = await asyncio.gather(
                *(open_stream(gw.url, body) for _ in range(min(100, n - start)))
            )
            writers.extend(w for _, w, _ in opened)
        running = 0.0
        deadline = time.monotonic() + 30
        while running < n and time.monotonic() < deadline:  # every one reached the engine
            running = await asyncio.to_thread(engine_gauge, gw.url)
        rss_open = gw.rss_bytes()[0]
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            r = await client.post(
                "/v1/completions", json={"model": FAKE_MODEL, "prompt": "new", "max_tokens": 1}
            )
        took = time.perf_counter() - t0
    finally:
        for w in writers:
            _close(w)
    idle = await asyncio.to_thread(wait_engine_idle, gw.url, 30)
    return IdleResult(
        n, before, rss_open, (rss_open - before) // max(1, n), running, r.status_code, took, idle
    )


def idle_streams(gw: Server, n: int) -> IdleResult:
    """Open ``n`` streams that then idle (the fake engine's ``token_delay_s`` must be long),
    measure, send one new request, close them all."""
    return asyncio.run(_idle(gw, n))


# -- overload ---------------------------------------------------------------------------------


@dataclass
class OverloadResult:
    offered: int
    ok: int
    refused: int
    """503 with ``Retry-After`` (``engine_overloaded``)."""
    other: dict[str, int] = field(default_factory=dict)
    """Any other outcome, by status or exception name (none expected)."""
    ok_p50_s: float = 0.0
    ok_p99_s: float = 0.0
    ok_max_s: float = 0.0
    engine_waiting_max: float = 0.0
    """The engine's own queue (fake engine, like vLLM's) sampled during the run."""
    gateway_waiting_max: float = 0.0
    """Sequences waiting in the gateway for a place (``engine.max_queue`` bounds it)."""


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _overload(gw: Server, rate: float, seconds: float, max_tokens: int) -> OverloadResult:
    body = {"model": FAKE_MODEL, "prompt": "busy", "max_tokens": max_tokens}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    res = OverloadResult(offered=0, ok=0, refused=0)
    ok_times: list[float] = []
    waiting_max = gateway_max = 0.0
    async with httpx.AsyncClient(base_url=gw.url, timeout=120, limits=limits) as client:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
                res.other[key] = res.other.get(key, 0) + 1
                return
            if r.status_code == 200:
                res.ok += 1
                ok_times.append(time.perf_counter() - t0)
            elif (
                r.status_code == 503
                and int(r.headers.get("retry-after", "0")) >= 1
                and r.json()["error"]["code"] == "engine_overloaded"
            ):
                res.refused += 1
            else:
                key = str(r.status_code)
                res.other[key] = res.other.get(key, 0) + 1

        tasks: list[asyncio.Task[None]] = []
        t_start = time.perf_counter()
        i = 0
        next_probe = t_start
        while (now := time.perf_counter()) - t_start < seconds:
            due = int((now - t_start) * rate) + 1
            while i < due:
                tasks.append(asyncio.create_task(one()))
                i += 1
            if now >= next_probe:
                r = await client.get("/metrics")
                for line in r.text.splitlines():
                    if line.startswith("retort_engine_waiting_requests "):
                        waiting_max = max(waiting_max, float(line.split()[1]))
                    elif line.startswith("retort_admission_waiting_sequences "):
                        gateway_max = max(gateway_max, float(line.split()[1]))
                next_probe = now + 0.2
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    res.offered = i
    res.ok_p50_s = _pct(ok_times, 0.50)
    res.ok_p99_s = _pct(ok_times, 0.99)
    res.ok_max_s = max(ok_times, default=0.0)
    res.engine_waiting_max = waiting_max
    res.gateway_waiting_max = gateway_max
    return res


def overload(gw: Server, *, rate: float, seconds: float, max_tokens: int) -> OverloadResult:
    """Open-loop: ``rate`` requests/s for ``seconds`` regardless of answers."""
    return asyncio.run(_overload(gw, rate, seconds, max_tokens))


# -- the benchmark ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m loadtest.faults [--streams 1000] [--out DIR]``: the fake-engine rows of
    BENCHMARKS.md's "Faults" table, as JSON."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("bench-results/faults"))
    args = ap.parse_args(argv)
    raise_fd_limit(4 * args.streams + 256)
    out: dict[str, Any] = {}
    stall = {"server": {"stream_stall_s": 2}, "engine": {"fake_token_delay_s": 0.001}}
    with fake_gateway(args.out, "stall", stall) as gw:
        out["stalled_reader"] = asdict(stalled_reader(gw, n=16))
        out["vanishing_client_s"] = vanishing_client(gw)
    idle = {"engine": {"fake_token_delay_s": 3600, "max_model_len": 20_000}}
    with fake_gateway(args.out, "idle", idle) as gw:
        out["idle_streams"] = asdict(idle_streams(gw, args.streams))
    capacity, service_s = 4, 0.2  # 200 tokens at 1 ms: 20 requests/s
    busy = {
        "engine": {
            "fake_token_delay_s": service_s / 200,
            "max_num_seqs": capacity,
            "max_queue": capacity,
            "max_queue_wait_s": 1.0,
        }
    }
    with fake_gateway(args.out, "overload", busy) as gw:
        rate = 4 * capacity / service_s
        out["overload"] = {
            "rate": rate,
            **asdict(overload(gw, rate=rate, seconds=10, max_tokens=200)),
        }
    print(json.dumps(out, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
