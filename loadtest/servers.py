"""Every real service the tests and benchmarks start, each in its own process group.

One module on purpose (past ~400 lines): a gateway, vLLM's own server, Postgres, Redis and
Prometheus all start, wait and stop here, so tests and benchmarks never grow a second copy.

:func:`running` starts servers together, waits until every one is ready, and on the way
out (error or not) stops them all: SIGTERM to the server, which shuts its engine down, then
SIGKILL to its process group and to every descendant seen. :func:`start_gateway` starts one
``retort serve`` from a config mapping and returns it ready; :class:`AppServer` (and
:func:`serving_app`) serves an app object in a thread of this process.
:class:`RssSampler` records the peak resident memory of a server's process tree while a
block runs.
:func:`postgres_server`, :func:`redis_server` and :func:`prometheus_server` start
throwaway data services on free loopback ports; a missing binary raises
:class:`ServiceMissing`, which names the Debian package to install.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import httpx
import psutil

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import TracebackType

    from gateway.settings import EngineSettings

__all__ = [
    "FAKE_MODEL",
    "AppServer",
    "Gateway",
    "Postgres",
    "Redis",
    "RssSampler",
    "Server",
    "ServerError",
    "ServerSpec",
    "ServiceMissing",
    "fake_gateway_config",
    "free_port",
    "gateway_spec",
    "postgres_bindir",
    "postgres_server",
    "prometheus_server",
    "redis_instance",
    "redis_server",
    "running",
    "serving_app",
    "start_gateway",
    "started",
    "vllm_server_spec",
    "wait_port",
]

LOG_TAIL_CHARS = 3000


class ServerError(RuntimeError):
    """A server exited or did not get ready in time."""


class ServiceMissing(RuntimeError):  # noqa: N818 - a condition, not a failure of the code
    """A service's binary is not installed; the message names the Debian package."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, proc: subprocess.Popen[Any] | None = None, timeout_s: float = 20.0
) -> None:
    """Until 127.0.0.1:``port`` accepts a connection; :class:`ServerError` if ``proc``
    exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            raise ServerError(f"port {port} not open after {timeout_s:.0f}s")
        time.sleep(0.05)


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """How to start one server: the command line, its port and its readiness probe."""

    name: str
    argv: list[str]
    port: int
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    cpus: str | None = None
    """``taskset -c`` CPU list to pin the server (and its children) to."""
    clean_env: bool = False
    """Leave out the caller's ``RETORT_*`` variables: only ``env`` sets them."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return ["taskset", "-c", self.cpus, *self.argv] if self.cpus else list(self.argv)


def gateway_spec(
    name: str,
    config: Path,
    port: int,
    *,
    cpus: str | None = None,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
) -> ServerSpec:
    """``retort serve`` with a YAML config (and ``args``, more ``serve`` options)."""
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    argv += ["--port", str(port), "--host", "127.0.0.1", *args]
    return ServerSpec(name, argv, port, "/ready", env or {}, cpus)


def vllm_server_spec(
    name: str, model: str, served_name: str, port: int, engine: EngineSettings
) -> ServerSpec:
    """vLLM's own OpenAI server with the engine arguments the gateway would pass.

    Built from the gateway's own ``engine_args`` and ``engine_environ``
    (:mod:`gateway.engines.vllm`), so LoRA (on by default), its slots and rank, the LoRA
    fast-ops plugin's switch (the plugin loads in any vLLM process of this install) and the
    KV-cache space are the same on both sides; plus the gateway's CPU rules: ``dtype: auto``
    means float32 on the CPU backend, and the same AOT compile switch (``aot_environ``). Access
    logs are off in both.
    """
    from gateway.engines.vllm import aot_environ, engine_args, engine_environ

    args = engine_args(engine, model, served_name)
    on_cpu = shutil.which("nvidia-smi") is None
    if args["dtype"] == "auto" and on_cpu:
        args["dtype"] = "float32"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in args.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    argv += ["--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    env = {
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        **engine_environ(engine),
        **aot_environ(engine, on_cpu=on_cpu),
    }
    return ServerSpec(name, argv, port, "/health", env)


S = TypeVar("S", bound="Server")


