"""Start ``tokenwire serve`` as a real process on a free 127.0.0.1 port, and talk to it; or serve an app on a
scripted engine with uvicorn inside the test's event loop (``serving``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from tests.conftest import scaled
from tokenwire.config import Settings
from tokenwire.engine.interface import Engine
from tokenwire.server.admission.auth import AuthPolicy
from tokenwire.server.running.app import ServerState, create_app
from tokenwire.server.running.serve import uvicorn_config
from tokenwire.server.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.http + path, timeout=scaled(10)) as r:
            return json.loads(r.read())

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``name{label=value,...}`` -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for family in text_string_to_metric_families(self.get_text("/metrics")):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.http + path, timeout=scaled(10)) as r:
            return str(r.read().decode("utf-8"))


@contextmanager
def serve(
    *args: str,
    startup_timeout: float = 120.0,
    log_path: Path | None = None,
    preexec: Callable[[], None] | None = None,
    port: int | None = None,
    exact: bool = True,
    new_session: bool = False,
) -> Iterator[RunningServer]:
    """Run ``tokenwire serve ARGS`` (on ``port``, or a free one); its output goes to ``log_path`` when given;
    ``preexec`` runs in the child before it starts (to set resource limits).

    ``exact``: compute in float32 unless ARGS name a ``--dtype``. The suites compare texts token for token (a
    resumed, continued or batched generation against one run alone), and a random model's near-ties flip with
    bfloat16, which both engines pick by default on a CPU with AVX512-BF16 or AMX (and the transformers engine on
    CUDA): on such a CPU the same tests failed where the texts parted. ``exact=False`` serves the defaults as a
    user gets them.

    ``new_session``: the server leads a process group of its own (as a shell's foreground job or a systemd service
    does), so that a test can signal that whole group (``os.killpg``) without reaching pytest."""
    port = port or free_port()
    if exact and "--dtype" not in args:
        args = (*args, "--dtype", "float32")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "tokenwire.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]
    log = open(log_path, "w") if log_path is not None else None  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, preexec_fn=preexec, start_new_session=new_session)
    server = RunningServer(port, proc)
    try:
        deadline = time.monotonic() + scaled(startup_timeout)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tokenwire serve exited with {proc.returncode}")
            try:
                if server.get_json("/ready")["status"] == "ready":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become ready")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=scaled(20))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log is not None:
            log.close()


@contextlib.asynccontextmanager
async def serving(
    engine: Engine,
    port: int | None = None,
    settings: ServerSettings | None = None,
    auth: AuthPolicy | None = None,
    server_settings: Settings | None = None,
    prefix: str = "",
    admin_key: str | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> AsyncIterator[tuple[str, ServerState]]:
    """A real uvicorn server on 127.0.0.1 in this event loop, configured as ``tokenwire serve`` configures it
    (``server_settings`` for its flags); yields (base URL, server state). With ``prefix`` ("/llm") the app is
    served under that path, as a proxy that strips it would present it to browsers."""
    app = create_app(engine, settings or ServerSettings(heartbeat_interval=0), on_fatal, auth=auth, admin_key=admin_key)
    state: ServerState = app.state.tokenwire
    if prefix:
        inner = app

        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            async with inner.router.lifespan_context(inner):  # a mounted app's lifespan is not run otherwise
                yield

        app = Starlette(routes=[Mount(prefix, inner)], lifespan=lifespan)
    port = port or free_port()
    flags = (server_settings or Settings()).replace(host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(uvicorn_config(flags, app))
    task = asyncio.create_task(server.serve())
    for _ in range(int(scaled(200))):
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}{prefix}", state
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, scaled(10))
