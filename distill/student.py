"""Stage 3, student init: a smaller model sharing the teacher's tokenizer.

By default the student is the teacher with only some of its layers: ``layers`` of them,
evenly spaced, the first and last always included (e.g. 10 of SmolLM2's 30: every third).
Embeddings, final norm and head are copied. Then, when ``intermediate_size`` or
``hidden_size`` is set, the student is pruned in width (:mod:`distill.prune`), its channels
ranked on calibration examples: the teacher's answers to train prompts. Alternatively any
model folder is taken as given, once its vocabulary is checked against the teacher's.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.config import StudentConfig
from distill.results import StudentInit
from distill.stages import stage_done, write_stage

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "StudentInitError",
    "calibration_ids",
    "count_params",
    "init_student",
    "layer_indices",
    "student_stage",
]


class StudentInitError(ValueError):
    """The student cannot be built from this teacher or source."""


def layer_indices(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` evenly spaced layer indices of ``n_teacher``, first and last included."""
    if not 1 <= n_student <= n_teacher:
        raise StudentInitError(f"student layers must be in 1..{n_teacher} (got {n_student})")
    if n_student == 1:
        return [0]
    step = (n_teacher - 1) / (n_student - 1)
    return sorted({round(i * step) for i in range(n_student)})


def count_params(model_dir: Path) -> int:
    """Parameters in a safetensors model folder (tied weights counted once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= int(d)
                total += n
    return total


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
    ):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def init_student(
    teacher_dir: Path,
    out: Path,
    layers: int,
    *,
    intermediate_size: int | None = None,
    hidden_size: int | None = None,
    calibration: Sequence[Sequence[int]] = (),
) -> tuple[list[int], int]:
    """Write a ``layers``-layer student taken from ``teacher_dir`` to ``out``, pruned to
    ``intermediate_size`` / ``hidden_size`` (ranked on ``calibration`` token ids) when set."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(teacher_dir))
    n_teacher = int(config.num_hidden_layers)
    keep = layer_indices(n_teacher, layers)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    state = teacher.state_dict()
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.dtype = "float32"
    remapped: dict[str, Any] = {}
    prefix = "model.layers."
    for name, tensor in state.items():
        if name.startswith(prefix):
            idx, rest = name[len(prefix) :].split(".", 1)
            if int(idx) not in keep:
                continue
            name = f"{prefix}{keep.index(int(idx))}.{rest}"
        remapped[name] = tensor
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(remapped, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise StudentInitError(f"layer copy mismatch: missing {missing}, unexpected {unexpected}")
    if intermediate_size is not None or hidden_size is not None:
        from distill.prune import PruneError, prune_width

        try:
            prune_width(
                student,
                calibration,
                intermediate_size=intermediate_size,
                hidden_size=hidden_size,
            )
        except PruneError as exc:
            raise StudentInitError(str(exc)) from exc
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(str(tmp), safe_serialization=True)
    _copy_tokenizer(teacher_dir, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return keep, n_teacher


def _vocab(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def calibration_ids(
    teacher_dir: Path, examples: Sequence[dict[str, Any]], n: int, max_len: int = 256
) -> list[list[int]]:
    """Token ids of the first ``n`` examples (prompt and answer, as trained) for pruning."""
    from transformers import AutoTokenizer

    from distill.train import encode_example

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    return [encode_example(tokenizer, e, max_len)[0] for e in list(examples)[:n]]


def student_stage(
    teacher_dir: Path,
    run_dir: Path,
    config: StudentConfig,
    calibration: Sequence[dict[str, Any]] = (),
    calibration_fingerprint: str | None = None,
) -> StudentInit:
    """Build ``run_dir/student/init`` (or take ``config.source``); returns the stage result.
    ``calibration``: train examples that rank channels when the config prunes width."""
    stage = run_dir / "student"
    pruned = config.intermediate_size is not None or config.hidden_size is not None
    inputs = {
        "teacher": str(teacher_dir),
        "config": config,
        "calibration": calibration_fingerprint if pruned else None,
    }
    done = stage_done(stage, inputs, StudentInit)
    if done is not None:
        return done
    stage.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if config.source:
        src = Path(config.source).expanduser()
        if _vocab(src) != _vocab(teacher_dir):
            raise StudentInitError(
                f"{src} has vocabulary {_vocab(src)}, the teacher {_vocab(teacher_dir)}"
            )
        path, keep, n_teacher, source = src, None, None, str(src)
    else:
        path, source = stage / "init", None
        if pruned and not calibration:
            raise StudentInitError("width pruning needs calibration examples (the train split)")
        keep, n_teacher = init_student(
            teacher_dir,
            path,
            config.layers,
            intermediate_size=config.intermediate_size,
            hidden_size=config.hidden_size,
            calibration=calibration_ids(teacher_dir, calibration, config.calibration_examples)
            if pruned
            else (),
        )
    result = StudentInit(
        path=str(path),
        layers=keep,
        teacher_layers=n_teacher,
        source=source,
        intermediate_size=config.intermediate_size,
        hidden_size=config.hidden_size,
        student_params=count_params(path),
        teacher_params=count_params(teacher_dir),
        seconds=round(time.perf_counter() - t0, 2),
    )
    write_stage(stage, inputs, result)
    return result
