from __future__ import annotations

import msgspec
import pytest

from gateway.pricing import ModelPrice, Pricer, PricingSettings
from tests.unit.gateway.promptlog.docs import undocumented_fields


def test_configured_prices_adapter_beats_model_beats_any() -> None:
    p = Pricer(
        PricingSettings(
            prices={
                "base": ModelPrice(prompt_per_1m=1.0, completion_per_1m=2.0),
                "sql": ModelPrice(prompt_per_1m=10.0, completion_per_1m=20.0),
                "*": ModelPrice(prompt_per_1m=0.5, completion_per_1m=0.5),
            }
        )
    )
    assert p.cost("base", None, 1_000_000, 500_000) == pytest.approx(2.0)
    assert p.cost("base", "sql", 1000, 1000) == pytest.approx(0.03)
    assert p.cost("base", "unknown-adapter", 1000, 0) == pytest.approx(0.001)
    assert p.cost("student-1", None, 2_000_000, 0) == pytest.approx(1.0)
    assert Pricer().cost("base", None, 100, 100) == 0.0


def test_derived_from_a_fixed_throughput() -> None:
    # $3.60/h = $0.001/s; 1000 tokens/s -> $1e-6 per token.
    p = Pricer(PricingSettings(instance_usd_per_hour=3.6, throughput_tokens_per_s=1000.0))
    assert p.cost("base", None, 300, 700) == pytest.approx(1e-3)
    weighted = Pricer(
        PricingSettings(
            instance_usd_per_hour=3.6, throughput_tokens_per_s=1000.0, prompt_token_weight=0.5
        )
    )
    assert weighted.cost("base", None, 400, 800) == pytest.approx(1e-6 * 1000)


def test_derived_from_measured_throughput() -> None:
    p = Pricer(PricingSettings(instance_usd_per_hour=3.6, window_s=10.0, ewma_alpha=0.5))
    assert p.cost("base", None, 10, 10) == 0.0  # nothing measured yet
    # Window 1: two overlapping 2-second requests (busy 3 s) with 600 tokens -> 200 tok/s.
    p.observe(100, 200, latency_s=2.0, now=2.0)
    p.observe(100, 200, latency_s=2.0, now=3.0)
    p.observe(0, 0, latency_s=0.0, now=20.0)  # closes the window; idle time is not counted
    assert p.measured_tokens_per_second == pytest.approx(200.0)
    assert p.cost("base", None, 100, 100) == pytest.approx(200 * 0.001 / 200.0)
    # Window 2 at 400 tok/s: the EWMA moves half-way.
    p.observe(0, 400, latency_s=1.0, now=21.0)
    p.observe(0, 0, latency_s=0.0, now=40.0)
    assert p.measured_tokens_per_second == pytest.approx(300.0)
    # Configured prices still win.
    priced = Pricer(
        PricingSettings(instance_usd_per_hour=3.6, prices={"base": ModelPrice(prompt_per_1m=1)})
    )
    assert priced.cost("base", None, 1_000_000, 0) == pytest.approx(1.0)


def test_settings_validation() -> None:
    s = msgspec.convert(
        {"prices": {"base": {"prompt_per_1m": 0.1, "completion_per_1m": 0.4}}}, PricingSettings
    )
    assert s.prices["base"].completion_per_1m == 0.4
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"prices": {"base": {"prompt": 1}}}, PricingSettings)
    with pytest.raises(ValueError, match="negative"):
        Pricer(PricingSettings(prices={"x": ModelPrice(prompt_per_1m=-1)}))
    with pytest.raises(ValueError, match="ewma_alpha"):
        Pricer(PricingSettings(ewma_alpha=0))
    assert undocumented_fields(PricingSettings) == []
    assert undocumented_fields(ModelPrice) == []
