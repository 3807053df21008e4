"""Drive ``wrk`` (Debian: ``apt-get install -y wrk``) with a POST script; read its numbers as JSON.

The Lua script's ``done`` hook prints one ``WRK_JSON {...}`` line with exact latency
percentiles (microseconds) and error counts, so nothing is scraped from wrk's text report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "WrkError",
    "WrkResult",
    "chat_body",
    "lua_script",
    "parse_output",
    "require_wrk",
    "run_wrk",
    "wrk_command",
]

MARKER = "WRK_JSON "

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, '
    .. '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, '
    .. '"mean_us": %.3f, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


class WrkError(RuntimeError):
    """wrk is missing or did not report."""


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise WrkError("wrk is not installed: on Debian/Ubuntu run `apt-get install -y wrk`")
    return path


def chat_body(stream: bool, max_tokens: int, model: str = "fake-model") -> dict[str, Any]:
    """The chat request the fake-engine benchmarks send (usage in the last chunk of a stream)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def lua_script(path: str, body: dict[str, Any]) -> str:
    """A wrk script that POSTs ``body`` as JSON to ``path`` and reports as JSON."""
    payload = json.dumps(body, separators=(",", ":"))
    if "]]" in payload:
        raise ValueError("the body must not contain ']]' (it is a Lua long string)")
    return (
        'wrk.method = "POST"\n'
        f'wrk.path = "{path}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{payload}]]\n" + _DONE
    )


@dataclass(frozen=True, slots=True)
class WrkResult:
    connections: int
    duration_s: float
    requests: int
    errors: int
    requests_per_s: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_output(stdout: str, connections: int) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            d = json.loads(line[len(MARKER) :])
            break
    else:
        raise WrkError(f"wrk printed no {MARKER.strip()} line:\n{stdout[-2000:]}")
    secs = d["duration_us"] / 1e6
    errors = sum(d[k] for k in d if k.endswith("_errors")) + d["timeouts"]
    return WrkResult(
        connections=connections,
        duration_s=secs,
        requests=d["requests"],
        errors=errors,
        requests_per_s=d["requests"] / secs if secs else 0.0,
        mean_ms=d["mean_us"] / 1000,
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        max_ms=d["max_us"] / 1000,
    )


def wrk_command(
    url: str, script: Path, connections: int, duration_s: int, cpus: str | None = None
) -> list[str]:
    cmd = [require_wrk(), "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s"]
    cmd += ["-s", str(script), url]
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def run_wrk(
    url: str, script: Path, connections: int, duration_s: int, cpus: str | None = None
) -> WrkResult:
    """One wrk run (one thread, ``connections`` keep-alive connections), bounded in time."""
    cmd = wrk_command(url, script, connections, duration_s, cpus)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        raise WrkError(f"wrk failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return parse_output(proc.stdout, connections)
