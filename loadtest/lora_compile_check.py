"""Do compiled LoRA steps give the tokens eager ones give? (``python -m
loadtest.lora_compile_check``, ``engine.lora_compile``, BENCHMARKS.md section 11c)

Starts the gateway on the real engine three times, one at a time with the same caches, each
with the given trained adapters preloaded: ``engine.lora_compile: true``, the same again (a
warm restart that loads the first start's AOT artifact, ``engine.aot_cache``, and warms it
up on a small batch), then
``lora_compile: false``. Each asks every model (the base and each adapter) the same prompts
greedily, first one request at a time and then all at once (steps that mix adapters and the
base model), and compares: each compiled start's texts against the eager ones, and mixed
texts against solo ones. Prints one JSON object and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from loadtest.servers import free_port, gateway_spec, running

__all__ = ["PROMPTS", "main"]

PROMPTS: tuple[str, ...] = (
    "Name a fruit that is red.",
    "How many days are in a week?",
    "Tell me one fact about the moon.",
    "I loved this film, the actors were wonderful.",
    "The delivery was late and the box was broken.",
    "Invoice 4471 from Acme Corp, due 2024-03-01, total $1,250.00.",
)


async def _ask(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> str:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


async def _answers(url: str, models: list[str], max_tokens: int) -> dict[str, Any]:
    pairs = [(m, p) for m in models for p in PROMPTS]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        solo = [await _ask(client, m, p, max_tokens) for m, p in pairs]
        mixed = await asyncio.gather(*(_ask(client, m, p, max_tokens) for m, p in pairs))
    return {
        "solo": {f"{m} | {p}": t for (m, p), t in zip(pairs, solo, strict=True)},
        "mixed": {f"{m} | {p}": t for (m, p), t in zip(pairs, mixed, strict=True)},
    }


def run_mode(
    compile_on: bool,
    adapters: list[Path],
    work: Path,
    cache: Path,
    model_dir: Path,
    served: str,
    max_tokens: int,
    label: str | None = None,
) -> dict[str, Any]:
    from gateway.engines.lora_plugin import AOT_WARMUP_APPLIED
    from gateway.engines.vllm_prestart import PRESTARTED

    home = work / "home"
    names = []
    for src in adapters:
        dst = home / "adapters" / src.name
        if not dst.is_dir():
            shutil.copytree(src, dst)
        names.append(src.name)
    name = label or ("compile" if compile_on else "no-compile")
    cfg = work / f"{name}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "home": str(home),
                "model": {"path": str(model_dir), "served_name": served},
                "engine": {"lora_compile": compile_on},
                "promptlog": {"enabled": False},
                "adapters": {"preload": names, "max_loaded": max(1, len(names))},
            }
        )
    )
    env = {
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
    }
    spec = gateway_spec(name, cfg, free_port(), env=env)
    with running([spec], work / "logs", 1800) as (server,):
        out = asyncio.run(_answers(server.url, [served, *names], max_tokens))
        log = server.log_path.read_text(errors="replace")
    out["compiled"] = "retort LoRA compile: compilation mode NONE" in log
    out["aot_loaded"] = "Directly load AOT compilation" in log
    out["aot_warmup"] = AOT_WARMUP_APPLIED in log
    out["prestarted"] = PRESTARTED in log
    out["log"] = str(server.log_path)
    return out


def main(argv: list[str] | None = None) -> int:
    from retort.models import DEFAULT_MODEL_NAME, pull_default
    from retort.settings import default_home

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("adapters", nargs="+", type=Path, help="trained adapter folders (registry)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--cache", type=Path, default=None, help="vLLM/inductor caches to reuse")
    args = p.parse_args(argv)
    model_dir = pull_default(default_home())
    work = Path(tempfile.mkdtemp(prefix="retort-lora-compile-"))
    cache = args.cache or work / "cache"
    # Compiled first (it fails first if it fails), then compiled again: that start loads the
    # first one's AOT artifact (engine.aot_cache) instead of compiling; then eager.
    runs = {
        label: run_mode(
            mode, args.adapters, work, cache, model_dir, DEFAULT_MODEL_NAME, args.max_tokens, label
        )
        for label, mode in (("compile", True), ("compile-again", True), ("no-compile", False))
    }
    eager, compiled, again = runs["no-compile"], runs["compile"], runs["compile-again"]
    diffs = {
        "compile_vs_eager": [k for k in eager["solo"] if eager["solo"][k] != compiled["solo"][k]],
        "aot_loaded_vs_eager": [k for k in eager["solo"] if eager["solo"][k] != again["solo"][k]],
        "mixed_vs_solo_aot_loaded": [
            k for k in again["solo"] if again["mixed"][k] != again["solo"][k]
        ],
        "mixed_vs_solo_eager": [k for k in eager["solo"] if eager["mixed"][k] != eager["solo"][k]],
        "mixed_vs_solo_compiled": [
            k for k in compiled["solo"] if compiled["mixed"][k] != compiled["solo"][k]
        ],
    }
    report = {
        "requests_per_mode": 2 * len(eager["solo"]),
        "compiled_log_line": compiled["compiled"],
        "eager_log_line": eager["compiled"],
        "second_start_loaded_aot": again["aot_loaded"],
        "second_start_small_warmup": again["aot_warmup"],
        "prestarted": {label: r["prestarted"] for label, r in runs.items()},
        "differences": diffs,
        "examples": {k: (eager["solo"][k], compiled["solo"][k]) for k in list(eager["solo"])[:8]},
        "logs": [eager["log"], compiled["log"], again["log"]],
    }
    print(json.dumps(report, indent=2))
    ok = (
        compiled["compiled"]
        and again["aot_loaded"]
        and not eager["compiled"]
        and not any(diffs.values())
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
