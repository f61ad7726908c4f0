"""The asyncio client: one WebSocket connection carrying any number of generations, kept alive across drops.

A reader task reads every frame and hands each generation's messages to its :class:`Generation`, in order and
once (by ``seq``); it answers the server's heartbeat. When the connection drops while generations run, the
client reconnects with backoff and sends ``resume`` for each with the last ``seq`` it received, so the callers'
loops go on as if nothing happened (docs/protocol.md, Resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Unpack

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from tokenwire.client.errors import ConnectionFailed, NotFound, TokenwireError, Unauthorized, error_from
from tokenwire.client.generation import Generation
from tokenwire.client.messages import Hello, Sampling, generate_message, parse_hello, resume_message

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


def websocket_url(url: str) -> str:
    """``url`` as the WebSocket URL to open: ``ws://`` and ``wss://`` as given, ``http://`` and ``https://`` (the
    address the server prints for its chat page) as ``ws://`` and ``wss://``, and a bare ``host:port`` as
    ``ws://host:port`` (the server answers its protocol at ``/`` as at ``/ws``). ValueError for anything else."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "ws", text
    ws_scheme = _SCHEMES.get(scheme.lower())
    if ws_scheme is None or not rest or rest.startswith("/"):
        raise ValueError(f"{url!r} is not a server address: give ws://HOST:PORT/ws (or http://HOST:PORT, HOST:PORT)")
    return f"{ws_scheme}://{rest}"


def not_found(msg: Mapping[str, Any]) -> bool:
    return msg.get("code") == NotFound.code


class ConnectionState(enum.StrEnum):
    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"  # the connection dropped; trying again with backoff
    CLOSED = "closed"  # closed by the caller, or lost for good


