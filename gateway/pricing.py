"""Request cost in US dollars: configured prices, or derived from an instance's hourly price.

Configured prices (``pricing.prices``) are per 1M prompt tokens and per 1M completion
tokens, keyed by adapter name, served model name or ``"*"`` (any). The adapter's price
beats the model's, and the model's beats ``"*"``.

Without a configured price and with ``instance_usd_per_hour`` set, the cost is derived from
the measured throughput: the :class:`Pricer` is fed every finished request
(:meth:`Pricer.observe`) and keeps an EWMA of the instance's aggregate tokens per second
*while busy* (tokens over the union of the requests' time spans, per window). A token then
costs ``usd_per_second / tokens_per_second``; idle time is not charged to requests.
``prompt_token_weight`` counts a prompt token as that fraction of a completion token
(prefill is cheaper than decode) in both the throughput and the cost.
"""

from __future__ import annotations

import time

import msgspec

__all__ = ["ModelPrice", "Pricer", "PricingSettings"]

ANY = "*"


class ModelPrice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prompt_per_1m: float = 0.0
    """US dollars per 1M prompt tokens."""
    completion_per_1m: float = 0.0
    """US dollars per 1M completion tokens."""


class PricingSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prices: dict[str, ModelPrice] = msgspec.field(default_factory=dict)
    """Prices keyed by adapter name, served model name or ``"*"``; adapter beats model
    beats ``"*"``."""
    instance_usd_per_hour: float | None = None
    """Derive the price of requests without a configured price from this hourly instance
    price and the measured throughput."""
    throughput_tokens_per_s: float | None = None
    """With ``instance_usd_per_hour``: a fixed throughput to use instead of measuring it
    (also the estimate until the first measurement window closes; without it, derived
    costs are 0 until then)."""
    prompt_token_weight: float = 1.0
    """A prompt token counts as this fraction of a completion token in derived costs."""
    window_s: float = 10.0
    """Throughput measurement window, in seconds."""
    ewma_alpha: float = 0.2
    """Weight of each new window in the throughput EWMA (0..1]."""


class Pricer:
    """``cost(model, adapter, prompt_tokens, completion_tokens) -> float`` (US dollars).

    Not thread-safe: call it from the event loop.
    """

    def __init__(self, settings: PricingSettings | None = None) -> None:
        self.settings = s = settings or PricingSettings()
        if not 0 < s.ewma_alpha <= 1:
            raise ValueError("pricing.ewma_alpha must be in (0, 1]")
        if s.window_s <= 0:
            raise ValueError("pricing.window_s must be positive")
        for name, price in s.prices.items():
            if price.prompt_per_1m < 0 or price.completion_per_1m < 0:
                raise ValueError(f"pricing.prices[{name!r}]: prices cannot be negative")
        self._prices = {
            name: (p.prompt_per_1m / 1e6, p.completion_per_1m / 1e6) for name, p in s.prices.items()
        }
        self._usd_per_s = (
            s.instance_usd_per_hour / 3600.0 if s.instance_usd_per_hour is not None else None
        )
        self._measured_tps: float | None = None
        self._window_start: float | None = None
        self._window_tokens = 0.0
        self._spans: list[tuple[float, float]] = []

    @property
    def tokens_per_second(self) -> float | None:
        """The throughput that derived costs use: configured, else measured (EWMA)."""
        if self.settings.throughput_tokens_per_s is not None:
            return self.settings.throughput_tokens_per_s
        return self._measured_tps

    @property
    def measured_tokens_per_second(self) -> float | None:
        return self._measured_tps

    def cost(
        self, model: str, adapter: str | None, prompt_tokens: int, completion_tokens: int
    ) -> float:
        """The request's cost in US dollars (0.0 when nothing prices it)."""
        price = None
        if adapter is not None:
            price = self._prices.get(adapter)
        if price is None:
            price = self._prices.get(model) or self._prices.get(ANY)
        if price is not None:
            return prompt_tokens * price[0] + completion_tokens * price[1]
        if self._usd_per_s is None:
            return 0.0
        tps = self.tokens_per_second
        if not tps:
            return 0.0
        weighted = prompt_tokens * self.settings.prompt_token_weight + completion_tokens
        return weighted * self._usd_per_s / tps

    def observe(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        latency_s: float,
        now: float | None = None,
    ) -> None:
        """Feed one finished request (its tokens and wall time) to the throughput measure.

        A no-op unless costs are derived and no fixed throughput is configured.
        """
        s = self.settings
        if self._usd_per_s is None or s.throughput_tokens_per_s is not None:
            return
        end = time.monotonic() if now is None else now
        start = end - max(latency_s, 0.0)
        if self._window_start is None:
            self._window_start = start
        elif end - self._window_start >= s.window_s:
            self._close_window()
            self._window_start = start
        self._window_tokens += prompt_tokens * s.prompt_token_weight + completion_tokens
        self._spans.append((start, end))

    def _close_window(self) -> None:
        busy = _union_length(self._spans)
        if busy > 0 and self._window_tokens > 0:
            tps = self._window_tokens / busy
            a = self.settings.ewma_alpha
            prev = self._measured_tps
            self._measured_tps = tps if prev is None else a * tps + (1 - a) * prev
        self._spans.clear()
        self._window_tokens = 0.0


def _union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps counted once)."""
    total = 0.0
    cur_start = cur_end = None
    for start, end in sorted(spans):
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        elif end > cur_end:
            cur_end = end
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total
