from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import RunningServer, serve


@pytest.fixture(scope="session")
def tiny_server(tiny_long_model_dir: Path) -> Iterator[RunningServer]:
    """A real server process on the tiny random model (4096-token context), with short heartbeats and a small
    frame limit."""
    with serve(
        "--model",
        str(tiny_long_model_dir),
        "--device",
        "cpu",
        "--heartbeat-interval",
        "1",
        "--max-message-bytes",
        "65536",
        "--max-generations-per-connection",
        "8",
        "--sse-keepalive-interval",
        "0.05",
        "--max-prefill-tokens",
        "32",
    ) as server:
        yield server
