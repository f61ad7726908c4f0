"""``WS /v1/realtime``: one OpenAI Realtime-compatible connection, text only (events in realtime/protocol.py).

The connection keeps a session and a conversation of items. ``response.create`` runs one generation over the
conversation and streams it as ``response.output_text.delta`` events between ``response.created`` and
``response.done``; the answer becomes an assistant item of the conversation. One response at a time may write
to the conversation; out-of-band ones (``conversation: "none"``) may run beside it. A client that goes away
aborts its responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from tokenwire.engine.interface import Engine, FinishReason, GenerationRequest
from tokenwire.server.admission.limits import KeyLimits
from tokenwire.server.realtime.protocol import (
    Item,
    ItemCreate,
    ItemDelete,
    ItemRetrieve,
    ResponseCancel,
    ResponseCreate,
    Session,
    SessionUpdate,
    build_request,
    error_event,
    event,
    new_id,
    parse_event,
    realtime_error,
    update_session,
    usage,
)
from tokenwire.server.requests.errors import GOING_AWAY, RequestError, openai_type
from tokenwire.server.requests.params import Limits
from tokenwire.server.streaming.backlog import Backlog
from tokenwire.server.streaming.event_socket import Sender, read_frames
from tokenwire.server.streaming.flow import SOCKET_UNREAD, Change, Valve
from tokenwire.server.streaming.streams import Delta, Done, Failed, door_events
from tokenwire.server.streaming.wire import encode
from tokenwire.server.telemetry import Telemetry

log = logging.getLogger(__name__)


_STATUS: dict[FinishReason, tuple[str, dict[str, Any] | None]] = {
    FinishReason.STOP: ("completed", None),
    FinishReason.LENGTH: ("incomplete", {"type": "incomplete", "reason": "max_output_tokens"}),
    FinishReason.CANCELLED: ("cancelled", {"type": "cancelled", "reason": "client_cancelled"}),
}


def _shutting_down() -> RequestError:
    return realtime_error("the server is shutting down; reconnect later", "shutting_down")


@dataclass(slots=True)
class _Running:
    id: str
    request_id: str
    in_conversation: bool
    task: asyncio.Task[None] | None = None
    used_tokens: int = 0  # prompt and generated, charged to the key's budget when it ends


@dataclass(slots=True)
class _Reply:
    """A response as it is written: its assistant item, the ``response`` object, and how it ended."""

    id: str
    in_conversation: bool
    conversation_id: str
    max_output_tokens: int | None
    metadata: dict[str, Any] | None
    item: Item = field(default_factory=lambda: Item(new_id("item"), "assistant", "", "in_progress"))
    status: str = "failed"
    details: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    response: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.response = {
            "id": self.id,
            "object": "realtime.response",
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "conversation_id": self.conversation_id if self.in_conversation else None,
            "output_modalities": ["text"],
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata,
            "usage": None,
        }

    @property
    def where(self) -> dict[str, Any]:
        """The fields that place a text event: its response, item, output and content index."""
        return {"response_id": self.id, "item_id": self.item.id, "output_index": 0, "content_index": 0}


class RealtimeConnection:
    def __init__(
        self,
        ws: WebSocket,
        engine: Engine,
        limits: Limits,
        telemetry: Telemetry,
        send_timeout: float = 30.0,
        tenant: str = "",
        key_limits: KeyLimits | None = None,
    ) -> None:
        self.ws = ws
        self.tenant = tenant  # the API key's digest ("" without keys): fair admission and per-key limits
        self.key_limits = key_limits or KeyLimits()
        self.engine = engine
        self.limits = limits
        self.telemetry = telemetry
        self.session = Session(model=engine.model_name)
        self.conversation_id = new_id("conv")
        self.items: list[Item] = []
        self.responses: dict[str, _Running] = {}
        self.sender = Sender(ws, telemetry, send_timeout, "realtime")
        self._shutting_down = False
        self._accepting = True  # False once the server drains: no new responses
        self.backlog = Backlog.of(ws.scope)
        self._paused: set[str] = set()  # engine ids of responses paused for a client that does not read

    async def run(self, subprotocol: str | None) -> None:
        await self.ws.accept(subprotocol=subprotocol)
        flow = asyncio.create_task(self._flow()) if self.backlog.known else None
        try:
            await self.send(event("session.created", session=self.session.as_dict()))
            await read_frames(self.ws, self._handle)
        except WebSocketDisconnect:
            pass
        finally:
            if flow is not None:
                flow.cancel()
            running = [r.task for r in self.responses.values() if r.task is not None]
            for task in running:
                task.cancel()  # closing the engine stream aborts the request
            await asyncio.gather(*running, return_exceptions=True)
            if self.ws.application_state is WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await self.ws.close(1000)

    async def _handle(self, data: str | bytes) -> None:
        client_event_id = None
        try:
            ev = parse_event(data, self.limits)
            client_event_id = ev.event_id
            if isinstance(ev, SessionUpdate):
                self.session = update_session(self.session, ev.session, self.limits)
                await self.send(event("session.updated", session=self.session.as_dict()))
            elif isinstance(ev, ItemCreate):
                await self._add_item(ev)
            elif isinstance(ev, ItemDelete):
                item = self._item(ev.item_id)
                self.items.remove(item)
                await self.send(event("conversation.item.deleted", item_id=item.id))
            elif isinstance(ev, ItemRetrieve):
                await self.send(event("conversation.item.retrieved", item=self._item(ev.item_id).as_dict()))
            elif isinstance(ev, ResponseCreate):
                self._start_response(ev)
            elif isinstance(ev, ResponseCancel):
                self._cancel(ev)
        except RequestError as err:
            self.telemetry.error(err.code)
            await self.send(error_event(err, client_event_id))
        except (WebSocketDisconnect, OSError):
            raise
        except Exception:  # a bug in handling one event: report it, keep the connection
            log.exception("realtime connection %s could not handle an event", self.session.id)
            self.telemetry.error("server_error")
            failed = realtime_error("the server failed to handle this event", "server_error")
            await self.send(error_event(failed, client_event_id))

    def _item(self, item_id: str) -> Item:
        for item in self.items:
            if item.id == item_id:
                return item
        raise realtime_error(f"no conversation item with id {item_id!r}", "item_not_found", "item_id")

    async def _add_item(self, ev: ItemCreate) -> None:
        if len(self.items) >= self.limits.max_messages:
            raise realtime_error(
                f"the conversation already has {self.limits.max_messages} items; delete some first", param="item"
            )
        held = sum(len(it.text) for it in self.items)
        cap = 4 * self.limits.max_message_bytes
        if held + len(ev.item.text) > cap:
            raise realtime_error(
                f"the conversation would hold more than {cap} characters of text; delete some items first",
                param="item",
            )
        if any(it.id == ev.item.id for it in self.items):
            raise realtime_error(f"an item with id {ev.item.id!r} already exists", "duplicate_id", "item.id")
        if ev.previous_item_id in (None, "") or (ev.previous_item_id == "root" and not self.items):
            index = len(self.items)
        elif ev.previous_item_id == "root":
            index = 0
        else:
            index = self.items.index(self._item(ev.previous_item_id)) + 1
        previous = self.items[index - 1].id if index else None
        self.items.insert(index, ev.item)
        await self.send(event("conversation.item.added", previous_item_id=previous, item=ev.item.as_dict()))
        await self.send(event("conversation.item.done", previous_item_id=previous, item=ev.item.as_dict()))

    def _start_response(self, create: ResponseCreate) -> None:
        if self._shutting_down or not self._accepting:
            raise _shutting_down()
        if create.use_conversation and any(r.in_conversation for r in self.responses.values()):
            raise realtime_error(
                "a response is already writing to the conversation; wait for its response.done or cancel it",
                "conversation_already_has_active_response",
            )
        if len(self.responses) >= self.limits.max_generations_per_connection:
            raise realtime_error(
                f"this connection already runs {self.limits.max_generations_per_connection} responses",
                "rate_limited",
            )
        chat, params = build_request(self.session, create, self.items, self.limits)
        try:
            self.key_limits.acquire(self.tenant)
        except RequestError as err:
            raise realtime_error(err.message, err.code.value) from None
        rid = new_id("resp")
        running = _Running(rid, f"{self.session.id}:{rid}", create.use_conversation)
        self.responses[rid] = running
        running.task = asyncio.create_task(self._respond(running, create, chat, params))
        # A done callback, not _respond's finally: a task cancelled before it ran never runs that.
        running.task.add_done_callback(lambda _: self.key_limits.release(self.tenant, running.used_tokens))

    def _cancel(self, ev: ResponseCancel) -> None:
        if ev.response_id is not None:
            running = self.responses.get(ev.response_id)
        else:  # the one writing to the conversation, else the only one
            found = [r for r in self.responses.values() if r.in_conversation] or list(self.responses.values())
            running = found[0] if len(found) == 1 else None
        if running is None:
            raise realtime_error("there is no such response in progress to cancel", "response_cancel_not_active")
        self.engine.abort(running.request_id)

    async def _respond(self, running: _Running, create: ResponseCreate, chat: Any, params: Any) -> None:
        """One response: its opening events, the engine's text as deltas, its closing events and ``response.done``;
        a failure is an ``error`` event on it, the connection goes on."""
        reply = _Reply(running.id, create.use_conversation, self.conversation_id, params.max_tokens, create.metadata)
        trace = self.telemetry.trace(running.request_id, self.session.id, "realtime")
        try:
            previous = self.items[-1].id if self.items and create.use_conversation else None
            await self._open(reply, previous)
            request = GenerationRequest(
                running.request_id, params, messages=chat, truncate=True, tenant=self.tenant, connection=self.session.id
            )
            events = door_events(self.engine.generate(request), trace)
            async with contextlib.aclosing(events):
                async for ev in events:
                    await self._follow(reply, ev, create.event_id)
            await self._close(reply, previous)
        except (asyncio.CancelledError, WebSocketDisconnect):
            pass  # the connection is going away
        except Exception:  # a bug: say so on this response, keep the connection
            log.exception("realtime response %s failed", running.request_id)
            with contextlib.suppress(Exception):
                await self.send(error_event(realtime_error("the response failed", "server_error"), create.event_id))
        finally:
            trace.abandoned()
            running.used_tokens = reply.prompt_tokens + reply.completion_tokens
            if running.request_id in self._paused:  # every pause is matched: the engine keeps no stale mark
                self._paused.discard(running.request_id)
                self.engine.unpause(running.request_id)
            self.responses.pop(running.id, None)
            if reply.item.status == "in_progress":
                reply.item.status = "incomplete"

    async def _open(self, reply: _Reply, previous: str | None) -> None:
        """``response.created``, the assistant item (in the conversation too, where it writes there) and its part."""
        item = reply.item
        await self.send(event("response.created", response=reply.response))
        if reply.in_conversation:
            self.items.append(item)
        await self.send(event("response.output_item.added", response_id=reply.id, output_index=0, item=item.as_dict()))
        if reply.in_conversation:
            await self.send(event("conversation.item.added", previous_item_id=previous, item=item.as_dict()))
        await self.send(event("response.content_part.added", **reply.where, part={"type": "text", "text": ""}))

    async def _follow(self, reply: _Reply, ev: Any, client_event_id: str | None) -> None:
        """One event of the engine's stream: a delta sent, the end or a failure noted (a failure also said)."""
        if isinstance(ev, Delta) and ev.text:
            reply.item.text += ev.text
            await self.send(event("response.output_text.delta", **reply.where, delta=ev.text))
        elif isinstance(ev, Done):
            out = ev.output
            reply.prompt_tokens, reply.completion_tokens = out.prompt_tokens, out.completion_tokens
            reply.cached_tokens = out.cached_tokens
            reply.status, reply.details = _STATUS[out.finish_reason or FinishReason.STOP]
            if reply.status == "cancelled" and self._shutting_down:
                reply.details = {"type": "cancelled", "reason": "server_shutting_down"}
        elif isinstance(ev, Failed):  # traced (and counted) by door_events
            err = ev.error
            reply.details = {"type": "failed", "error": {"type": openai_type(err.code), "code": err.code.value}}
            await self.send(error_event(realtime_error(err.message, err.code.value, err.param), client_event_id))

    async def _close(self, reply: _Reply, previous: str | None) -> None:
        """The closing events of the text, its part and item, then ``response.done`` with the status and usage."""
        item, where = reply.item, reply.where
        item.status = "completed" if reply.status == "completed" else "incomplete"
        await self.send(event("response.output_text.done", **where, text=item.text))
        await self.send(event("response.content_part.done", **where, part={"type": "text", "text": item.text}))
        await self.send(event("response.output_item.done", response_id=reply.id, output_index=0, item=item.as_dict()))
        if reply.in_conversation:
            await self.send(event("conversation.item.done", previous_item_id=previous, item=item.as_dict()))
        reply.response.update(
            status=reply.status,
            status_details=reply.details,
            output=[item.as_dict()],
            usage=usage(reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens),
        )
        await self.send(event("response.done", response=reply.response))

    async def _flow(self) -> None:
        """Flow control (flow.py): while the socket holds ``SOCKET_UNREAD.high`` bytes the client has not taken
        (backlog.py), its running responses are paused in the engine (no compute), those that start meanwhile too;
        they go on once it holds ``SOCKET_UNREAD.low``."""
        valve = Valve(SOCKET_UNREAD)
        while True:
            await asyncio.sleep(0.1)
            change = valve.update(self.backlog.unread_bytes())
            if valve.paused:
                for running in list(self.responses.values()):
                    if running.request_id not in self._paused:
                        self._paused.add(running.request_id)
                        self.engine.pause(running.request_id)
            elif change is Change.GO_ON:
                for request_id in self._paused:
                    self.engine.unpause(request_id)
                self._paused.clear()

    @property
    def running_responses(self) -> int:
        return len(self.responses)

    def stop_accepting(self) -> None:
        """The server drains: running responses may finish, new ones are refused."""
        self._accepting = False

    async def shutdown(self, deliver_timeout: float = 2.0) -> None:
        """The server stops: each running response is cancelled and ends with its response.done (waiting at most
        ``deliver_timeout`` seconds), then an error event says why and the socket closes with 1001."""
        self._shutting_down = True
        tasks = [r.task for r in self.responses.values() if r.task is not None]
        for running in list(self.responses.values()):
            self.engine.abort(running.request_id)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=deliver_timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        with contextlib.suppress(WebSocketDisconnect, OSError):
            await self.send(error_event(_shutting_down(), None))
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(GOING_AWAY)

    async def send(self, message: dict[str, Any]) -> None:
        await self.sender.send(encode(message))
