"""`templar soak`, short: the long benchmark's machinery (windows, memory and descriptor slopes, plot) on a real
embedded server. The 10-minute run and its figures are in docs/reliability.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # starts Triton


def test_a_short_soak_reports_windows_slopes_and_a_plot(small_repo, tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, "-m", "templar.cli", "soak", "--model", "rm_small", "--repo",
                             str(small_repo), "--duration", "12", "--window", "4", "--concurrency", "4",
                             "--batch", "8", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    windows, summary = report["windows"], report["summary"]
    assert len(windows) >= 3 and all(w["requests"] > 0 and w["errors"] == {} for w in windows)
    assert all(w["rss_mib"] > 100 and w["open_fds"] > 10 for w in windows)  # tritonserver and its stubs
    assert all(0 < w["p50_ms"] <= w["p99_ms"] for w in windows)
    assert summary["errors"] == 0 and summary["requests"] == sum(w["requests"] for w in windows)
    assert isinstance(summary["rss_mib_per_minute"], float) and isinstance(summary["open_fds_per_minute"], float)
    assert out.with_suffix(".png").stat().st_size > 10_000
