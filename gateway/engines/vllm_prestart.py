"""vLLM-CPU: start the engine-core process while the gateway imports vLLM.

A warm restart of ``retort serve`` imported torch and vLLM twice, one import after the
other: the gateway imports vLLM and builds its config (about 14 s here), and only then
spawns the engine core, which imports them again (about 14 s) before it loads the model
(BENCHMARKS.md 9c, 9d). The engine core's import needs nothing from the config, only the
environment its process starts with: the OpenMP binding and the preloaded libgomp that
vLLM-CPU's platform and :func:`~gateway.engines.vllm_cpu.worker_binding` put there, and the
variables vLLM sets for its processes, some of which are read once, as torch's inductor is
imported (``TORCHINDUCTOR_CPP_DYNAMIC_THREADS`` changes the code it generates).

So ``retort serve`` spawns the engine-core process first thing (:func:`prestart`), with the
environment the last start spawned it with (recorded next to vLLM's compile cache,
:data:`ENVIRON_FILE`), and that process imports torch and vLLM while the gateway imports them
(two cores, two imports at once). When the gateway builds the engine, vLLM's process
manager gets that process instead of spawning one (:func:`engine_core_process`), but only
if the environment vLLM would spawn it with is exactly the recorded one; the process then
receives the engine core's target, its arguments and the gateway's environment of that
moment, and runs it. Otherwise (a first start, other settings, another vLLM, a process that
died) the waiting process is stopped, the engine core is spawned as before, and the
environment is recorded for the next start. ``engine.prestart_engine_core: false`` turns it
off.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.engines.vllm_cpu import (
    adopt_environ,
    environ_applied,
    unbind_imports,
    worker_in_engine_core,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from gateway.settings import EngineSettings

__all__ = [
    "ENVIRON_FILE",
    "PRESTARTED",
    "engine_core_process",
    "environ_delta",
    "environ_file",
    "prestart",
]

log = logging.getLogger("retort.engine")

ENVIRON_FILE = "retort-engine-core-environ.json"
"""In vLLM's cache root: what the gateway added to its environment before it spawned the
engine core, at the last start."""
PRESTARTED = "engine core: prestarted, it imported torch and vLLM while the gateway did"
"""Logged when the engine core is the process :func:`prestart` spawned."""

_PRELOAD = (
    "vllm.v1.engine.core",
    "vllm.v1.worker.cpu_worker",
    "gateway.engines.vllm_cpu_executor",
)
"""What the engine core imports before it builds the model (its target, the worker)."""

Delta = dict[str, str | None]
"""Environment changes: a value, or ``None`` for a variable removed."""


@dataclass
class _Waiting:
    proc: BaseProcess
    conn: Connection
    delta: Delta

    def discard(self) -> None:
        self.conn.close()  # the process reads EOF and exits
        self.proc.join(5)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(5)


_base: dict[str, str] | None = None
"""``retort serve``'s environment when it started (set by :func:`prestart`)."""
_waiting: _Waiting | None = None


def environ_file(environ: Mapping[str, str] = os.environ) -> Path:
    """:data:`ENVIRON_FILE` in vLLM's cache root (``VLLM_CACHE_ROOT``, by vLLM's rule)."""
    default = Path(environ.get("XDG_CACHE_HOME", "~/.cache")) / "vllm"
    return Path(environ.get("VLLM_CACHE_ROOT", str(default))).expanduser() / ENVIRON_FILE


def environ_delta(base: Mapping[str, str], now: Mapping[str, str]) -> Delta:
    """What turns ``base`` into ``now``."""
    delta: Delta = {k: v for k, v in now.items() if base.get(k) != v}
    delta.update({k: None for k in base if k not in now})
    return delta


def _read(path: Path) -> Delta | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in data.items()
    ):
        return None
    return data


