"""OpenAI-compatible HTTP routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models[/{id}]``.

Streaming answers are Server-Sent Events: one ``data: {chunk}`` per text delta, ``: keep-alive`` comments
while nothing else is sent (a long prompt being prefilled, a queue), and ``data: [DONE]`` at the end. A client
that disconnects, streaming or not, has its request aborted in the engine at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncGenerator
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenwire.engine.interface import (
    Engine,
    EngineError,
    EngineErrorCode,
    FinishReason,
    GenerationRequest,
    OutputKind,
    RequestOutput,
)
from tokenwire.server.admission.auth import bearer_token, owner_of
from tokenwire.server.admission.limits import KeyLimits
from tokenwire.server.openai import protocol as oa
from tokenwire.server.requests import strictjson, tools
from tokenwire.server.requests.errors import ErrorCode, RequestError, wire_error
from tokenwire.server.requests.http_errors import (
    check_model,
    error_body,
    error_response,
    json_input_error,
    openai_error,
)
from tokenwire.server.requests.params import Limits
from tokenwire.server.streaming.sse import EventStreamResponse, sse, until_disconnect
from tokenwire.server.streaming.streams import Delta, Done, Failed, KeepAlive, door_events
from tokenwire.server.telemetry import Telemetry, Trace

T = TypeVar("T")


def _peer(request: Request) -> str:
    """The client's connection (keep-alive requests share one), for fair admission."""
    client = request.client
    return f"{client.host}:{client.port}" if client is not None else "http"


def _shutting_down() -> RequestError:
    return RequestError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; try again later")


