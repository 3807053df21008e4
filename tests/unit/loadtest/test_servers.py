"""``loadtest.servers.start_gateway``: the one way tests and benchmarks start a gateway
process and wait for it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import psutil
import pytest

from loadtest.servers import FAKE_MODEL, ServerError, fake_gateway_config, start_gateway

if TYPE_CHECKING:
    from pathlib import Path


def test_start_gateway_is_ready_isolated_and_stopped_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller's RETORT_* variables do not reach it: this one would refuse to start.
    monkeypatch.setenv("RETORT_ENGINE__KIND", "nope")
    gw = start_gateway(tmp_path, "ok", fake_gateway_config({}))
    try:
        assert httpx.get(gw.url + "/ready").status_code == 200
        assert gw.model == FAKE_MODEL
        assert gw.home == tmp_path / "ok" / "home"
        assert (tmp_path / "ok" / "retort.yaml").is_file()
    finally:
        assert gw.stop() is not None
    # A gateway that exits before it is ready: the error carries its log, nothing is left.
    with pytest.raises(ServerError, match="exited") as err:
        start_gateway(tmp_path, "bad", {"engine": {"kind": "nope"}})
    assert "engine" in str(err.value)
    assert not any(
        "bad/retort.yaml" in " ".join(p.info["cmdline"] or ())
        for p in psutil.process_iter(["cmdline"])
    )
