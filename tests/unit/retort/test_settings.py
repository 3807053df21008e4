"""The shared settings view reads the gateway's config exactly as the gateway does."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gateway.settings import Settings, load_settings
from retort.settings import (
    SettingsError,
    SharedSettings,
    default_url,
    load_shared,
    spool_dir,
)


def test_the_view_knows_every_section_of_the_gateway() -> None:
    sections = {f.name for f in msgspec.structs.fields(Settings)}
    view = {f.name for f in msgspec.structs.fields(SharedSettings)}
    assert view == sections, "a new gateway section needs its name in SharedSettings"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "home: /srv/r\nmodel: {path: /m, served_name: m}\nengine: {max_lora_rank: 64}\n"
        "adapters: {dir: /a, max_loaded: 2}\nstudents: {dir: /s}\n"
        "promptlog: {url: 'sqlite+aiosqlite:////x.db', spool: disk, spool_dir: /sp}\n"
        "server: {port: 9000}\n",
    ],
)
def test_both_read_the_shared_fields_alike(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "retort.yaml"
    cfg.write_text(text)
    env = {"RETORT_HOME": str(tmp_path / "home")} if not text else {}
    full, view = load_settings(cfg, environ=env), load_shared(cfg, environ=env)
    assert view.home_path == full.home_path
    assert view.model == full.model
    assert view.engine.max_lora_rank == full.engine.max_lora_rank
    assert view.adapters_path == full.adapters_path
    assert view.students_path == full.students_path
    assert view.promptlog_url == (full.promptlog.url or default_url(full.home_path))
    assert view.promptlog.spool == full.promptlog.spool
    assert view.promptlog_spool_path == spool_dir(full.promptlog.spool_dir, full.home_path)


def test_an_unknown_section_is_an_error_on_both_sides(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("nope: 1\n")
    with pytest.raises(SettingsError):
        load_settings(cfg, environ={})
    with pytest.raises(SettingsError):
        load_shared(cfg, environ={})
