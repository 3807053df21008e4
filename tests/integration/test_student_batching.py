"""A published student under concurrent load, through the real gateway and the ``openai`` client.

The student: 10 of the default model's 30 layers, exported to ONNX (fp32, so that batched
and single-row arithmetic agree to the last digit that matters), published to the shared
server's registry and hot-loaded. Sixteen streamed requests run at once, each with its own
prompt and seed (sampled at temperature 1): each stream must carry exactly what the same
request gets alone, so no row of the batch leaks into another (the cross-talk check). A
stream closed by its client frees its place: with all places but one taken, the next
request is served once the cancelled one is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.integration.conftest import Server, start_server, stop_server

pytest.importorskip("onnxruntime_genai")

N = 16
TOKENS = 24


ROWS = 16  # the server's students.max_concurrency; students.max_queue is 0


@pytest.fixture(scope="module")
def student_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway of its own (16 rows, no queue) with the student published before start
    (so ``students.autoload`` loads it)."""
    from distill.export import build_onnx
    from distill.student import init_student
    from gateway.students import StudentRegistry

    tmp = tmp_path_factory.mktemp("batch-student")
    init_student(model_dir, tmp / "hf", 10)
    onnx = build_onnx(tmp / "hf", tmp / "onnx", "fp32")
    StudentRegistry(tmp / "home" / "students").publish(
        STUDENT, onnx, teacher_model="SmolLM2-135M-Instruct", precision="fp32"
    )
    env = {"RETORT_STUDENTS__MAX_CONCURRENCY": str(ROWS), "RETORT_STUDENTS__MAX_QUEUE": "0"}
    srv = start_server(tmp, model_dir, name="student-gateway", env=env)
    try:
        yield srv
    finally:
        stop_server(srv)


STUDENT = "batch-student"


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a line about the number {i} and the sea."}]


async def _stream(client: openai.AsyncOpenAI, model: str, i: int) -> str:
    stream = await client.chat.completions.create(
        model=model,
        messages=_messages(i),  # type: ignore[arg-type]
        max_tokens=TOKENS,
        temperature=1.0,
        seed=100 + i,
        stream=True,
    )
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text


def test_sixteen_streams_without_cross_talk(student_server: Server) -> None:
    async def run() -> tuple[list[str], list[str]]:
        client = openai.AsyncOpenAI(base_url=student_server.url + "/v1", api_key="x")
        together = await asyncio.gather(*(_stream(client, STUDENT, i) for i in range(N)))
        alone = [await _stream(client, STUDENT, i) for i in range(N)]
        await client.close()
        return list(together), alone

    together, alone = asyncio.run(run())
    assert all(together), "every stream carried text"
    assert len(set(together)) > N // 2, "the prompts and seeds give different texts"
    assert together == alone


async def _try_once(client: openai.AsyncOpenAI) -> int:
    """200 or the status of the refusal."""
    try:
        await client.chat.completions.create(model=STUDENT, messages=_messages(1), max_tokens=4)  # type: ignore[arg-type]
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_cancelled_stream_frees_its_place(student_server: Server) -> None:
    """All rows taken by long streams, no queue: one more request gets 503 + Retry-After;
    the client closing one stream frees its row, and the next request is served."""

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=student_server.url + "/v1", api_key="x", max_retries=0)
        streams = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=STUDENT,
                    messages=_messages(i),  # type: ignore[arg-type]
                    max_tokens=1000,
                    extra_body={"ignore_eos": True},
                    stream=True,
                )
                for i in range(ROWS)
            )
        )
        try:
            with pytest.raises(openai.APIStatusError) as err:
                await client.chat.completions.create(
                    model=STUDENT,
                    messages=_messages(0),  # type: ignore[arg-type]
                    max_tokens=4,
                )
            assert err.value.status_code == 503
            assert int(err.value.response.headers["retry-after"]) >= 1
            await streams[0].close()
            statuses = []
            for _ in range(50):  # the gateway notices the disconnect within a step or two
                statuses.append(await _try_once(client))
                if statuses[-1] != 503:
                    break
                await asyncio.sleep(0.2)
            assert statuses[-1] == 200, statuses
        finally:
            for s in streams[1:]:
                await s.close()
            await client.close()

    asyncio.run(run())
