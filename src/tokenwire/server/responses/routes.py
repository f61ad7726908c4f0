"""``/v1/responses`` over HTTP: create (streamed as SSE, or not, or in the background), retrieve (and resume a
stream ``starting_after`` a sequence number), cancel, delete.

A streamed response that is not in the background is tied to its client: a disconnect cancels it, and a client
that stops reading pauses it (sse.py). A background response runs on its own; any client with the same key reads
it later, whole or from where it left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenwire.server.admission.auth import bearer_token, owner_of
from tokenwire.server.requests import errors, strictjson
from tokenwire.server.requests.errors import RequestError
from tokenwire.server.requests.http_errors import error_body, error_response, json_input_error, openai_error
from tokenwire.server.requests.params import Limits
from tokenwire.server.responses import protocol as rp
from tokenwire.server.responses.service import Responses, read_events
from tokenwire.server.responses.store import Record
from tokenwire.server.streaming.sse import EventStreamResponse, sse, until_disconnect
from tokenwire.server.streaming.streams import with_deadlines


def _error(status: int, code: str, message: str, param: str | None = None, retry: float | None = None) -> Response:
    return error_response(openai_error(status, message, code=code, param=param, retry_after=retry))


def _not_found(response_id: str) -> Response:
    return _error(404, "not_found", f"no response {response_id!r}: it never existed, expired, or was not stored")


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client is not None else "http"


class ResponsesRoutes:
    def __init__(self, service: Responses, limits: Limits, keyed: bool, keepalive_interval: float = 15.0) -> None:
        self.service = service
        self.limits = limits
        self.keyed = keyed  # API keys are on: a response belongs to the key that created it
        self.keepalive_interval = keepalive_interval

    def _tenant(self, request: Request) -> str:
        return (owner_of(bearer_token(request.headers)) or "") if self.keyed else ""

    async def create(self, request: Request) -> Response:
        try:
            body = strictjson.loads(await request.body(), "the request body")
            create = rp.parse_create(
                body,
                self.limits,
                self.service.engine.model_name,
                model_aliases=self.service.engine.model_aliases,
            )
        except strictjson.JSONInputError as err:
            return JSONResponse(error_body(json_input_error(err)), status_code=400)
        except RequestError as err:
            self.service.telemetry.error(err.wire_name)
            return JSONResponse(error_body(err), status_code=err.status)
        try:
            record = await self.service.start(create, tenant=self._tenant(request), connection=_peer(request))
        except RequestError as err:
            self.service.telemetry.error(err.wire_name)
            return error_response(err)
        if create.background:
            return JSONResponse(record.as_dict())
        if create.stream:
            engine, rid = self.service.engine, record.engine_id
            return EventStreamResponse(
                self._stream(record, -1, cancel_on_close=True),
                pause=lambda: engine.pause(rid),
                unpause=lambda: engine.unpause(rid),
            )
        finished = await until_disconnect(self._wait(record), request.receive)
        if finished is None:  # the client left: the response is cancelled
            self.service.cancel(record)
            return Response(status_code=499)
        if record.status == "failed" and record.error is not None:
            code = record.error["code"]
            return _error(errors.http_status(code), code, record.error["message"])
        return JSONResponse(record.as_dict())

    @staticmethod
    async def _wait(record: Record) -> bool:
        assert record.task is not None
        await asyncio.shield(record.task)
        return True

    async def _stream(self, record: Record, after: int, cancel_on_close: bool) -> AsyncGenerator[bytes, None]:
        """SSE of a response's events after ``after``; closing it early (client gone) cancels a response tied to
        this client."""
        events = read_events(record, after)
        interval = self.keepalive_interval
        next_ping = time.monotonic() + interval

        def deadline() -> float:
            return next_ping

        finished = False
        items = with_deadlines(events, deadline if interval > 0 else None)
        try:
            async with contextlib.aclosing(items):  # first: it may be awaiting ``events``
                async for data in items:
                    next_ping = time.monotonic() + interval
                    if data is None:
                        yield b": keep-alive\n\n"
                        continue
                    yield sse(data, event=Record.event_type(data))
            finished = True
        finally:
            await events.aclose()
            if cancel_on_close and not finished:
                self.service.cancel(record)

    async def retrieve(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        record = self.service.get(response_id, self._tenant(request))
        if record is None:
            return _not_found(response_id)
        query = request.query_params
        stream = query.get("stream", "false").lower()
        if stream not in ("true", "false"):
            return _error(400, "invalid_request", '"stream" must be true or false', "stream")
        if stream == "false":
            return JSONResponse(record.as_dict())
        if record.log.dropped:
            return _error(
                409,
                "events_gone",
                "this response's events are no longer kept (stored responses keep their events within a memory "
                "budget, background ones longest); its result is still here without stream=true",
                "stream",
            )
        after = query.get("starting_after")
        try:
            start = -1 if after is None else int(after)
        except ValueError:
            start = -2
        if start < -1:
            return _error(
                400, "invalid_request", '"starting_after" must be a sequence number (0 or more)', "starting_after"
            )
        return EventStreamResponse(self._stream(record, start, cancel_on_close=False))

    async def cancel(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        record = self.service.get(response_id, self._tenant(request))
        if record is None:
            return _not_found(response_id)
        self.service.cancel(record)
        if record.task is not None:
            await asyncio.wait({record.task}, timeout=5.0)
        return JSONResponse(record.as_dict())

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        record = self.service.get(response_id, self._tenant(request))
        if record is None:
            return _not_found(response_id)
        self.service.cancel(record)
        self.service.store.remove(response_id)
        body: dict[str, Any] = {"id": response_id, "object": "response.deleted", "deleted": True}
        return JSONResponse(body)
