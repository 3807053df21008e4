"""Seconds per KD step on a pipeline run's own inputs: ``python -m distill.step_bench RUN``.

``RUN`` is a pipeline run folder (``retort distill run``, ``distill.bench``'s ``WORK/run``,
a ``distill.frontier`` point): its merged teacher, student init and train split. Trains
``--steps`` steps at ``--batch`` on the first ``--examples`` train examples (fewer examples
than a batch times the steps makes later epochs, where the teacher's logits are cached),
and prints each step's seconds and how many batches ran the teacher. Run it from two
checkouts to compare them (BENCHMARKS.md §6b).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    from datasets import load_from_disk

    from distill.config import TrainConfig
    from distill.results import TrainSpec
    from distill.train import train_kd

    work = Path(tempfile.mkdtemp(prefix="retort-step-bench-"))
    try:
        train = load_from_disk(str(args.run / "dataset" / "train"))
        train.select(range(min(args.examples, len(train)))).save_to_disk(
            str(work / "data" / "train")
        )
        spec = TrainSpec(
            teacher=str(args.run / "teacher" / "model"),
            student=str(args.run / "student" / "init"),
            data=str(work / "data"),
            out=str(work / "out"),
            config=TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=3e-4),
        )
        result = train_kd(spec, progress=False)
        log = json.loads((work / "out" / "train_log.json").read_text())["log"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ends = [row["seconds"] for row in log]
    steps = [round(b - a, 2) for a, b in zip([0.0, *ends], ends, strict=False)]
    print(
        json.dumps(
            {
                "seconds_per_step": steps,
                "teacher_forwards": result.teacher_forwards,
                "teacher_cached": result.teacher_cached,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
