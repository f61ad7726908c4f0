"""Every Python and shell example in docs/clients.md runs against a live server and does what the page says."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import scaled
from tests.e2e.server import serving
from tests.fakes import FakeEngine

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "clients.md"
DEFAULT_URL = "ws://127.0.0.1:8765/ws"
REPLY = " ".join(f"word{i}" for i in range(60))


def examples(language: str, doc: Path = DOC) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", doc.read_text(), flags=re.DOTALL | re.MULTILINE)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with serving(FakeEngine(reply=REPLY, pieces=60, delay=0.002)) as (base, _):
        yield base.replace("http://", "ws://") + "/ws"


async def run(argv: list[str], cwd: Path, url: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this checkout's tokenwire
    env["TOKENWIRE_URL"] = url
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), scaled(60))
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_the_page_has_the_examples_this_file_runs() -> None:
    assert len(examples("python")) == 5 and len(examples("bash")) == 4


async def test_the_python_examples_run(url: str, tmp_path: Path) -> None:
    outputs = []
    for i, code in enumerate(examples("python")):
        assert DEFAULT_URL in code
        script = tmp_path / f"example{i}.py"
        script.write_text(code.replace(DEFAULT_URL, url))
        rc, out, err = await run([sys.executable, str(script)], tmp_path, url)
        assert (rc, err) == (0, ""), f"example {i}:\n{code}\n{err}"
        outputs.append(out)
    stream, several, conversation, errors, sync = outputs
    assert stream.startswith("model: fake-model\n" + REPLY + "\n") and "\nstop Usage(prompt_tokens=7" in stream
    assert "What is 2 + 2? -> " + REPLY in several and "finish reason: cancelled" in several
    assert conversation.count(REPLY) == 2 and "> And of Italy?" in conversation
    assert errors.startswith("refused: temperature - ") and REPLY in errors
    assert sync.startswith(REPLY + "\nUsage(prompt_tokens=7")


async def test_the_shell_examples_run(url: str, tmp_path: Path) -> None:
    outputs, errors = [], []
    for i, code in enumerate(examples("bash")):
        rc, out, err = await run(["bash", "-c", code], tmp_path, url)
        assert rc == 0, f"example {i}:\n{code}\n{err}"
        outputs.append(out)
        errors.append(err)
    assert errors[:3] == ["", "", ""]
    assert errors[3] == (
        'tokenwire generate: error: invalid_request: "temperature" must be at least 0.0 and at most 10.0 '
        "(param: temperature)\n"
    )
    assert outputs[0] == REPLY + "\n"
    assert outputs[1] == REPLY + "\n" and (tmp_path / "french.txt").read_text() == REPLY + "\n"
    assert '"type": "complete"' in outputs[2] and '"finish_reason": "stop"' in outputs[2]
    assert outputs[3] == "exit code 1\n"


async def test_the_readme_client_examples_run(url: str, tmp_path: Path) -> None:
    readme = examples("python", ROOT / "README.md")
    assert len(readme) == 2  # with tokenwire.client, and by hand with websockets
    for i, code in enumerate(readme):
        script = tmp_path / f"readme{i}.py"
        script.write_text(code.replace(DEFAULT_URL, url))
        rc, out, err = await run([sys.executable, str(script)], tmp_path, url)
        assert (rc, err) == (0, ""), f"README example {i}:\n{code}\n{err}"
        assert REPLY in out and "completion_tokens" in out
