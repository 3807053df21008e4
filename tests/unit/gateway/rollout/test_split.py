"""What requests see of a rollout: the live split (``students.traffic`` stays the manual
override) and the shadow target (a live rollout's student before ``shadow.teachers``)."""

from __future__ import annotations

import random
from pathlib import Path

from gateway.engines.fake import FakeEngine
from gateway.shadow import ShadowRunner, ShadowSettings, ShadowTarget
from gateway.studentpool import StudentPool, StudentsSettings, TrafficSplit
from gateway.students import StudentRegistry


def pool(tmp_path: Path, **traffic: TrafficSplit) -> StudentPool:
    p = StudentPool(
        StudentRegistry(tmp_path), StudentsSettings(traffic=traffic), rng=random.Random(0)
    )
    for name in ("s", "s2"):
        p._engines[name] = FakeEngine(name, 64)
    return p


def test_the_rollout_split_applies_and_students_traffic_overrides_it(tmp_path: Path) -> None:
    live = {"t": ("s", 1.0), "half": ("s", 0.5), "off": ("s", 0.0), "gone": ("nobody", 1.0)}
    p = pool(tmp_path)
    assert p.split_for("t") is None  # no rollout service yet
    p.live_split = live.get
    engine = p.split_for("t")
    assert engine is not None
    assert engine.model_name == "s"
    assert p.split_for("off") is None
    assert p.split_for("gone") is None  # a student that is not loaded: the teacher answers
    assert p.split_for("unknown") is None
    picks = [p.split_for("half") is not None for _ in range(400)]
    assert 150 < sum(picks) < 250
    # students.traffic for the same teacher wins, even at share 0.
    pinned = pool(tmp_path, t=TrafficSplit(student="s2", share=0.0))
    pinned.live_split = live.get
    assert pinned.split_for("t") is None
    pinned = pool(tmp_path, t=TrafficSplit(student="s2", share=1.0))
    pinned.live_split = live.get
    engine = pinned.split_for("t")
    assert engine is not None
    assert engine.model_name == "s2"


def test_a_live_rollouts_student_is_shadowed_before_the_static_one(tmp_path: Path) -> None:
    static = ShadowTarget(student="static", share=0.5)
    runner = ShadowRunner(
        ShadowSettings(teachers={"t": static, "u": static}),
        pool(tmp_path),
        store=None,  # type: ignore[arg-type]  # never reached: nothing is submitted
    )
    assert runner.target_for("t") is static
    live = ShadowTarget(student="s", share=1.0)
    runner.dynamic = {"t": live}.get
    assert runner.target_for("t") is live
    assert runner.target_for("u") is static
    assert runner.target_for("v") is None
