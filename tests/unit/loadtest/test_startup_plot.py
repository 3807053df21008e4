"""The start-up benchmark's chart (loadtest.plots.plot_starts)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

from loadtest.plots import plot_starts

if TYPE_CHECKING:
    from pathlib import Path


def test_the_chart_has_a_row_per_variant(tmp_path: Path) -> None:
    results = [
        {"variant": "lora-on", "ready_s": 180.0, "prestarted": False, "start": "cold"},
        {"variant": "lora-on", "ready_s": 15.1, "prestarted": True, "start": "warm"},
        {"variant": "lora-on", "ready_s": 22.0, "prestarted": False, "start": "warm"},
        {"variant": "lora-on-kv-start", "ready_s": 20.6, "prestarted": True, "start": "warm"},
    ]
    out = plot_starts(results, tmp_path / "startup.png")
    assert out == tmp_path / "startup.png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 600
    one = plot_starts(results[:3], tmp_path / "one.png")
    with Image.open(one) as image:
        assert image.size[1] < height  # one row fewer
