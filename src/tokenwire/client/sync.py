"""A synchronous face on :class:`Client`, for scripts and terminals: the asyncio client runs in a background
thread with its own event loop, and each call waits for its result there::

    with SyncClient("ws://127.0.0.1:8765/ws") as client:
        for delta in client.generate("Hello!", max_tokens=32):
            print(delta.text, end="", flush=True)

Callbacks (``on_state``, ``on_notice``) run in that background thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Generator, Mapping, Sequence
from typing import Any, TypeVar, Unpack

from tokenwire.client.connection import DEFAULT_URL, Client
from tokenwire.client.generation import Generation
from tokenwire.client.messages import Delta, FinishReason, Hello, Sampling, Timings, Usage

T = TypeVar("T")


class _Loop:
    """An event loop in a daemon thread; ``call`` runs a coroutine there and waits for it. Interrupted (Ctrl+C
    in the calling thread), it cancels the coroutine before passing the interruption on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tokenwire-client", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncGeneration:
    """A :class:`Generation` read synchronously: iterate it for :class:`Delta` values. Leaving the loop early
    cancels it on the server."""

    def __init__(self, loop: _Loop, generation: Generation) -> None:
        self.generation = generation
        self._loop = loop

    def __iter__(self) -> Generator[Delta, None, None]:
        gen = self.generation
        try:
            while (delta := self._loop.call(gen.next())) is not None:
                yield delta
        finally:
            if not gen.done:
                self._loop.call(gen._abandon())

    def cancel(self) -> None:
        """Ask the server to stop; keep iterating to read up to the end (``finish_reason`` ``cancelled``)."""
        self._loop.call(self.generation.cancel())

    def collect(self) -> str:
        """Read the whole answer; its text."""
        return self._loop.call(self.generation.collect())

    @property
    def id(self) -> str:
        return self.generation.id

    @property
    def text(self) -> str:
        return self.generation.text

    @property
    def finish_reason(self) -> FinishReason | str | None:
        return self.generation.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self.generation.usage

    @property
    def timings(self) -> Timings | None:
        return self.generation.timings

    @property
    def done(self) -> bool:
        return self.generation.done


class SyncClient:
    """:class:`Client`, synchronously; takes the same options."""

    def __init__(self, url: str = DEFAULT_URL, **options: Any) -> None:
        self._loop = _Loop()
        self.client = Client(url, **options)

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> Hello:
        return self._loop.call(self.client.connect())

    @property
    def hello(self) -> Hello | None:
        return self.client.hello

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        id: str | None = None,
        **params: Unpack[Sampling],
    ) -> SyncGeneration:
        """As :meth:`Client.generate`."""
        return SyncGeneration(self._loop, self.client.generate(prompt, messages=messages, id=id, **params))

    def close(self) -> None:
        try:
            self._loop.call(self.client.close())
        finally:
            self._loop.stop()
