"""The client installs and runs without the server: ``pip install tokenwire`` asks for websockets and rich
only, ``tokenwire.client`` imports nothing past the standard library and websockets, and the client commands
work in an interpreter where the server's packages cannot be imported."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import textwrap
from importlib.metadata import requires

from tests.conftest import scaled
from tests.e2e.server import serving
from tests.fakes import FakeEngine

# Run in a child interpreter: any import of a top-level module other than the standard library's and ``allowed``
# fails, as it would where the module is not installed.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, runpy, sys
    allowed = set(sys.stdlib_module_names) | {"tokenwire", "_distutils_hack", "__editable___tokenwire_0_1_0_finder"}
    allowed |= set(sys.argv[1].split(","))
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in allowed:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None
    sys.meta_path.insert(0, Block())
    sys.argv = sys.argv[2:]
    if sys.argv[0] == "-c":
        exec(sys.argv[1])
    else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    """
)

CLIENT_PACKAGES = "websockets,rich,markdown_it,mdurl,pygments"  # rich's own dependencies too


async def blocked(allowed: str, *argv: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BLOCKER, allowed, *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), scaled(60))
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_the_distribution_needs_only_websockets_and_rich_unless_the_server_is_asked_for() -> None:
    base = sorted(re.split(r"[<>=!~\[; ]", r)[0] for r in requires("tokenwire") or () if "extra ==" not in r)
    assert base == ["rich", "websockets"]
    server = [r for r in requires("tokenwire") or () if 'extra == "server"' in r]
    assert any(r.startswith("torch") for r in server) and any(r.startswith("starlette") for r in server)


async def test_the_client_imports_only_the_standard_library_and_websockets() -> None:
    code, out, err = await blocked(
        "websockets",
        "-c",
        "import sys, tokenwire.client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)))",
    )
    assert code == 0, err
    assert set(eval(out)) <= {"tokenwire", "websockets", "_distutils_hack", "__main__"}


async def test_the_commands_run_without_the_servers_packages_and_serve_says_what_to_install() -> None:
    async with serving(FakeEngine(reply="Hello, world!")) as (base, _):
        url = base.replace("http://", "ws://") + "/ws"
        code, out, err = await blocked(
            "websockets,rich,markdown_it,mdurl,pygments", "tokenwire.cli", "generate", "Hi", "--url", url
        )
    assert (code, out, err) == (0, "Hello, world!\n", "")
    code, _, err = await blocked("websockets,rich,markdown_it,mdurl,pygments", "tokenwire.cli", "serve")
    assert code == 1 and "tokenwire serve needs the server's packages" in err and "tokenwire[server]" in err