class Server:
    """A started server process (the leader of a new process group)."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self._log = log_path.open("wb")
        inherited = {
            k: v for k, v in os.environ.items() if not (spec.clean_env and k.startswith("RETORT_"))
        }
        self.proc = subprocess.Popen(
            spec.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**inherited, **spec.env},
            start_new_session=True,
        )
        self._seen: dict[int, psutil.Process] = {}

    @property
    def url(self) -> str:
        return self.spec.url

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        return ""

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerError(
                        f"{self.spec.name} exited with status {self.proc.returncode}; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + self.spec.ready_path).status_code == 200:
                        return
                time.sleep(0.5)
        raise ServerError(
            f"{self.spec.name} not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def processes(self) -> list[psutil.Process]:
        """The server and its live descendants (remembered, so stop() can reap them)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self._seen.setdefault(p.pid, p)
        return procs

    def rss_bytes(self) -> tuple[int, int]:
        """Resident memory of the server process, and of it with all its descendants."""
        root = total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                rss = int(p.memory_info().rss)
                total += rss
                if p.pid == self.proc.pid:
                    root = rss
        return root, total

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM to the server (it shuts its engine down), then SIGKILL to what is left;
        returns the server's exit status."""
        self.processes()
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in self._seen.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def started(server: S, ready_timeout_s: float) -> S:
    """``server`` once it is ready; stopped again (and :class:`ServerError`) if it is not."""
    try:
        server.wait_ready(ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running(
    specs: list[ServerSpec], log_dir: Path, ready_timeout_s: float
) -> Iterator[list[Server]]:
    """Start every server at once, wait for all to be ready, and always stop them all."""
    log_dir.mkdir(parents=True, exist_ok=True)
    servers: list[Server] = []
    try:
        for spec in specs:
            # One at a time, so the finally stops those started before a failure.
            servers.append(Server(spec, log_dir / f"{spec.name}.log"))  # noqa: PERF401
        deadline = time.monotonic() + ready_timeout_s
        for server in servers:
            server.wait_ready(max(1.0, deadline - time.monotonic()))
        yield servers
    finally:
        for server in servers:
            server.stop()


FAKE_MODEL = "fake-model"


def fake_gateway_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config``'s sections over those of a gateway on the fake engine (``fake-model``,
    2048 tokens, info log, the prompt log flushed every 0.1 s)."""
    base: dict[str, Any] = {
        "model": {"served_name": FAKE_MODEL},
        "engine": {"kind": "fake", "max_model_len": 2048},
        "server": {"log_level": "info"},
        "promptlog": {"flush_interval_s": 0.1},
    }
    for section, values in config.items():
        base[section] = {**base.get(section, {}), **values}
    return base


class Gateway(Server):
    """A ``retort serve`` process started by :func:`start_gateway`."""

    def __init__(
        self, spec: ServerSpec, log_path: Path, home: Path, config: dict[str, Any]
    ) -> None:
        self.home = home
        """Its ``RETORT_HOME``."""
        self.config = config
        """The settings it was started with (its YAML file's content)."""
        super().__init__(spec, log_path)

    @property
    def model(self) -> str:
        """The name clients send in ``model``."""
        return str(self.config["model"]["served_name"])

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_gateway(
    root: Path,
    name: str,
    config: dict[str, Any],
    *,
    home: Path | None = None,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    ready_timeout_s: float = 60.0,
) -> Gateway:
    """``retort serve`` on a free port, ready (``/ready`` answers 200).

    ``config`` goes to ``root/name/retort.yaml`` and the log to ``root/name/server.log``;
    ``RETORT_HOME`` is ``home`` (default ``root/name/home``). Of the caller's ``RETORT_*``
    variables none reach it: only ``env`` adds some. Stopped again when it never gets ready.
    """
    import yaml

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    home = home or folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    cfg = folder / "retort.yaml"
    cfg.write_text(yaml.safe_dump(config))
    spec = gateway_spec(
        name, cfg, free_port(), env={"RETORT_HOME": str(home), **(env or {})}, args=args
    )
    gw = Gateway(replace(spec, clean_env=True), folder / "server.log", home, config)
    return started(gw, ready_timeout_s)


class AppServer:
    """An app (ASGI) served by uvicorn in a daemon thread of this process, on a free
    loopback port; :meth:`start` returns its URL once ``ready_path`` answers 200."""

    def __init__(self, app: Any, *, log_level: str = "error", ready_path: str = "/ready") -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._ready_path = ready_path
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                if not self._thread.is_alive():
                    raise ServerError("the app server's thread ended before it was ready")
                if self._server.started:
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(self.url + self._ready_path).status_code == 200:
                            return self.url
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(f"the app server not ready after {timeout_s:.0f} s")
                time.sleep(0.02)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()


@contextlib.contextmanager
def serving_app(app: Any, *, log_level: str = "error") -> Iterator[str]:
    """``with serving_app(app) as url``: an :class:`AppServer`, stopped afterwards."""
    server = AppServer(app, log_level=log_level)
    try:
        yield server.start()
    finally:
        server.stop()


class RssSampler:
    """Peak RSS of a server (process, and process tree) while the ``with`` block runs."""

    def __init__(self, server: Server, interval_s: float = 0.1) -> None:
        self._server = server
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_process = 0
        self.peak_tree = 0

    def _run(self) -> None:
        while True:
            root, tree = self._server.rss_bytes()
            self.peak_process = max(self.peak_process, root)
            self.peak_tree = max(self.peak_tree, tree)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- data services: Postgres, Redis, Prometheus ----------------------------------------------


def postgres_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl`` (Debian keeps them off the PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


class Postgres:
    """A throwaway cluster; ``url`` is its ``postgres`` database (asyncpg)."""

    def __init__(self, root: Path, bindir: Path, port: int, user: str | None) -> None:
        self.root = root
        self.bindir = bindir
        self.port = port
        self.user = user
        self.data = root / "data"

    @property
    def url(self) -> str:
        return self.db_url("postgres")

    def db_url(self, name: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run a Postgres tool (as the ``postgres`` user when this process is root)."""
        extra: dict[str, Any] = {"user": self.user} if self.user else {}
        return subprocess.run(args, check=True, capture_output=True, cwd=self.root, **extra)

    def pg_ctl(self, *args: str) -> None:
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), *args)

    def start(self, *, durable: bool = False) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        if not durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self.pg_ctl("-l", str(self.root / "log"), "-w", "-t", "30", "-o", opts, "start")
        wait_port(self.port)

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "-w", "stop")


@contextlib.contextmanager
def postgres_server(*, durable: bool = False) -> Iterator[Postgres]:
    """A fresh cluster (``durable=False``: no fsync) on a free port, removed afterwards.
    As root, Postgres runs as the ``postgres`` user (initdb refuses root)."""
    bindir = postgres_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        raise ServiceMissing("PostgreSQL is not installed (Debian package postgresql)")
    user: str | None = None
    root = Path(tempfile.mkdtemp(prefix="retort-pg-"))
    try:
        if os.geteuid() == 0:
            user = "postgres"
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise ServiceMissing(
                    "running as root and there is no postgres user to run Postgres as"
                ) from None
            os.chown(root, pw.pw_uid, pw.pw_gid)
        pg = Postgres(root, bindir, free_port(), user)
        pg.run(
            str(bindir / "initdb"), "-D", str(pg.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync", "--locale=C",
        )  # fmt: skip
        pg.start(durable=durable)
        try:
            yield pg
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                pg.pg_ctl("-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stop(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


class Redis:
    """A redis-server without persistence on a fixed loopback port: :meth:`stop` and
    :meth:`start` it again (a restart, for fault tests)."""

    def __init__(self, exe: str, root: Path, port: int) -> None:
        self.exe = exe
        self.root = root
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root), "--daemonize", "no"],
            stdout=(self.root / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@contextlib.contextmanager
def redis_instance() -> Iterator[Redis]:
    """A started :class:`Redis` on a free port, stopped and removed afterwards."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceMissing("Redis is not installed (Debian package redis-server)")
    root = Path(tempfile.mkdtemp(prefix="retort-redis-"))
    redis = Redis(exe, root, free_port())
    try:
        redis.start()
        yield redis
    finally:
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server without persistence; yields ``redis://127.0.0.1:PORT/0``."""
    with redis_instance() as redis:
        yield redis.url


@contextlib.contextmanager
def prometheus_server(config: dict[str, Any], root: Path) -> Iterator[Server]:
    """Prometheus with ``config`` (prometheus.yml as a mapping), data and log under
    ``root``; yields the :class:`Server` once ``/-/ready`` answers."""
    import yaml

    exe = shutil.which("prometheus")
    if exe is None:
        raise ServiceMissing("Prometheus is not installed (Debian package prometheus)")
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        exe,
        f"--config.file={root / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running([ServerSpec("prometheus", argv, port, "/-/ready")], root, 60.0) as [prom]:
        yield prom
