"""Headless Chromium (Debian's package) driven by Playwright; screenshots go to test-output/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TOKENWIRE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]
OUTPUT = Path(__file__).resolve().parents[2] / "test-output"


def require_chromium() -> str:
    """The browser's path; skips the test where none is installed, unless TOKENWIRE_REQUIRE_BROWSER is set (CI)."""
    if Path(CHROMIUM).exists() or shutil.which(CHROMIUM):
        return CHROMIUM
    if os.environ.get("TOKENWIRE_REQUIRE_BROWSER"):
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium package")
    pytest.skip(f"no Chromium at {CHROMIUM}")


def screenshot_path(name: str) -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT / name
