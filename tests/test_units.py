"""The systemd units in systemd/: valid for systemd itself, and hardened.

``systemd-analyze`` checks units without a running systemd. ``verify`` exits 0 even for unknown
keys, so its stderr must be empty. The install paths (/opt/...) do not exist here, so ExecStart is
pointed at this venv's executables first.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
BIN = Path(sys.executable).parent


@pytest.fixture
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is needed to check the units (Debian package: systemd)")
    return path


@pytest.fixture
def units(tmp_path: Path) -> Path:
    for unit in ("trioai.service", "trioai.socket", "vllm.service"):
        text = (UNITS / unit).read_text()
        text = text.replace("/opt/trioai/venv/bin/trioai", str(BIN / "trioai"))
        text = text.replace("/opt/vllm/venv/bin/python", sys.executable)
        (tmp_path / unit).write_text(text)
    return tmp_path


def test_units_verify_without_warnings(analyze: str, units: Path) -> None:
    result = subprocess.run(
        [analyze, "verify", "trioai.service", "trioai.socket", "vllm.service"],
        cwd=units, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def exposure(analyze: str, unit: Path) -> float:
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True, check=False
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert m, result.stdout + result.stderr
    return float(m.group(1))


def test_trioai_service_exposure_is_2_or_better(analyze: str, units: Path) -> None:
    assert exposure(analyze, units / "trioai.service") <= 2.0


def test_trioai_service_is_notify_with_watchdog_and_socket() -> None:
    text = (UNITS / "trioai.service").read_text()
    for line in ("Type=notify", "WatchdogSec=30", "Requires=trioai.socket", "DynamicUser=yes",
                 "NoNewPrivileges=yes", "SystemCallFilter=@system-service", "CapabilityBoundingSet=",
                 "MemoryMax=2G", "Restart=on-failure"):
        assert re.search(rf"^{re.escape(line)}$", text, re.MULTILINE), line
    # Stop timeout leaves room for the 30 s drain.
    assert int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.MULTILINE).group(1)) > 30  # type: ignore[union-attr]
