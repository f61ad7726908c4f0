"""``WS /v1/responses``: the Responses API's WebSocket mode.

Each turn is a ``response.create`` event with the fields of ``POST /v1/responses`` (always streamed, never in the
background); its events come back on the socket as they would over SSE. Later turns send only their new input with
``previous_response_id``: the responses of this socket are kept on it (even with ``store: false``) for that.
``stream_id`` multiplexes: responses on one ``stream_id`` run one after another (FIFO), different ``stream_id``\\ s
run at once, and every event of a response echoes its ``stream_id``. ``response.cancel`` (``response_id``, or a
``stream_id`` to stop that lane's running response) stops one. Closing the socket cancels what still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from tokenwire.server.requests import strictjson
from tokenwire.server.requests.errors import GOING_AWAY, NORMAL_CLOSURE, ErrorCode, RequestError
from tokenwire.server.requests.http_errors import error_body, openai_error
from tokenwire.server.requests.params import Limits
from tokenwire.server.responses import protocol as rp
from tokenwire.server.responses.service import Responses, read_events
from tokenwire.server.responses.store import Record
from tokenwire.server.streaming.event_socket import Sender, read_frames
from tokenwire.server.streaming.wire import encode
from tokenwire.server.telemetry import Telemetry

log = logging.getLogger(__name__)

KEPT_PER_SOCKET = 64  # responses of this socket kept for previous_response_id beyond the shared store
DEFAULT_LANE = ""


class _Lane:
    """The responses of one ``stream_id``: run one after another."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[rp.CreateRequest] = asyncio.Queue()
        self.current: Record | None = None
        self.task: asyncio.Task[None] | None = None