def _record(path: Path, delta: Delta) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(delta, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only cache: the next start spawns as before
        log.warning("engine core: could not record its environment in %s: %s", path, exc)


def _vllm_cpu() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def prestart(settings: EngineSettings) -> bool:
    """In ``retort serve``, before anything imports vLLM: remember the environment, and
    spawn the engine-core process with the one the last start recorded, where the engine
    is vLLM-CPU's running the model in its engine core. Whether it spawned one."""
    global _base, _waiting
    _base = dict(os.environ)
    if not (
        settings.kind == "vllm"
        and settings.prestart_engine_core
        and _vllm_cpu()
        and worker_in_engine_core(settings, on_cpu=True, environ=os.environ)
    ):
        return False
    delta = _read(environ_file())
    if delta is None:
        return False
    _waiting = _spawn_waiting(delta, _PRELOAD)
    atexit.register(_discard)
    return True


def _spawn_waiting(delta: Delta, modules: tuple[str, ...]) -> _Waiting:
    """Spawn the process that imports ``modules``, then waits for its target, in this
    environment changed by ``delta``."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_wait_and_run, args=(receive, modules), name="EngineCore")
    with environ_applied(delta):
        proc.start()
    receive.close()
    return _Waiting(proc, send, delta)


def _discard() -> None:
    """Stop a prestarted engine-core process that was not used."""
    global _waiting
    waiting, _waiting = _waiting, None
    if waiting is not None:
        waiting.discard()


def _wait_and_run(conn: Connection, modules: tuple[str, ...]) -> None:
    """The prestarted process: import what the engine core needs, then run the target the
    gateway sends, in the environment it sends; exit if it sends nothing."""
    unbind_imports()  # import on every CPU the gateway may use (as a spawned engine core)
    for name in modules:
        importlib.import_module(name)
    try:
        target, kwargs, environ = conn.recv()
    except EOFError:
        return  # the gateway spawned its engine core itself, or it stopped
    finally:
        conn.close()
    # setproctitle (vLLM names its processes with it) takes over the argv and environ area
    # the first time it is used, and cannot once the environment has been rewritten.
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.getproctitle()
    adopt_environ(environ)
    target(**kwargs)


class _Handoff:
    """What vLLM's process manager gets for its engine core: :meth:`start` hands the
    target to the prestarted process when the environment is the one it started with, and
    spawns a process otherwise. Everything else is the process's (pid, sentinel, exitcode,
    terminate, join, ...)."""

    def __init__(
        self,
        waiting: _Waiting,
        base: Mapping[str, str],
        job: tuple[Callable[..., Any], dict[str, Any]],
        spawn: Callable[[], BaseProcess],
    ) -> None:
        self._waiting: _Waiting | None = waiting
        self._base = base
        self._job = job
        self._spawn = spawn
        self._proc: BaseProcess = waiting.proc

    def start(self) -> None:
        waiting, self._waiting = self._waiting, None
        assert waiting is not None, "started twice"
        now = dict(os.environ)
        delta = environ_delta(self._base, now)
        why = _unusable(waiting, delta)
        if why is None:
            try:
                waiting.conn.send((*self._job, now))
            except (OSError, EOFError) as exc:  # the process died since it was checked
                why = f"it stopped ({exc})"
            else:
                waiting.conn.close()
                log.info(PRESTARTED)
                return
        log.info("engine core: spawned, the prestarted process was not used: %s", why)
        waiting.discard()
        self._proc = self._spawn()
        self._proc.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proc, name)


def _unusable(waiting: _Waiting, delta: Delta) -> str | None:
    if not waiting.proc.is_alive():
        return f"it exited with code {waiting.proc.exitcode}"
    if delta != waiting.delta:
        keys = delta.keys() | waiting.delta.keys()
        changed = sorted(k for k in keys if delta.get(k) != waiting.delta.get(k))
        return "its environment differs in " + ", ".join(changed)
    return None


class _Context:
    """vLLM's multiprocessing context, with the engine core's process from :func:`prestart`."""

    def __init__(self, real: Any, waiting: _Waiting, base: Mapping[str, str]) -> None:
        self._real = real
        self._waiting: _Waiting | None = waiting
        self._base = base

    def Process(self, **kwargs: Any) -> Any:  # noqa: N802 (multiprocessing's name)
        waiting = self._waiting
        if waiting is None or kwargs.get("name") != "EngineCore":
            return self._real.Process(**kwargs)
        self._waiting = None
        job = (kwargs["target"], kwargs.get("kwargs", {}))
        return _Handoff(waiting, self._base, job, lambda: self._real.Process(**kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def engine_core_process(vllm_config: Any, *, in_core: bool) -> Iterator[None]:
    """While the gateway creates vLLM's ``AsyncLLM``: where the model runs in the engine
    core (``in_core``), record the environment the engine core is spawned with for the next
    start, and hand vLLM the prestarted process, if any."""
    global _waiting
    base = _base
    waiting, _waiting = _waiting, None
    if base is None or not in_core:  # not under `retort serve`, or vLLM's own layout
        if waiting is not None:
            waiting.discard()
        yield
        return
    _record(environ_file(), environ_delta(base, os.environ))
    if waiting is None:
        yield
        return
    if getattr(vllm_config.parallel_config, "numa_bind", False):
        log.info("engine core: spawned, vLLM binds it with numactl (parallel_config.numa_bind)")
        waiting.discard()
        yield
        return
    import vllm.v1.engine.utils as engine_utils

    # vLLM's process manager takes its context from this module's name (checked: another
    # vLLM that does not simply spawns as before).
    real = getattr(engine_utils, "get_mp_context", None)
    if real is None:
        log.warning("engine core: spawned, this vLLM starts it another way")
        waiting.discard()
        yield
        return
    context = _Context(real(), waiting, base)
    engine_utils.get_mp_context = lambda: context  # type: ignore[attr-defined]
    try:
        yield
    finally:
        engine_utils.get_mp_context = real  # type: ignore[attr-defined]
        if context._waiting is not None:  # vLLM never asked for its engine core
            context._waiting.discard()
