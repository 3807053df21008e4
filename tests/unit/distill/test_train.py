from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.synthetic import make_style_dataset
from distill.config import DatasetConfig, StudentConfig, TrainConfig
from distill.dataset import build_dataset
from distill.results import TrainSpec
from distill.student import student_stage
from distill.train import should_stop, train_kd, train_stage
from tests.services import missing
from tests.tiny import make_tiny_base


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kd")
    teacher = make_tiny_base(root / "teacher", layers=4)
    data = make_style_dataset(root / "style.jsonl", n=40)
    rows = []
    for i, line in enumerate(data.read_text().splitlines()):
        msgs = json.loads(line)["messages"]
        rows.append(
            {
                "request_id": f"r{i}",
                "created": float(i),
                "model": "teacher",
                "adapter": None,
                "served_by": "engine",
                "endpoint": "chat",
                "messages": msgs[:1],
                "prompt": None,
                "params": {},
                "tags": {},
                "completion": msgs[1]["content"],
            }
        )
    run = root / "run"
    build_dataset(rows, run, DatasetConfig(eval_fraction=0.2, near_dup_threshold=1.01))
    student = Path(student_stage(teacher, run, StudentConfig(layers=2)).path)
    return {"teacher": teacher, "student": student, "data": run / "dataset", "run": run}