class OpenAIRoutes:
    def __init__(
        self,
        engine: Engine,
        limits: Limits,
        keepalive_interval: float,
        telemetry: Telemetry,
        keyed: bool = False,
        key_limits: KeyLimits | None = None,
    ) -> None:
        self.engine = engine
        self.keyed = keyed  # API keys are on: a request's key names its tenant
        self.key_limits = key_limits or KeyLimits()
        self.telemetry = telemetry
        self.limits = limits
        self.keepalive_interval = keepalive_interval
        self.created = int(time.time())
        self._ids = itertools.count(1)
        self._in_flight: set[str] = set()  # engine request ids of the requests being answered
        self._draining = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def stop_accepting(self) -> None:
        """The server drains: new requests get 503 shutting_down; those in flight go on."""
        self._draining = True

    async def drain(self, timeout: float = 2.0) -> None:
        """The server stops: new requests get 503 shutting_down; each request in flight is aborted and ends with
        an error of code ``shutting_down`` (an SSE error event, then ``data: [DONE]``; a 503 when not streaming),
        never with a cut connection. Waits at most ``timeout`` seconds for them to end."""
        self._draining = True
        for request_id in list(self._in_flight):
            self.engine.abort(request_id)
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def models(self, request: Request) -> Response:
        return JSONResponse(oa.model_list(self.engine.model_name, self.created))

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{id}``: the served model, or 404 ``model_not_found`` (the ``openai`` package's
        ``models.retrieve``)."""
        name = request.path_params["model_id"]
        try:
            check_model({"model": name}, self.engine.model_name, self.engine.model_aliases)
        except RequestError as err:
            return error_response(err)
        return JSONResponse(oa.model_object(name, self.created))

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    def _error(self, err: RequestError) -> JSONResponse:
        self.telemetry.error(err.code)
        return error_response(err)

    async def _complete(self, request: Request, chat: bool) -> Response:
        req = await self._accept(request, chat)
        if isinstance(req, Response):
            return req
        prefix = "chatcmpl" if chat else "cmpl"
        ids = oa.ResponseIds.new(f"{prefix}-{secrets.token_hex(12)}", self.engine.model_name)
        engine_req = GenerationRequest(
            request_id=f"http-{next(self._ids)}-{ids.id}",
            params=req.params,
            prompt=req.prompt,
            messages=req.messages,
            raw=not chat,  # completions continue the text as given, without the chat template
            tools=tools.for_template(req.tools),
            tools_text=req.tools_text,
            tenant=(owner_of(bearer_token(request.headers)) or "") if self.keyed else "",
            connection=_peer(request),
        )
        try:
            self.key_limits.acquire(engine_req.tenant)
        except RequestError as err:
            self.telemetry.error(err.code.value)
            return error_response(err)
        stream = self._tracked(engine_req)
        trace = self.telemetry.trace(engine_req.request_id, "http", "openai")
        try:
            await anext(stream)  # STARTED: tokenized and queued; prompt errors surface here, before any byte
        except EngineError as err:
            trace.failed(err.code.value)
            return error_response(wire_error(err))
        if req.stream:
            rid = engine_req.request_id
            return EventStreamResponse(
                self._events(req, ids, stream, trace),
                pause=lambda: self.engine.pause(rid),
                unpause=lambda: self.engine.unpause(rid),
            )
        return await self._whole(request, req, ids, stream, trace, chat)

    async def _accept(self, request: Request, chat: bool) -> oa.CompletionRequest | Response:
        """The request read and checked, or the error response to send instead (a bad body, a draining server, a
        model still loading)."""
        try:
            body = strictjson.loads(await request.body(), "the request body")
        except strictjson.JSONInputError as err:
            return self._error(json_input_error(err))
        try:
            req = oa.parse_completion_request(
                body,
                chat=chat,
                limits=self.limits,
                model_name=self.engine.model_name,
                model_aliases=self.engine.model_aliases,
            )
        except RequestError as err:
            return self._error(err)
        if self._draining:
            return self._error(_shutting_down())
        if not self.engine.ready:
            return self._error(
                openai_error(503, "the model is still loading; try again shortly", code="overloaded", retry_after=1)
            )
        return req

    async def _whole(
        self,
        request: Request,
        req: oa.CompletionRequest,
        ids: oa.ResponseIds,
        stream: AsyncGenerator[RequestOutput, None],
        trace: Trace,
        chat: bool,
    ) -> Response:
        """A response that is not streamed: the whole answer as one JSON body (a tool call read from it), or 499
        when the client left first (its request aborted)."""
        result = await until_disconnect(self._collect(stream, trace), request.receive)
        if result is None:  # the client left; until_disconnect closed the stream, which aborted the request
            await stream.aclose()
            trace.abandoned()
            return Response(status_code=499)
        if isinstance(result, RequestError):
            trace.failed(result.code)
            return error_response(result)
        text, out = result
        reason = oa.finish_reason(out.finish_reason) if out.finish_reason else "stop"
        use = oa.usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens)
        if chat:
            call = tools.parse_call(text, req.tools) if req.tools else None
            return JSONResponse(oa.chat_completion(ids, text, reason, use, [call] if call else None))
        return JSONResponse(oa.text_completion(ids, text, reason, use))

    async def _tracked(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        """The engine stream of ``request``, counted in flight (for drain) until it ends or is closed. A request
        the drain aborted ends with :func:`_shutting_down` raised instead of a ``cancelled`` finish."""
        rid = request.request_id
        self._in_flight.add(rid)
        used = 0
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as stream:
                async for out in stream:
                    used += out.prompt_tokens if out.kind is OutputKind.STARTED else out.num_tokens
                    if (
                        self._draining
                        and out.kind is OutputKind.FINISHED
                        and out.finish_reason is FinishReason.CANCELLED
                    ):
                        if out.text:
                            yield RequestOutput(rid, OutputKind.DELTA, text=out.text, num_tokens=out.num_tokens)
                        raise EngineError(EngineErrorCode.SHUTTING_DOWN, _shutting_down().message)
                    yield out
        finally:
            self._in_flight.discard(rid)
            self.key_limits.release(request.tenant, used)

    async def _collect(
        self, stream: AsyncGenerator[RequestOutput, None], trace: Trace
    ) -> tuple[str, RequestOutput] | RequestError:
        parts: list[str] = []
        async with contextlib.aclosing(door_events(stream, trace)) as events:
            async for ev in events:
                if isinstance(ev, Delta):
                    parts.append(ev.text)
                elif isinstance(ev, Done):
                    return "".join(parts), ev.output
                elif isinstance(ev, Failed):
                    return wire_error(ev.error)
        return openai_error(500, "the generation ended without a result", code="generation_failed")

    async def _events(
        self,
        req: oa.CompletionRequest,
        ids: oa.ResponseIds,
        stream: AsyncGenerator[RequestOutput, None],
        trace: Trace,
    ) -> AsyncGenerator[bytes, None]:
        """The SSE body. Closing this generator (client gone) closes ``stream``, which aborts the request."""
        chat = req.chat
        calls = tools.CallStream(req.tools) if req.tools else None  # with tools: is the answer a call?
        events = door_events(stream, trace, self.keepalive_interval)
        # ``stream`` too: ``events`` does not close it if it is closed before its first step.
        async with contextlib.aclosing(stream), contextlib.aclosing(events):
            if chat:
                yield sse(oa.chat_chunk(ids, {"role": "assistant", "content": ""}, None))
            async for ev in events:
                if isinstance(ev, KeepAlive):
                    yield b": keep-alive\n\n"
                elif isinstance(ev, Delta) and ev.text:
                    if calls is not None:
                        for kind, piece in calls.feed(ev.text):
                            yield sse(oa.chat_chunk(ids, oa.call_delta(kind, piece, calls.call_id), None))
                        continue
                    text = ev.text
                    yield sse(oa.chat_chunk(ids, {"content": text}, None) if chat else oa.text_chunk(ids, text, None))
                elif isinstance(ev, Done):
                    out = ev.output
                    reason = oa.finish_reason(out.finish_reason) if out.finish_reason else "stop"
                    if calls is not None:
                        for kind, piece in calls.finish():
                            yield sse(oa.chat_chunk(ids, oa.call_delta(kind, piece, calls.call_id), None))
                        if calls.is_call:
                            reason = "tool_calls"
                    yield sse(oa.chat_chunk(ids, {}, reason) if chat else oa.text_chunk(ids, "", reason))
                    if req.include_usage:
                        use = oa.usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens)
                        yield sse(oa.usage_chunk(ids, chat, use))
                elif isinstance(ev, Failed):  # after the headers: report it in the stream
                    yield sse(error_body(wire_error(ev.error)))
        yield sse("[DONE]")