class ResponsesConnection:
    def __init__(
        self,
        ws: WebSocket,
        service: Responses,
        limits: Limits,
        telemetry: Telemetry,
        send_timeout: float,
        tenant: str,
    ) -> None:
        self.ws = ws
        self.service = service
        self.limits = limits
        self.telemetry = telemetry
        self.tenant = tenant
        self.local: OrderedDict[str, Record] = OrderedDict()
        self.lanes: dict[str, _Lane] = {}
        self.sender = Sender(ws, telemetry, send_timeout, "responses")
        self._errors = itertools.count()
        self._accepting = True

    @property
    def running_responses(self) -> int:
        return sum((lane.current is not None) + lane.queue.qsize() for lane in self.lanes.values())

    def stop_accepting(self) -> None:
        self._accepting = False

    async def shutdown(self, deliver_timeout: float = 2.0) -> None:
        """The server stops: running responses are cancelled and their last events sent (at most
        ``deliver_timeout`` seconds), then an error says why and the socket closes with 1001."""
        self._accepting = False
        for lane in self.lanes.values():
            while not lane.queue.empty():
                lane.queue.get_nowait()
            if lane.current is not None:
                self.service.cancel(lane.current)
        tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=deliver_timeout)
        with contextlib.suppress(WebSocketDisconnect, OSError):
            await self._send_error(ErrorCode.SHUTTING_DOWN.value, "the server is shutting down", None, None, 503)
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(GOING_AWAY)

    async def run(self, subprotocol: str | None) -> None:
        await self.ws.accept(subprotocol=subprotocol)
        try:
            await read_frames(self.ws, self._handle)
        finally:
            for lane in self.lanes.values():
                if lane.current is not None:
                    self.service.cancel(lane.current)
                if lane.task is not None:
                    lane.task.cancel()
            await asyncio.gather(*(lane.task for lane in self.lanes.values() if lane.task), return_exceptions=True)
            if self.ws.application_state is WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await self.ws.close(NORMAL_CLOSURE)

    async def _handle(self, data: str | bytes) -> None:
        stream_id: str | None = None
        try:
            try:
                obj = strictjson.loads(data)
            except strictjson.JSONInputError as err:
                raise openai_error(400, err.message, code="invalid_json", param=err.param) from None
            if not isinstance(obj, dict):
                raise openai_error(400, 'an event must be a JSON object with a "type"', code="invalid_json")
            sid = obj.get("stream_id")
            stream_id = sid if isinstance(sid, str) and len(sid) <= rp.MAX_ID else None
            kind = obj.get("type")
            if kind == "response.create":
                self._create(obj)
            elif kind == "response.cancel":
                self._cancel(obj)
            else:
                shown = kind if isinstance(kind, str) and len(kind) <= 40 else "?"
                raise openai_error(
                    400,
                    f"unknown event type {shown!r}; expected response.create or response.cancel",
                    code="unknown_type",
                )
        except RequestError as err:
            self.telemetry.error(err.wire_name)
            await self._send_error(err.wire_name, err.message, err.param, stream_id, err.status)
        except (WebSocketDisconnect, OSError):
            raise
        except Exception:  # a bug in handling one event: report it, keep the connection
            log.exception("responses connection could not handle an event")
            await self._send_error("server_error", "the server failed to handle this event", None, stream_id, 500)

    def _create(self, obj: dict[str, Any]) -> None:
        if not self._accepting:
            raise openai_error(503, "the server is shutting down; reconnect later", code=ErrorCode.SHUTTING_DOWN.value)
        body = {k: v for k, v in obj.items() if k != "type"}
        if isinstance(body.get("response"), dict):  # the envelope form: {"type", "stream_id", "response": {...}}
            body = {**body.pop("response"), **({"stream_id": body["stream_id"]} if "stream_id" in body else {})}
        create = rp.parse_create(  # RequestError for a bad one
            body,
            self.limits,
            self.service.engine.model_name,
            websocket=True,
            model_aliases=self.service.engine.model_aliases,
        )
        if self.running_responses >= self.limits.max_generations_per_connection:
            raise openai_error(
                429,
                f"this connection already runs or queues {self.limits.max_generations_per_connection} responses",
                code=ErrorCode.RATE_LIMITED.value,
            )
        lane_id = create.stream_id or DEFAULT_LANE
        lane = self.lanes.get(lane_id)
        if lane is None:
            lane = self.lanes[lane_id] = _Lane()
        lane.queue.put_nowait(create)
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(self._serve_lane(lane))

    def _cancel(self, obj: dict[str, Any]) -> None:
        response_id = obj.get("response_id")
        if response_id is not None:
            record = self.local.get(response_id) if isinstance(response_id, str) else None
            if record is None:
                raise openai_error(
                    404, f"no response {response_id!r} on this connection", code="not_found", param="response_id"
                )
            self.service.cancel(record)
            return
        lane = self.lanes.get(obj.get("stream_id") or DEFAULT_LANE)
        if lane is None or lane.current is None:
            raise openai_error(
                400, "nothing runs on that stream_id; name a response_id", code="invalid_request", param="stream_id"
            )
        self.service.cancel(lane.current)

    async def _serve_lane(self, lane: _Lane) -> None:
        while not lane.queue.empty():
            create = lane.queue.get_nowait()
            try:
                record = await self.service.start(
                    create, tenant=self.tenant, connection="responses-ws", local=self.local
                )
            except RequestError as err:
                self.telemetry.error(err.wire_name)
                await self._send_error(err.wire_name, err.message, err.param, create.stream_id, err.status)
                continue
            self._keep(record)
            lane.current = record
            try:
                async for data in read_events(record):
                    await self._send(data)
            finally:
                lane.current = None

    def _keep(self, record: Record) -> None:
        self.local[record.id] = record
        while len(self.local) > KEPT_PER_SOCKET:
            self.local.popitem(last=False)

    async def _send_error(self, code: str, message: str, param: str | None, stream_id: str | None, status: int) -> None:
        event = responses_error(status, code, message, param, next(self._errors))
        if stream_id is not None:
            event["stream_id"] = stream_id
        await self._send(encode(event))

    async def _send(self, data: str) -> None:
        await self.sender.send(data)


def responses_error(
    status: int, code: str, message: str, param: str | None = None, sequence_number: int = 0
) -> dict[str, Any]:
    """An ``error`` event: the fields of the openai package's ResponseErrorEvent, and OpenAI's WebSocket-mode
    ``status`` and ``error`` object."""
    return {
        "type": "error",
        "code": code,
        "message": message,
        "param": param,
        "sequence_number": sequence_number,
        "status": status,
        **error_body(openai_error(status, message, code=code, param=param)),
    }
