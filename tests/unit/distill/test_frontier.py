"""The frontier runner's recipes and chart (the runs themselves are a benchmark)."""

from __future__ import annotations

import re
from pathlib import Path

from distill.bench import DEFAULT_CONFIG
from distill.config import load_config
from distill.frontier import RECIPES, chart


def test_recipe_names_say_what_the_recipe_does() -> None:
    for name, recipe in RECIPES.items():
        cfg = load_config(DEFAULT_CONFIG, {k: dict(v) for k, v in recipe.items()})
        m = re.fullmatch(r"L(\d+)(?:-I(\d+))?(?:-H(\d+))?-(int4|int8|fp32)(?:-long)?", name)
        assert m, name
        layers, inter, hidden, precision = m.groups()
        assert cfg.student.layers == int(layers)
        assert cfg.student.intermediate_size == (int(inter) if inter else None)
        assert cfg.student.hidden_size == (int(hidden) if hidden else None)
        assert cfg.export.precision == precision


def test_chart_is_written(tmp_path: Path) -> None:
    points = [
        {"name": "a", "param_ratio": 0.3, "agreement": 0.99, "precision": "int4"},
        {"name": "b", "param_ratio": 0.47, "agreement": 1.0, "precision": "int8"},
        {"name": "failed", "param_ratio": None, "agreement": None, "precision": "int4"},
    ]
    chart(tmp_path / "f.png", points, target=(0.35, 0.98))
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
