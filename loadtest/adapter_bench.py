"""The adapters benchmark (``python -m loadtest.adapter_bench``): cold-load time through the
API, engine memory per adapter, and throughput with 8 adapters mixed against the base alone.

Adapters are untrained (random, non-zero) rank-16 LoRAs on q_proj/v_proj of the default
model: their cost in the engine is the same as trained ones. Writes ``.bench/adapters.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from loadtest.runner import LoadTestConfig, run
from loadtest.servers import free_port, gateway_spec, running

__all__ = ["main"]

N_ADAPTERS = 8
LOAD_CYCLES = 24


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(out_dir: Path = Path(".bench")) -> dict[str, object]:
    from adapters.synthetic import make_tiny_adapter
    from retort.models import DEFAULT_MODEL_NAME, pull_default
    from retort.settings import default_home

    model_dir = pull_default(default_home())
    tmp = Path(tempfile.mkdtemp(prefix="retort-adapter-bench-"))
    home = tmp / "home"
    names = [f"bench-{i}" for i in range(N_ADAPTERS)]
    for i, name in enumerate(names):
        make_tiny_adapter(
            model_dir, home / "adapters" / name, rank=16, base_name=DEFAULT_MODEL_NAME, seed=i
        )
    cfg = tmp / "retort.yaml"
    cfg.write_text(
        json.dumps(
            {
                "home": str(home),
                "model": {"path": str(model_dir), "served_name": DEFAULT_MODEL_NAME},
                "engine": {
                    "enable_lora": True,
                    "max_loras": N_ADAPTERS,
                    "max_lora_rank": 16,
                    "max_cpu_loras": N_ADAPTERS,
                },
                "adapters": {"max_loaded": N_ADAPTERS},
                "server": {"log_level": "warning"},
            }
        )
    )
    spec = gateway_spec("gateway-lora", cfg, free_port())
    result: dict[str, object] = {}
    with (
        running([spec], tmp / "logs", 900) as (server,),
        httpx.Client(base_url=server.url, timeout=120) as c,
    ):
        _, idle_total = server.rss_bytes()
        loads = []
        for i in range(LOAD_CYCLES):
            name = names[i % N_ADAPTERS]
            t0 = time.perf_counter()
            r = c.post("/admin/adapters", json={"name": name})
            loads.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            c.delete(f"/admin/adapters/{name}").raise_for_status()
        _, after_cycles = server.rss_bytes()
        for name in names:
            c.post("/admin/adapters", json={"name": name}).raise_for_status()
        time.sleep(1)
        _, with_all = server.rss_bytes()
        result["cold_load_ms"] = {
            "p50": round(statistics.median(loads), 1),
            "p99": round(_pct(loads, 0.99), 1),
            "mean": round(statistics.fmean(loads), 1),
            "n": len(loads),
        }
        result["rss_mb"] = {
            "idle_no_adapters": round(idle_total / 2**20, 1),
            f"after_{LOAD_CYCLES}_load_unload_cycles": round(after_cycles / 2**20, 1),
            f"with_{N_ADAPTERS}_loaded": round(with_all / 2**20, 1),
            "per_adapter": round((with_all - after_cycles) / N_ADAPTERS / 2**20, 2),
        }
        common: dict[str, Any] = {
            "concurrency": [8],
            "num_requests": 32,
            "max_tokens": 64,
            "warmup": 2,
            "crosstalk_copies": 0,
            "progress": False,
        }
        base = run(LoadTestConfig(url=server.url, model=DEFAULT_MODEL_NAME, **common))
        mix = ",".join(f"{n}:1" for n in names)
        mixed = run(LoadTestConfig(url=server.url, adapter_mix=mix, **common))
        b, m = base.levels[0], mixed.levels[0]
        result["throughput_c8"] = {
            "base_tok_s": round(b.output_throughput, 1),
            "mixed_8_adapters_tok_s": round(m.output_throughput, 1),
            "ratio": round(m.output_throughput / b.output_throughput, 3),
            "errors": b.errors + m.errors,
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapters.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=2)
    print()
