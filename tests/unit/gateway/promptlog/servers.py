"""Real Postgres and Redis servers for tests, each on a free loopback port in a temp folder.

Tests skip (saying which Debian package to install) only when the server binaries are
missing. As root, Postgres runs as the ``postgres`` user (initdb refuses root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["free_port", "postgres_bindir", "postgres_server", "redis_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


def _wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


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
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def db_url(self, name: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        extra: dict[str, Any] = {"user": self.user} if self.user else {}
        return subprocess.run(
            args, check=True, capture_output=True, cwd=self.root, **extra, **kwargs
        )

    def start(self, *, durable: bool = False) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        if not durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
            "-w", "-t", "30", "-o", opts, "start",
        )  # fmt: skip
        _wait_port(self.port)

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


@contextlib.contextmanager
def postgres_server(*, durable: bool = False) -> Iterator[Postgres]:
    bindir = postgres_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    user: str | None = None
    root = Path(tempfile.mkdtemp(prefix="retort-pg-"))
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run Postgres as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    pg = Postgres(root, bindir, free_port(), user)
    try:
        pg._run(
            str(bindir / "initdb"), "-D", str(pg.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync", "--locale=C",
        )  # fmt: skip
        pg.start(durable=durable)
        try:
            yield pg
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                pg._run(str(bindir / "pg_ctl"), "-D", str(pg.data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server without persistence; yields ``redis://127.0.0.1:PORT/0``."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("Redis is not installed (Debian package redis-server)")
    root = Path(tempfile.mkdtemp(prefix="retort-redis-"))
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(root), "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
