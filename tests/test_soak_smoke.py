"""bench/soak.py in miniature: ten seconds of steady load on the tiny checkpoint, and a server that fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.commands import run_module
from tests.fixtures.servers import ControlledBackend, ThreadedServer, make_settings

pytestmark = pytest.mark.slow  # the soak benchmark, run for a while


def test_a_short_soak_reports_windows_memory_and_no_errors(tiny_reward_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "soak.json"
    result = run_module(
        "bench.soak",
        "--model",
        tiny_reward_checkpoint,
        "--duration-s",
        "10",
        "--window-s",
        "2",
        "--rate",
        "20",
        "--clients",
        "4",
        "--rss-every-s",
        "1",
        "--json-out",
        out,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["failures"] == []
    totals = report["totals"]
    assert totals["requests"] >= 100 and set(totals["by_status"]) == {"200"}
    assert totals["server_errors"] == totals["no_answer"] == totals["malformed_200"] == 0
    assert report["server_counted"] == {"200": totals["requests"]}  # the server saw exactly what the clients sent
    assert report["server"]["managed"] and report["server"]["exit_code"] == 0
    assert len(report["windows"]) == 5 and all(w["requests"] > 0 for w in report["windows"])
    assert totals["items"] > totals["requests"]  # the mix holds 16-text requests
    drift = report["drift"]
    assert drift["rss_max_mib"] > 50 and drift["rss_growth_mib"] is not None
    assert all(x is not None for x in drift["latency_p99_ms"])
    assert "result: OK" in result.stdout and "drift (window 0 -> 4)" in result.stdout


class AlwaysFailing(ControlledBackend):
    def forward(self, batch):
        raise RuntimeError("injected fault")


def test_a_soak_against_a_failing_server_exits_non_zero(tiny_reward_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "soak.json"
    with ThreadedServer(make_settings(tiny_reward_checkpoint), AlwaysFailing(tiny_reward_checkpoint)) as server:
        result = run_module(
            "bench.soak",
            "--url",
            server.url,
            "--duration-s",
            "2",
            "--window-s",
            "1",
            "--rate",
            "10",
            "--json-out",
            out,
            timeout=120,
        )
    assert result.returncode == 1, result.stdout[-3000:]
    report = json.loads(out.read_text())
    assert not report["ok"] and report["totals"]["server_errors"] == report["totals"]["requests"] > 0
    assert any("5xx" in f for f in report["failures"])
    assert "FAILED" in result.stdout
