"""The teacher timed through a running gateway (``eval.teacher_url``): no engine started
for it. A real gateway process with the fake engine stands in for production's."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import EvalConfig
from distill.evaluate import teacher_speed
from loadtest.servers import free_port, gateway_spec, running

pytestmark = pytest.mark.timeout(120)


def test_teacher_speed_through_the_gateway(tmp_path: Path) -> None:
    config = tmp_path / "fake.yaml"
    config.write_text("engine: {kind: fake}\nmodel: {served_name: fake-model}\n")
    examples = [
        {"messages": [{"role": "user", "content": "What is 2 plus 2?"}], "prompt": ""},
        {"messages": [], "prompt": "Once upon a time"},
    ]
    with running([gateway_spec("gw", config, free_port())], tmp_path / "logs", 60) as (gw,):
        cfg = EvalConfig(teacher_url=gw.url, max_tokens=8)
        speed = teacher_speed(tmp_path / "unused", examples, cfg, served_model="fake-model")
        assert speed is not None
        assert speed.engine == "gateway"
        assert speed.source == gw.url
        assert speed.tokens_per_s > 0
        assert speed.latency_p50_s is not None
        assert speed.startup_seconds is None  # nothing was started for it
        with pytest.raises(ValueError, match="404"):
            teacher_speed(tmp_path / "unused", examples, cfg, served_model="nope")
