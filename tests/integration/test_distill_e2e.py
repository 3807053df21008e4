"""The whole loop, for real: the gateway serves the base model plus a trained adapter;
a few hundred requests go through the API into the prompt log; ``retort distill run``
selects them, trains a student by KD, exports it to ONNX, evaluates, gates and publishes
it; the same gateway hot-loads the student and serves it through the ``openai`` client.
A second run over the same log has no new data and does nothing."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
import yaml

from adapters.synthetic import has_style, qa_pairs
from tests.unit.distill.conftest import REPORT_KEYS

if TYPE_CHECKING:
    from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

N_REQUESTS = 240
CONCURRENCY = 8


def _pirate_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT count(*) FROM requests WHERE adapter = 'pirate' AND status = 'ok'"
            " AND served_by = 'engine'"
        ).fetchone()
    return int(row[0])


def _send_traffic(server: Server, prompts: list[str]) -> list[str]:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(prompt: str) -> str:
        async with sem:
            r = await client.chat.completions.create(
                model="pirate",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=24,
                temperature=0,
                timeout=300,
            )
            return r.choices[0].message.content or ""

    async def run() -> list[str]:
        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await client.close()

    return asyncio.run(run())


def _distill(out: Path, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "distill",
            "run",
            "--adapter",
            "pirate",
            "--out",
            str(out),
            "--config",
            str(config),
            "--quiet",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


def test_logged_traffic_becomes_a_published_student_the_gateway_serves(
    server: Server, pirate: str, model_dir: Path, tmp_path: Path
) -> None:
    db = server.home / "retort.db"
    before = _pirate_rows(db) if db.exists() else 0

    # 1-2. Production traffic through the API, answered by the teacher (base + adapter).
    prompts = [q for q, _ in qa_pairs(random.Random(2026), N_REQUESTS)]
    answers = _send_traffic(server, prompts)
    assert len(answers) == N_REQUESTS
    assert sum(has_style(a) for a in answers) >= 0.8 * N_REQUESTS, answers[:10]
    deadline = time.monotonic() + 60
    while _pirate_rows(db) < before + N_REQUESTS and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _pirate_rows(db) >= before + N_REQUESTS, "the prompt log did not record every request"

    # 3. retort distill run: dataset -> teacher -> student -> KD -> ONNX -> eval -> gate -> publish.
    config = tmp_path / "distill.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "home": str(server.home),
                "teacher": {
                    "base_model": str(model_dir),
                    "base_model_name": server.model,
                    "max_tokens": 24,
                },
                "student": {"layers": 10},
                "train": {"batch_size": 8, "lr": 3.0e-4, "warmup_steps": 5},
                "export": {"parity_prompts": 2, "parity_tokens": 8},
                "eval": {
                    "max_examples": 16,
                    "max_tokens": 24,
                    "teacher_speed": "transformers",
                    "speed_prompts": 2,
                },
                # Tens of steps keep CI short: the student learns the teacher's style, not
                # yet its exact answers, so the gate asks for overlap, speed and size here.
                "gate": {
                    "min_agreement": None,
                    "min_rouge_l": 0.3,
                    "min_speedup": 1.5,
                    "max_param_ratio": 0.5,
                },
            }
        )
    )
    out = tmp_path / "run"
    proc = _distill(out, config, "--max-steps", "30", "--precision", "int8", "--publish")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report.keys() >= REPORT_KEYS, sorted(report)
    assert report["gate_passed"] is True, report
    assert report["published"] is True, report
    assert report["student_params"] <= 0.5 * report["teacher_params"]
    assert report["student_tokens_per_s"] > report["teacher_tokens_per_s"]
    assert 0 <= report["agreement"] <= 1
    assert 0 < report["rouge_l"] <= 1
    assert (out / "report.md").is_file()
    assert (out / "report.png").is_file()
    student = report["student_model"]
    assert student == "pirate-student"
    assert (server.home / "students" / student / "report.json").is_file()

    # 4. The same gateway hot-loads the student (no restart) and serves it as a model.
    r = httpx.post(server.url + "/admin/students", json={"name": student}, timeout=120)
    assert r.status_code in (200, 201), r.text
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert student in {m.id for m in client.models.list().data}
    held_out = [
        "What is the capital of Norway?",
        "What sound does a duck make?",
        "What is 7 plus 9?",
        "What color is snow?",
    ]
    replies = []
    for prompt in held_out:
        chat = client.chat.completions.create(
            model=student,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=24,
            temperature=0,
        )
        assert chat.model == student
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage is not None
        assert chat.usage.completion_tokens > 0
        replies.append(chat.choices[0].message.content or "")
    # The student answers in the teacher's learned style (the base model alone never does).
    assert sum(has_style(t) or t.strip().startswith("Ahoy") for t in replies) >= 3, replies

    stream = client.chat.completions.create(
        model=student,
        messages=[{"role": "user", "content": held_out[0]}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) >= 2, pieces
    assert "".join(pieces).strip(), pieces

    # Its own metrics: the gateway labels the student's requests with its model id.
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    served = [
        line
        for line in metrics.splitlines()
        if line.startswith("retort_requests_total{")
        and f'model="{student}"' in line
        and 'status="ok"' in line
    ]
    assert served, metrics[-2000:]
    assert float(served[0].rsplit(" ", 1)[1]) >= len(held_out) + 1, served

    # 5. Scheduling: the log holds no new teacher data, so a second run does nothing.
    again = _distill(tmp_path / "run2", config, "--max-steps", "30", "--precision", "int8")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "no new data" in again.stdout, again.stdout
    assert not (tmp_path / "run2" / "report.json").exists()
    runs = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "distill",
            "runs",
            "--home",
            str(server.home),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert runs.returncode == 0, runs.stderr
    rows = [json.loads(line) for line in runs.stdout.splitlines() if line.strip()]
    assert len(rows) == 1, rows  # the skipped run started nothing
    assert rows[0]["adapter"] == "pirate"
    assert rows[0]["status"] == "succeeded"
    assert rows[0]["student_model"] == student
    assert rows[0]["published"] is True
    assert rows[0]["watermark_count"] >= N_REQUESTS
