"""A program run in a pseudo-terminal, read as a person would read it: pyte keeps the screen it draws."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import select
import signal
import time

import pyte

from tests.conftest import scaled


class Terminal:
    """``argv`` on a pseudo-terminal of ``columns`` x ``lines``; ``type`` what a person types, ``expect`` what the
    screen should come to show."""

    def __init__(self, argv: list[str], env: dict[str, str], columns: int = 100, lines: int = 40) -> None:
        self.screen = pyte.Screen(columns, lines)
        self.stream = pyte.ByteStream(self.screen)
        self.output = b""
        env = {**env, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(lines)}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl+C there is SIGINT
            try:
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)

    def pump(self) -> None:
        """Read whatever the program wrote so far."""
        while select.select([self.fd], [], [], 0)[0]:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # the program ended
                return
            if not chunk:
                return
            self.output += chunk
            self.stream.feed(chunk)

    @property
    def text(self) -> str:
        self.pump()
        return "\n".join(line.rstrip() for line in self.screen.display)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    async def expect(self, wanted: str, timeout: float = 20.0) -> str:
        """Wait until the screen shows ``wanted``; the screen's text."""
        deadline = time.monotonic() + scaled(timeout)
        while wanted not in (text := self.text):
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed {wanted!r}; it shows:\n{text}")
            await asyncio.sleep(0.02)
        return text

    async def exit_code(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + scaled(timeout)
        while True:
            self.pump()
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise AssertionError(f"the program did not end; its screen:\n{self.text}")
            await asyncio.sleep(0.02)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        with contextlib.suppress(OSError):
            os.close(self.fd)
