"""Prompts (a JSONL file or a synthetic set), the adapter mix, and request bodies."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "PROBE_PROMPT",
    "AdapterMix",
    "Endpoint",
    "Prompt",
    "build_body",
    "load_prompts",
    "parse_adapter_mix",
    "synthetic_prompts",
]

Endpoint = Literal["chat", "completions"]
Messages = list[dict[str, str]]

# The cross-talk probe: one fixed greedy prompt sent several times within a level.
PROBE_PROMPT = "Count from one to twenty in English words, separated by commas."

_TOPICS = (
    "how a refrigerator keeps food cold",
    "why the sky is blue",
    "the water cycle",
    "how vaccines train the immune system",
    "the history of the printing press",
    "how a bicycle stays upright",
    "what a compiler does",
    "how bees make honey",
    "the causes of ocean tides",
    "how a bill becomes a law",
    "why leaves change colour in autumn",
    "how GPS finds your position",
)
_FORMS = (
    "Explain {t} to a curious ten-year-old.",
    "Write a detailed paragraph about {t}.",
    "Give a step-by-step explanation of {t}.",
    "Write a short essay on {t}, with an introduction and a conclusion.",
)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt: either plain text or a list of chat messages."""

    text: str | None = None
    messages: Messages | None = None

    def as_messages(self) -> Messages:
        return self.messages or [{"role": "user", "content": self.text or ""}]

    def as_text(self) -> str:
        if self.text is not None:
            return self.text
        return "\n".join(m.get("content", "") for m in self.messages or [])


def synthetic_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """``n`` distinct open-ended prompts whose answers run past a few hundred tokens."""
    rng = random.Random(seed)
    combos = [f.format(t=t) for t in _TOPICS for f in _FORMS]
    rng.shuffle(combos)
    return [Prompt(text=combos[i % len(combos)]) for i in range(n)]


def load_prompts(source: str | Path, n: int, seed: int = 0) -> list[Prompt]:
    """``n`` prompts from ``synthetic`` or a JSONL file of ``{"prompt"}``/``{"messages"}`` lines.

    A file with fewer lines is cycled.
    """
    if str(source) == "synthetic":
        return synthetic_prompts(n, seed)
    prompts: list[Prompt] = []
    with open(source, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row.get("messages"), list):
                prompts.append(Prompt(messages=row["messages"]))
            elif isinstance(row.get("prompt"), str):
                prompts.append(Prompt(text=row["prompt"]))
            else:
                raise ValueError(f"{source}:{lineno}: needs a 'prompt' string or 'messages' list")
    if not prompts:
        raise ValueError(f"{source}: no prompts")
    return [prompts[i % len(prompts)] for i in range(n)]


@dataclass(frozen=True, slots=True)
class AdapterMix:
    """Model names with weights; :meth:`pick` draws one per request."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def pick(self, rng: random.Random) -> str:
        return rng.choices(self.names, weights=self.weights)[0]


def parse_adapter_mix(spec: str) -> AdapterMix:
    """Parse ``a:0.5,b:0.5`` (a bare name weighs 1). Weights need not sum to 1."""
    names: list[str] = []
    weights: list[float] = []
    for part in spec.split(","):
        item = part.strip()
        if not item:
            continue
        name, sep, weight = item.rpartition(":")
        if not sep:
            name, weight = item, "1"
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"bad weight in adapter mix entry {item!r}") from None
        if not name or w < 0:
            raise ValueError(f"bad adapter mix entry {item!r}")
        names.append(name)
        weights.append(w)
    if not names or sum(weights) <= 0:
        raise ValueError(f"adapter mix {spec!r} has no positive weight")
    return AdapterMix(tuple(names), tuple(weights))


def build_body(
    endpoint: Endpoint,
    model: str,
    prompt: Prompt,
    *,
    max_tokens: int,
    temperature: float,
    stream: bool,
    ignore_eos: bool = False,
) -> dict[str, Any]:
    """The JSON body of one request; streams ask for usage in the last chunk.

    ``ignore_eos`` asks for exactly ``max_tokens`` (vLLM's ``ignore_eos`` and
    ``min_tokens``, which Retort accepts on every engine), so that servers are compared
    at equal answer lengths."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
    }
    if ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = max_tokens
    if endpoint == "chat":
        body["messages"] = prompt.as_messages()
    else:
        body["prompt"] = prompt.as_text()
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body
