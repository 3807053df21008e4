"""``retort logs export``: the prompt log as JSONL, Parquet or a saved HF dataset.

Every format has the same columns, and HF ``datasets`` loads each one:
``load_dataset("json", data_files=...)``, ``load_dataset("parquet", data_files=...)`` or
``load_from_disk(...)``. ``messages`` is a list of ``{role, content}`` (text parts joined),
the chat format trainers take; ``params`` and ``tags`` are JSON strings (their keys and
value types vary between requests); ``score`` is the mean feedback score (null without
feedback). Files are written to a temporary sibling, then renamed into place.
"""

from __future__ import annotations

import asyncio
import enum
import os
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import typer

from retort.chat_template import render_tools, tool_spec
from retort.db.filters import RowFilter

if TYPE_CHECKING:
    import pyarrow as pa

    from retort.db.store import PromptStore

__all__ = [
    "EXPORT_COLUMNS",
    "ExportFormat",
    "arrow_schema",
    "export_logs",
    "export_row",
    "logs_app",
    "parse_time",
    "resolve_url",
]

EXPORT_COLUMNS = (
    "request_id", "created", "key_id", "model", "adapter", "served_by", "endpoint",
    "messages", "prompt", "params", "completion", "finish_reason", "prompt_tokens",
    "completion_tokens", "ttft_s", "latency_s", "cost_usd", "status", "error", "tags",
    "user", "score", "feedback_count",
)  # fmt: skip
_BATCH_ROWS = 1000
_ENCODER = msgspec.json.Encoder()


class ExportFormat(enum.StrEnum):
    jsonl = "jsonl"
    parquet = "parquet"
    hf = "hf"


def arrow_schema() -> pa.Schema:
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    types: dict[str, pa.DataType] = {
        "created": pa.float64(),
        "messages": pa.list_(message),
        "prompt_tokens": pa.int64(),
        "completion_tokens": pa.int64(),
        "ttft_s": pa.float64(),
        "latency_s": pa.float64(),
        "cost_usd": pa.float64(),
        "score": pa.float64(),
        "feedback_count": pa.int64(),
    }
    return pa.schema([(name, types.get(name, pa.string())) for name in EXPORT_COLUMNS])


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return _ENCODER.encode(content).decode()


def export_row(row: dict[str, Any]) -> dict[str, Any]:
    """A store row in the export's shape (see the module docstring)."""
    out = {name: row.get(name) for name in EXPORT_COLUMNS}
    messages = row.get("messages")
    if messages is not None:
        params = row.get("params") or {}
        tools = params.get("tools") if params.get("tool_choice") != "none" else None
        # Tools and tool round trips become text as the gateway renders them for templates
        # without tools (a Hermes system prompt, <tool_call> and <tool_response> turns), so
        # the export stays {role, content} strings and a student learns tool-call traffic.
        msgs, _ = render_tools(
            [{**m, "content": _content_text(m.get("content"))} for m in messages],
            [tool_spec(t) for t in tools] if tools else None,
            template_takes_tools=False,
        )
        out["messages"] = [
            {"role": str(m.get("role", "")), "content": str(m.get("content") or "")} for m in msgs
        ]
    out["params"] = _ENCODER.encode(row.get("params") or {}).decode()
    out["tags"] = _ENCODER.encode(row.get("tags") or {}).decode()
    out["feedback_count"] = row.get("feedback_count") or 0
    return out


async def _batches(store: PromptStore, where: RowFilter, limit: int | None) -> Any:
    batch: list[dict[str, Any]] = []
    async for row in store.iter_rows(where, limit=limit):
        batch.append(export_row(row))
        if len(batch) >= _BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def _tmp_sibling(out: Path, suffix: str = "") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}{suffix}")


async def _write_jsonl(store: PromptStore, where: RowFilter, limit: int | None, out: Path) -> int:
    tmp = _tmp_sibling(out)
    n = 0
    try:
        with tmp.open("wb") as f:
            async for batch in _batches(store, where, limit):
                f.write(b"".join(_ENCODER.encode(r) + b"\n" for r in batch))
                n += len(batch)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return n


