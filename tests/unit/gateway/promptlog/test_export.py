"""``retort logs export``: every format loads with HF ``datasets``."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from retort.db.export import EXPORT_COLUMNS, logs_app, parse_time
from retort.db.store import PromptStore
from tests.unit.gateway.promptlog.conftest import make_record

pytestmark = pytest.mark.asyncio(loop_scope="session")

NOW = time.time()


async def populate(url: str) -> None:
    async with PromptStore(url) as store:
        await store.insert_many(
            [
                make_record(0, created=NOW - 86400 * 3, tags={"app": "a"}),
                make_record(1, adapter="sql", params={"temperature": 0.0, "stop": "x"}),
                make_record(
                    2,
                    model="student-1",
                    served_by="student",
                    messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                ),
                make_record(3, endpoint="completions", messages=None, prompt="Once upon"),
            ]
        )
        await store.add_feedback("req-1", 1.0)
        await store.add_feedback("req-2", 0.2)


async def cli(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, logs_app, list(args))


def load(fmt: str, out: Path, cache: Path) -> Any:
    import datasets

    if fmt == "hf":
        return datasets.load_from_disk(str(out))
    builder = "json" if fmt == "jsonl" else "parquet"
    return datasets.load_dataset(builder, data_files=str(out), split="train", cache_dir=str(cache))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
async def test_every_format_loads_with_datasets(tmp_path: Path, fmt: str) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/retort.db"
    await populate(url)
    out = tmp_path / f"export.{fmt}"
    result = await cli("export", "--format", fmt, "--out", str(out), "--url", url)
    assert result.exit_code == 0, result.output
    assert "exported 4 records" in result.output
    ds = await asyncio.to_thread(load, fmt, out, tmp_path / "cache")
    assert ds.num_rows == 4
    assert list(ds.column_names) == list(EXPORT_COLUMNS)
    rows = ds.to_list()
    assert rows[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Question 0?"},
    ]
    assert json.loads(rows[0]["tags"]) == {"app": "a"}
    assert json.loads(rows[1]["params"]) == {"temperature": 0.0, "stop": "x"}
    assert rows[1]["score"] == 1.0
    assert rows[1]["adapter"] == "sql"
    assert rows[2]["messages"] == [{"role": "user", "content": "hi"}]
    assert rows[3]["messages"] is None
    assert rows[3]["prompt"] == "Once upon"
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".export")]
    assert not leftovers  # written atomically, nothing left over


async def test_filters(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/retort.db"
    await populate(url)

    async def ids(*flags: str) -> list[str]:
        out = tmp_path / "f.jsonl"
        result = await cli("export", "-f", "jsonl", "-o", str(out), "--url", url, *flags)
        assert result.exit_code == 0, result.output
        return [json.loads(line)["request_id"] for line in out.read_text().splitlines()]

    assert await ids("--model", "base-model") == ["req-0", "req-1", "req-3"]
    assert await ids("--adapter", "sql") == ["req-1"]
    assert await ids("--min-score", "0.5") == ["req-1"]
    assert await ids("--since", "1d") == ["req-1", "req-2", "req-3"]
    assert await ids("--until", "2d") == ["req-0"]
    assert await ids("--served-by", "student") == ["req-2"]
    assert await ids("--limit", "2") == ["req-0", "req-1"]


async def test_default_database_comes_from_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RETORT_HOME", raising=False)
    home = tmp_path / "home"
    await populate(f"sqlite+aiosqlite:///{home}/retort.db")
    config = tmp_path / "retort.yaml"
    config.write_text(f"home: {home}\n")
    out = tmp_path / "x.jsonl"
    result = await cli("export", "-f", "jsonl", "-o", str(out), "--config", str(config))
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 4


async def test_missing_database_and_bad_times_are_clear(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/nope.db"
    result = await cli("export", "-f", "jsonl", "-o", str(tmp_path / "x"), "--url", url)
    assert result.exit_code == 2
    assert "no prompt log" in result.output
    assert not (tmp_path / "nope.db").exists()
    result = await cli("export", "-f", "jsonl", "-o", str(tmp_path / "x"), "--since", "yesterday")
    assert result.exit_code == 2
    result = await cli("export", "-f", "csv", "-o", str(tmp_path / "x"))
    assert result.exit_code == 2


async def test_parse_time() -> None:
    assert parse_time("1733000000") == 1733000000.0
    assert parse_time("1970-01-02") == 86400.0
    assert parse_time("1970-01-01T01:00:00+01:00") == 0.0
    assert parse_time("1970-01-01T00:00:10Z") == 10.0
    assert parse_time("7d", now=1000000.0) == 1000000.0 - 7 * 86400
    assert parse_time("90s", now=100.0) == 10.0
    assert parse_time("1.5h", now=10000.0) == 10000.0 - 5400
    with pytest.raises(ValueError, match="cannot read time"):
        parse_time("soon")