class Client:
    """A connection to a tokenwire server's WebSocket protocol (``url``: see :func:`websocket_url`)::

        async with Client("ws://127.0.0.1:8765/ws", api_key="...") as client:
            async for delta in client.generate("Hello!", max_tokens=32):
                print(delta.text, end="", flush=True)

    ``reconnect_timeout``: how long to keep trying to get a dropped connection back (with backoff from
    ``min_delay`` doubling to ``max_delay``) before the running generations fail with
    :class:`ConnectionFailed`; keep it within the server's ``--resume-window`` (60 s by default).
    ``buffer``: messages held per generation for a caller that reads slowly; past that the client stops reading
    the socket and the server pauses (nothing is lost). ``on_state`` is called with each
    :class:`ConnectionState` change, ``on_notice`` with each ``notice`` message (an operator's announcement, or the
    server starting to drain).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        reconnect: bool = True,
        reconnect_timeout: float = 60.0,
        min_delay: float = 0.25,
        max_delay: float = 5.0,
        open_timeout: float = 10.0,
        buffer: int = 1024,
        on_state: Callable[[ConnectionState], None] | None = None,
        on_notice: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self.url = websocket_url(url)
        self.hello: Hello | None = None
        self.state = ConnectionState.CLOSED
        self._api_key = api_key
        self._reconnect = reconnect
        self._reconnect_timeout = reconnect_timeout
        self._delays = (min_delay, max_delay)
        self._open_timeout = open_timeout
        self._buffer = buffer
        self._on_state = on_state
        self._on_notice = on_notice
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._lost: TokenwireError | None = None  # why the last reconnect failed
        self._running: dict[str, Generation] = {}  # sent, not yet ended: resumed after a drop
        self._abandoned: dict[str, Generation] = {}  # left while disconnected: cancelled once back
        self._ids = itertools.count(1)
        self._prefix = f"py-{secrets.token_hex(3)}"
        self._closing = False

    # -- public API
    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> Hello:
        """Open the connection; the server's hello. Raises :class:`Unauthorized` for a refused key, or
        :class:`ConnectionFailed` when there is no server to talk to."""
        self._closing = False
        self._set_state(ConnectionState.CONNECTING)
        try:
            ws, hello = await self._open()
        except TokenwireError:
            self._set_state(ConnectionState.CLOSED)
            raise
        self._attach(ws, hello)
        return hello

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        id: str | None = None,
        **params: Unpack[Sampling],
    ) -> Generation:
        """A generation of ``prompt`` (one user turn) or ``messages`` (a conversation: ``{"role", "content"}``);
        ``params`` are the protocol's sampling fields (``max_tokens``, ``temperature``, ``seed``, ``stop``, ...).
        Nothing is sent until the generation is iterated."""
        gen_id = id if id is not None else f"{self._prefix}-{next(self._ids)}"
        return Generation(self, gen_id, generate_message(gen_id, prompt, messages, params), self._buffer)

    def resume(self, id: str, session: str, after_seq: int = -1, resume_token: str | None = None) -> Generation:
        """Take over a generation started on another connection (another process, before a restart of the
        caller): iterating it yields the deltas after ``after_seq``."""
        gen = Generation(self, id, None, self._buffer)
        gen.session, gen.last_seq, gen.resume_token = session, after_seq, resume_token
        return gen

    async def close(self) -> None:
        """Close normally: the server stops every generation still running on this connection."""
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), self._open_timeout)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fail_all(ConnectionFailed("the client was closed"))
        self._set_state(ConnectionState.CLOSED)

    # -- opening
    async def _open(self) -> tuple[ClientConnection, Hello]:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
        try:
            ws = await connect(
                self.url, additional_headers=headers, open_timeout=self._open_timeout, max_size=16 * 2**20
            )
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise ConnectionFailed(f"cannot connect to {self.url}: {exc or type(exc).__name__}") from exc
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), self._open_timeout))
        except (ConnectionClosed, TimeoutError, ValueError) as exc:
            await ws.close()
            raise ConnectionFailed(f"{self.url} did not greet with hello: {exc or type(exc).__name__}") from exc
        if not isinstance(first, dict) or first.get("type") != "hello":
            await ws.close()
            if isinstance(first, dict) and first.get("type") == "error":
                raise error_from(first)  # unauthorized, overloaded (connection limits), shutting_down
            raise ConnectionFailed(f"{self.url} is not a tokenwire WebSocket: its first message was {first!r:.200}")
        return ws, parse_hello(first)

    def _attach(self, ws: ClientConnection, hello: Hello) -> None:
        self._ws, self.hello, self._lost = ws, hello, None
        self._reader = asyncio.create_task(self._read(ws), name="tokenwire-client-reader")
        self._set_state(ConnectionState.OPEN)

    # -- reading
    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue  # not ours to fix; the server sends JSON
                if isinstance(msg, dict):
                    await self._dispatch(msg)
        if self._ws is ws and not self._closing:
            self._ws = None
            if self._running or self._abandoned:
                self._start_reconnect()
            else:  # nothing to resume: reconnect when the next generation wants to send
                self._set_state(ConnectionState.RECONNECTING if self._reconnect else ConnectionState.CLOSED)

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "ping":
            await self._send_quietly({"type": "pong", "ts": msg.get("ts")})
            return
        if kind == "notice":
            if self._on_notice is not None:
                self._on_notice(msg)
            return
        gen = self._running.get(str(msg.get("id")))
        if gen is None:
            return  # a generation this caller left, or a connection-level message
        if kind == "resumed":
            gen.detached = False
            if gen.cancel_requested:
                await self._send_quietly({"type": "cancel", "id": gen.id})
            return
        seq = msg.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq <= gen.last_seq:
                return  # already received before the connection dropped
            gen.last_seq = seq
        elif kind == "error" and gen.detached and gen.last_seq < 0 and gen.request is not None and not_found(msg):
            gen.detached = False  # the server never started it (the generate was lost with the connection): ask again
            await self._send_quietly(gen.request)
            return
        if kind == "started":
            token = msg.get("resume_token")
            gen.resume_token = token if isinstance(token, str) else None
            gen.prompt_tokens = msg.get("prompt_tokens") if isinstance(msg.get("prompt_tokens"), int) else None
            gen.truncated_messages = int(msg.get("truncated_messages") or 0)
        if kind in ("complete", "error"):
            self._running.pop(gen.id, None)
        await gen._queue.put(msg)

    # -- reconnecting
    def _start_reconnect(self) -> None:
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(self._reconnect_loop(), name="tokenwire-client-reconnect")

    async def _reconnect_loop(self) -> None:
        """Get the connection back within the reconnect time, then resume every running generation; else fail
        them."""
        for gen in self._running.values():
            gen.detached = True
        if not self._reconnect:
            self._lose(ConnectionFailed(f"the connection to {self.url} was lost (reconnect is off)"))
            return
        self._set_state(ConnectionState.RECONNECTING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_timeout
        low, high = self._delays
        for attempt in itertools.count():
            try:
                ws, hello = await self._open()
                break
            except Unauthorized as exc:
                self._lose(exc)
                return
            except TokenwireError as exc:  # no server yet, connection limits, a drain
                delay = min(high, low * 2**attempt) * random.uniform(0.75, 1.25)
                if loop.time() + delay > deadline:
                    self._lose(ConnectionFailed(f"lost the connection to {self.url} and could not get it back: {exc}"))
                    return
                await asyncio.sleep(delay)
        self._attach(ws, hello)
        for gen in list(self._running.values()):
            await self._send_quietly(resume_message(gen.id, gen.last_seq, gen.session, gen.resume_token))
        for gen in list(self._abandoned.values()):
            await self._send_quietly(resume_message(gen.id, gen.last_seq, gen.session, gen.resume_token))
            await self._send_quietly({"type": "cancel", "id": gen.id})
        self._abandoned.clear()

    def _lose(self, error: TokenwireError) -> None:
        self._lost = error
        self._abandoned.clear()
        self._fail_all(error)
        self._set_state(ConnectionState.CLOSED)

    async def _connected(self) -> None:
        """Wait for a usable connection, reconnecting if needed; raises why it could not be had."""
        if self._ws is not None:
            return
        if self._closing:
            raise ConnectionFailed("the client is closed")
        if self.hello is None:
            raise ConnectionFailed("not connected: call connect() first, or use `async with Client(...)`")
        self._start_reconnect()
        assert self._reconnecting is not None
        await asyncio.shield(self._reconnecting)
        if self._ws is None:
            raise self._lost or ConnectionFailed(f"no connection to {self.url}")

    # -- used by Generation
    async def _start(self, gen: Generation) -> None:
        await self._connected()
        if gen.request is not None:
            if gen.id in self._running:
                raise ValueError(f"a generation with id {gen.id!r} is already running on this client")
            gen.session = self.hello.session if self.hello else None
            self._running[gen.id] = gen
            await self._send_quietly(gen.request)  # lost with the connection? then resumed, or asked again
        else:
            self._running[gen.id] = gen
            gen.detached = True
            await self._send_quietly(resume_message(gen.id, gen.last_seq, gen.session, gen.resume_token))

    def _forget(self, gen: Generation) -> None:
        if self._running.pop(gen.id, None) is not None and self._ws is None and gen.request is not None:
            self._abandoned[gen.id] = gen

    async def _send_quietly(self, msg: Mapping[str, Any]) -> None:
        """Send, or do nothing if the connection is down: what matters is re-sent after the reconnect."""
        ws = self._ws
        if ws is None:
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(msg, ensure_ascii=False))

    def _fail_all(self, error: TokenwireError) -> None:
        running, self._running = self._running, {}
        for gen in running.values():
            gen._failed(error)

    def _set_state(self, state: ConnectionState) -> None:
        if state != self.state:
            self.state = state
            if self._on_state is not None:
                self._on_state(state)