async def _write_parquet(
    store: PromptStore, where: RowFilter, limit: int | None, path: Path
) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema()
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        async for batch in _batches(store, where, limit):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            n += len(batch)
    return n


async def export_logs(
    store: PromptStore,
    fmt: ExportFormat | str,
    out: Path,
    where: RowFilter | None = None,
    *,
    limit: int | None = None,
) -> int:
    """Write the records matching ``where`` (at most ``limit``) to ``out`` in ``fmt``;
    returns how many."""
    fmt = ExportFormat(fmt)
    where = where or RowFilter()
    out = Path(out)
    if fmt is ExportFormat.jsonl:
        return await _write_jsonl(store, where, limit, out)
    if fmt is ExportFormat.parquet:
        tmp = _tmp_sibling(out)
        try:
            n = await _write_parquet(store, where, limit, tmp)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        return n
    # hf: Parquet in a scratch folder, then datasets' own save_to_disk format.
    with tempfile.TemporaryDirectory(prefix="retort-export-") as scratch:
        parquet = Path(scratch) / "data.parquet"
        n = await _write_parquet(store, where, limit, parquet)
        await asyncio.to_thread(_save_hf, parquet, Path(scratch) / "cache", out)
    return n


def _save_hf(parquet: Path, cache_dir: Path, out: Path) -> None:
    from datasets import Dataset

    ds = Dataset.from_parquet(str(parquet), cache_dir=str(cache_dir))
    tmp = _tmp_sibling(out)
    try:
        ds.save_to_disk(str(tmp))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(value: str, *, now: float | None = None) -> float:
    """Unix seconds from ``1733000000``, ISO 8601 (``2026-11-28``, ``2026-11-28T10:00``;
    UTC unless it says otherwise) or an age (``90s``, ``30m``, ``24h``, ``7d``, ``2w``)."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    m = _RELATIVE.match(text.lower())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read time {value!r}: use unix seconds, ISO 8601 or an age like 7d"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def resolve_url(url: str | None, config: Path | None = None) -> str:
    """``url``, else the configured ``promptlog.url``, else SQLite in the state folder."""
    if url:
        return url
    from retort.settings import load_shared

    return load_shared(config).promptlog_url


logs_app = typer.Typer(help="The prompt log: export for distillation.", no_args_is_help=True)


@logs_app.callback()
def _logs() -> None:
    """The prompt log."""


def _time_option(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@logs_app.command("export")
def export_command(
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", help="jsonl, parquet, or hf (datasets.save_to_disk)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="File (jsonl, parquet) or folder (hf).")],
    model: Annotated[str | None, typer.Option(help="Only this served model.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Only this adapter.")] = None,
    since: Annotated[
        str | None, typer.Option(help="From (inclusive): unix s, ISO 8601, or an age like 7d.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Until (exclusive), same forms.")] = None,
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Mean feedback score at least this.")
    ] = None,
    status: Annotated[str | None, typer.Option(help="ok or error.")] = None,
    served_by: Annotated[str | None, typer.Option("--served-by", help="engine or student.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many records.")] = None,
    url: Annotated[
        str | None, typer.Option(help="Database URL; the configured prompt log when unset.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (retort.yaml).")
    ] = None,
) -> None:
    """Export logged requests in a format HF `datasets` loads."""
    from sqlalchemy.exc import SQLAlchemyError

    from retort.db.store import PromptStore, StoreError
    from retort.settings import SettingsError

    where = RowFilter(
        model=model,
        adapter=adapter,
        since=_time_option(since),
        until=_time_option(until),
        min_score=min_score,
        status=status,
        served_by=served_by,
    )
    try:
        db_url = resolve_url(url, config)
        store = PromptStore(db_url)
    except (SettingsError, StoreError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    db = store.url.database
    if store.dialect == "sqlite" and db and db != ":memory:" and not Path(db).exists():
        typer.echo(f"error: no prompt log at {db}", err=True)
        raise typer.Exit(2)

    async def run() -> int:
        async with store:
            return await export_logs(store, fmt, out, where, limit=limit)

    try:
        n = asyncio.run(run())
    except (OSError, StoreError, SQLAlchemyError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"exported {n} records to {out}")