def test_train_lowers_loss_and_saves(setup: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(max_steps=12, batch_size=4, grad_accum=2, lr=3e-3)
    result = train_stage(
        setup["teacher"], setup["student"], setup["data"], tmp_path, cfg, progress=False
    )
    assert result.final_loss is not None
    assert result.initial_loss is not None
    assert result.final_loss < result.initial_loss
    assert result.global_batch == 4
    final = tmp_path / "train" / "final"
    assert AutoModelForCausalLM.from_pretrained(str(final)).config.num_hidden_layers == 2
    assert (tmp_path / "train" / "loss.png").stat().st_size > 0
    log = json.loads((tmp_path / "train" / "train_log.json").read_text())
    assert len(log["log"]) == 12
    # Done: a rerun with the same inputs is skipped.
    assert (
        train_stage(
            setup["teacher"], setup["student"], setup["data"], tmp_path, cfg, progress=False
        )
        == result
    )


def test_resume_from_checkpoint(setup: dict[str, Path], tmp_path: Path) -> None:
    spec = TrainSpec(
        teacher=str(setup["teacher"]),
        student=str(setup["student"]),
        data=str(setup["data"]),
        out=str(tmp_path),
        config=TrainConfig(max_steps=2, batch_size=2, checkpoint_every=1, loss="jsd"),
    )
    first = train_kd(spec, progress=False)
    assert first.resumed_from == 0
    assert (tmp_path / "checkpoints" / "step-2" / "done").is_file()
    spec.config.max_steps = 4
    second = train_kd(spec, progress=False)
    assert second.resumed_from == 2
    log = json.loads((tmp_path / "train_log.json").read_text())["log"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


@pytest.mark.timeout(600)
def test_accelerate_launch_two_cpu_processes(setup: dict[str, Path], tmp_path: Path) -> None:
    """The same script under `accelerate launch` with 2 processes on the CPU (DDP on gloo).

    accelerate 1.x runs ``--cpu --num_processes 2`` as one process (its multi-CPU path needs
    an MPI hostfile); ``--multi_gpu`` launches through torchrun, and the script's
    ``Accelerator(cpu=True)`` (no CUDA) makes the group a gloo one on the CPU.
    """
    if (
        shutil.which("accelerate") is None
        and not Path(sys.executable).with_name("accelerate").exists()
    ):
        missing("the accelerate CLI is not installed (the `cpu` extra)")
    spec = {
        "teacher": str(setup["teacher"]),
        "student": str(setup["student"]),
        "data": str(setup["data"]),
        "out": str(tmp_path),
        "config": {"max_steps": 3, "batch_size": 4, "lr": 1e-3},
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "distill.train",
            str(spec_path),
        ],
        capture_output=True,
        text=True,
        timeout=550,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["processes"] == 2
    assert log["global_batch"] == 4
    assert len(log["log"]) == 3
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_should_stop_rule() -> None:
    assert not should_stop([], patience=2)
    assert not should_stop([0.2, 0.3], patience=2)  # too few evaluations to judge
    assert not should_stop([0.2, 0.3, 0.4], patience=2)  # still rising
    assert should_stop([0.2, 0.5, 0.4, 0.5], patience=2)  # two without beating 0.5
    assert not should_stop([0.2, 0.5, 0.4, 0.6], patience=2)
    assert should_stop([0.2, 0.5, 0.52], patience=1, min_delta=0.05)  # too small a rise
    assert not should_stop([0.3, 1.0], patience=2)  # a first 1 on the slice is not settled
    assert should_stop([0.3, 1.0, 1.0, 1.0], patience=2)
    # at 1 nothing can rise: a second 1 in a row settles it, whatever the patience
    assert should_stop([0.3, 1.0, 1.0], patience=3)
    assert not should_stop([1.0, 0.9, 1.0], patience=3)
    assert not should_stop([0.1, 0.1, 0.1], patience=0)  # patience 0: never


def test_should_stop_waits_for_the_floor_and_for_a_first_agreement() -> None:
    """The extraction run's failure: agreement 0 at steps 5-20 stopped training at step 20
    and kept step 5's noise. A flat 0 is warm-up, not a plateau."""
    assert not should_stop([0.0, 0.0, 0.0, 0.0], patience=3)
    assert not should_stop([0.0, 0.0, 0.0, 0.0], patience=3, step=200, min_steps=30)
    assert should_stop([0.0, 0.2, 0.1, 0.2, 0.1], patience=3)  # learned, then flat
    # the floor: a 5-layer student answering one label for all (0.56) at step 25
    assert not should_stop([0.0, 0.56, 0.5, 0.5, 0.5], patience=3, step=25, min_steps=40)
    assert should_stop([0.0, 0.56, 0.5, 0.5, 0.5], patience=3, step=40, min_steps=40)
    assert not should_stop([0.5, 1.0, 1.0], patience=1, step=20, min_steps=30)  # even at 1
    assert should_stop([0.5, 1.0, 1.0], patience=1, step=30, min_steps=30)


def test_early_stop_keeps_the_best_weights(setup: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from distill.config import EarlyStopConfig

    def spec(out: Path, max_steps: int, patience: int) -> TrainSpec:
        es = EarlyStopConfig(
            every=2, examples=4, patience=patience, min_delta=1.0, min_steps=4, max_tokens=4
        )
        return TrainSpec(
            teacher=str(setup["teacher"]),
            student=str(setup["student"]),
            data=str(setup["data"]),
            out=str(out),
            config=TrainConfig(max_steps=max_steps, batch_size=2, lr=1e-3, early_stop=es),
            measure="open",
        )

    # Under the open measure (the teacher's likelihood of the student's answer, in (0, 1])
    # a random tiny student scores above 0, and with min_delta 1 no evaluation counts as a
    # rise: step 2 is under min_steps (4), so the second evaluation (step 4) stops training
    # (patience 1). The best is the higher of the two (step 4 on a tie: trained more).
    stopped = train_kd(spec(tmp_path / "a", 10, 1), progress=False)
    es = stopped.early_stop
    assert es is not None
    assert [s for s, _ in es.history] == [2, 4]
    assert all(a > 0.0 for _, a in es.history)
    (_, a2), (_, a4) = es.history
    best = 4 if a4 >= a2 else 2
    assert (es.stopped_at, es.best_step, stopped.steps) == (4, best, 4)
    assert es.examples == 4
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert len(log["log"]) == 4
    # The saved student is the best step's: the same as a run that ended there by max_steps.
    again = train_kd(spec(tmp_path / "b", best, 5), progress=False)
    assert again.early_stop is not None
    assert again.early_stop.stopped_at is None
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(x: object, y: object) -> bool:
    import torch

    assert isinstance(x, torch.Tensor)
    assert isinstance(y, torch.Tensor)
    return bool(torch.equal(x, y))


def test_the_completion_span_gives_the_full_sequence_loss(setup: dict[str, Path]) -> None:
    """Both models' LM heads run only over the completion span (``logits_to_keep``): the
    losses and the student's gradients equal those over every position, masked."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapters.data import IGNORE_INDEX
    from distill.losses import distill_loss
    from distill.train import _collate, _completion_span

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(setup["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(setup["teacher"], dtype=torch.float32)
    ign = IGNORE_INDEX
    batch = [  # prompts of different lengths, right padding, completions at different spots
        ([5, 6, 7, 8, 9, 10, 11], [ign, ign, ign, ign, 9, 10, 11]),
        ([5, 6, 7, 8, 9, 10, 12, 13, 14], [ign] * 6 + [12, 13, 14]),
        ([5, 6, 9, 10], [ign, ign, 9, 10]),
    ]
    b = _collate(batch, 0)
    keep = _completion_span(b["labels"])
    assert keep.tolist() == [1, 2, 3, 4, 5, 6, 7]

    def loss(span: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        student.zero_grad()
        extra = {} if span is None else {"logits_to_keep": span}
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **extra)
        with torch.no_grad():
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **extra)
        targets = b["labels"][:, 1:]
        s_logits, t_logits = s.logits, t.logits
        if span is None:
            s_logits, t_logits = s_logits[:, :-1], t_logits[:, :-1]
        else:
            targets = targets[:, span]
        total, _, _ = distill_loss(s_logits, t_logits, targets.clamp_min(0), targets != ign)
        total.backward()
        return total.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]

    full, g_full = loss(None)
    part, g_part = loss(keep)
    assert torch.allclose(full, part, atol=1e-6)
    assert len(g_full) == len(g_part)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_part, strict=True))


def test_the_teacher_cache_skips_forwards_and_changes_no_loss(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """Past the first epoch every batch takes the teacher's logits from the cache; the
    losses step by step are those of a run that recomputes them."""
    results, logs = {}, {}
    for mb in (2048, 0):
        spec = TrainSpec(
            teacher=str(setup["teacher"]),
            student=str(setup["student"]),
            data=str(setup["data"]),
            out=str(tmp_path / str(mb)),
            config=TrainConfig(max_steps=20, batch_size=4, lr=3e-3, teacher_cache_mb=mb),
        )
        results[mb] = train_kd(spec, progress=False)
        logs[mb] = json.loads((tmp_path / str(mb) / "train_log.json").read_text())["log"]
    on, off = results[2048], results[0]
    assert (off.teacher_forwards, off.teacher_cached) == (20, 0)
    per_epoch = -(-on.examples // 4)
    assert on.teacher_forwards + on.teacher_cached == 20
    assert on.teacher_cached >= 20 - per_epoch - 1 > 0
    for a, b in zip(logs[2048], logs[0], strict=True):
        assert abs(a["kd"] - b["kd"]) <= 1e-4 * max(1.0, abs(b["kd"]))
        assert abs(a["ce"] - b["ce"]) <= 1e-4 * max(1.0, abs(b["ce"]))


def test_batched_greedy_gives_the_one_at_a_time_answers(setup: dict[str, Path]) -> None:
    """The early stop scores its slice in one left-padded batch: the same tokens as the
    export's one-prompt-at-a-time greedy, for prompts of different lengths."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.export import greedy_ids

    model = AutoModelForCausalLM.from_pretrained(setup["teacher"], dtype=torch.float32).eval()
    prompts = [[5, 9, 23, 41], [7], [11, 3, 3, 8, 2, 19, 30, 4, 1], [2, 2]]
    alone = greedy_ids(model, prompts, 12)
    batched = greedy_ids(model, prompts, 12, batch_size=len(prompts))
    assert batched == alone
    assert [len(a) for a in alone] != [0, 0, 0, 0]
