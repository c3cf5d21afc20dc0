"""Real server processes for tests (redis-server, Nginx): run one until the test ends and wait
until it accepts connections, or fail the test with the end of its log."""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio


def log_tail(log: Path) -> str:
    """The last 2,000 characters of ``log`` (none if it was not written)."""
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


async def start_listening(nursery: trio.Nursery, command: list[str], port: int, log: Path) -> trio.Process:
    """Run ``command`` in ``nursery`` and wait until it accepts connections on ``port`` of 127.0.0.1
    (10 s at most); if it exits first, fail the test with the end of its ``log``."""
    process: trio.Process = await nursery.start(partial(trio.run_process, command, check=False,
                                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
    with trio.fail_after(10):
        while True:
            if process.returncode is not None:
                pytest.fail(f"{command[0]} exited with {process.returncode}:\n{log_tail(log)}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return process
