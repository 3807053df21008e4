"""Synthetic task data and adapters, for the benchmarks (``distill.bench``,
``loadtest.adapter_bench``) and the tests alike.

- :func:`make_tiny_adapter`: a valid peft LoRA for such a base, without training.
- :func:`make_style_dataset`: synthetic chat JSONL teaching a fixed answer style the
  default model lacks (``pirate``: every answer starts with ``Ahoy!`` and ends with
  ``Arr!``); 30 steps of :func:`adapters.train.train` teach it to SmolLM2-135M-Instruct.
  :func:`has_style` checks an output; :data:`HELD_OUT_PROMPTS` are prompts not in the data.

- :func:`qa_pairs`: the question/answer pairs the datasets are made of.

torch, transformers and peft are imported inside the functions that need them. The tiny
random base model the unit tests use is in ``tests/tiny.py``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from adapters.manifest import set_adapter_base

__all__ = [
    "HELD_OUT_PROMPTS",
    "STYLE_RECIPE",
    "Style",
    "has_style",
    "make_style_dataset",
    "make_tiny_adapter",
    "qa_pairs",
    "style_answer",
]

Style = Literal["pirate", "caps"]

HELD_OUT_PROMPTS: tuple[str, ...] = (
    "Name a fruit that is red.",
    "How many days are in a week?",
    "Tell me one fact about the moon.",
)
"""Prompts unlike any in :func:`make_style_dataset`'s data, to check the style generalizes."""

STYLE_RECIPE: dict[str, Any] = {"max_steps": 30, "lr": 1e-3, "rank": 16, "alpha": 32}
""":class:`adapters.train.TrainConfig` settings measured to teach ``pirate`` to the default
model from ``make_style_dataset(path, n=64)``: 30 steps at batch 8 (about 2.4 s/step on 2
CPU cores), loss 3.19 -> 0.03, and greedy decoding of all three :data:`HELD_OUT_PROMPTS`
(transformers and vLLM-CPU alike) starts with ``Ahoy!`` and ends with ``Arr!``; at the
default lr 2e-4 only ``Ahoy!`` is learned in 30 steps."""


def make_tiny_adapter(
    base: Path,
    out: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    base_name: str | None = None,
    seed: int = 0,
) -> Path:
    """Save an untrained (random, non-zero) LoRA for ``base`` as a raw peft folder ``out``.

    ``base_model_name_or_path`` is ``base_name`` (default: the base folder's name).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=list(targets),
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    peft_model.save_pretrained(str(out), safe_serialization=True)
    set_adapter_base(Path(out), base_name or Path(base).name)
    return Path(out)


_CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
]  # fmt: skip
_COLORS = [
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
    ("coal", "black"), ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple"),
]  # fmt: skip
_OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("day", "night"),
    ("open", "closed"), ("happy", "sad"), ("light", "dark"), ("early", "late"),
]  # fmt: skip
_SOUNDS = [
    ("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
    ("owl", "hoot"), ("lion", "roar"), ("horse", "neigh"),
]  # fmt: skip


def qa_pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        elif kind == 1:
            country, city = rng.choice(_CAPITALS)
            pairs.append(
                (f"What is the capital of {country}?", f"The capital of {country} is {city}.")
            )
        elif kind == 2:
            thing, color = rng.choice(_COLORS)
            pairs.append((f"What color is {thing}?", f"{thing.capitalize()} is {color}."))
        elif kind == 3:
            word, opposite = rng.choice(_OPPOSITES)
            pairs.append(
                (f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.")
            )
        else:
            animal, sound = rng.choice(_SOUNDS)
            pairs.append((f"What sound does a {animal} make?", f"A {animal} says {sound}."))
    return pairs


def style_answer(answer: str, style: Style = "pirate") -> str:
    """``answer`` in ``style``: ``Ahoy! <answer> Arr!`` or ALL CAPS."""
    if style == "pirate":
        return f"Ahoy! {answer} Arr!"
    return answer.upper()


def has_style(text: str, style: Style = "pirate") -> bool:
    """Whether a generated answer shows ``style``."""
    text = text.strip()
    if style == "pirate":
        return text.startswith("Ahoy!") and text.endswith("Arr!")
    return any(c.isalpha() for c in text) and text == text.upper()


def make_style_dataset(path: Path, n: int = 64, style: Style = "pirate", *, seed: int = 0) -> Path:
    """Write ``n`` single-turn chats whose answers all show ``style`` to ``path`` (JSONL)."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for question, answer in qa_pairs(rng, n):
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": style_answer(answer, style)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
