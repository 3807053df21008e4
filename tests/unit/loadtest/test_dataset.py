from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loadtest.dataset import Prompt, build_body, load_prompts, parse_adapter_mix


def test_adapter_mix_parsing() -> None:
    mix = parse_adapter_mix("a:0.5, b:0.25,c")
    assert mix.names == ("a", "b", "c")
    assert mix.weights == (0.5, 0.25, 1.0)
    # The weight follows the last colon, so names may hold colons themselves.
    assert parse_adapter_mix("org/model:v1:2").names == ("org/model:v1",)


@pytest.mark.parametrize("spec", ["", "a:x", "a:-1", "a:0,b:0", ":1"])
def test_adapter_mix_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_adapter_mix(spec)


def test_adapter_mix_picks_follow_the_weights() -> None:
    mix = parse_adapter_mix("a:3,b:1")
    rng = random.Random(0)
    picks = [mix.pick(rng) for _ in range(4000)]
    assert picks.count("a") / len(picks) == pytest.approx(0.75, abs=0.03)


def test_load_prompts_from_jsonl_cycles(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "hello"}, {"messages": [{"role": "user", "content": "hi"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_prompts(path, 5)
    assert [p.text for p in prompts] == ["hello", None, "hello", None, "hello"]
    assert prompts[1].as_messages() == [{"role": "user", "content": "hi"}]
    assert prompts[1].as_text() == "hi"
    path.write_text('{"text": "no"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1"):
        load_prompts(path, 1)


def test_synthetic_prompts_are_deterministic_and_distinct() -> None:
    a = load_prompts("synthetic", 40, seed=1)
    assert a == load_prompts("synthetic", 40, seed=1)
    assert len({p.text for p in a}) == 40


def test_build_body() -> None:
    chat = build_body("chat", "m", Prompt(text="hi"), max_tokens=5, temperature=0.0, stream=True)
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert chat["stream_options"] == {"include_usage": True}
    comp = build_body(
        "completions", "m", Prompt(text="hi"), max_tokens=5, temperature=0.0, stream=False
    )
    assert comp["prompt"] == "hi"
    assert "stream_options" not in comp
    assert comp["max_tokens"] == 5
