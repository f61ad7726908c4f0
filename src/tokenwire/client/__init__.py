"""tokenwire's Python client: the WebSocket protocol (docs/protocol.md) with several generations per
connection, cancel, typed errors, and resume after a dropped connection, so that nothing is lost or repeated.

It imports only the standard library and ``websockets``; ``pip install tokenwire`` installs it without the
server's model stack (docs/clients.md)::

    from tokenwire.client import Client

    async with Client("ws://127.0.0.1:8765/ws") as client:
        gen = client.generate(messages=[{"role": "user", "content": "Hi!"}], max_tokens=64)
        async for delta in gen:
            print(delta.text, end="", flush=True)
        print(gen.usage, gen.timings)
"""

from tokenwire.client.connection import DEFAULT_URL, Client, ConnectionState
from tokenwire.client.errors import (
    ConnectionFailed,
    DuplicateId,
    GenerationFailed,
    InternalError,
    InvalidJSON,
    InvalidRequest,
    NotFound,
    Overloaded,
    PromptTooLong,
    RateLimited,
    ShuttingDown,
    SlowConsumer,
    TokenwireError,
    Unauthorized,
    UnknownType,
    error_from,
)
from tokenwire.client.generation import Generation
from tokenwire.client.messages import Delta, FinishReason, Hello, Sampling, Timings, Usage
from tokenwire.client.sync import SyncClient, SyncGeneration

__all__ = [
    "DEFAULT_URL",
    "Client",
    "ConnectionFailed",
    "ConnectionState",
    "Delta",
    "DuplicateId",
    "FinishReason",
    "Generation",
    "GenerationFailed",
    "Hello",
    "InternalError",
    "InvalidJSON",
    "InvalidRequest",
    "NotFound",
    "Overloaded",
    "PromptTooLong",
    "RateLimited",
    "Sampling",
    "ShuttingDown",
    "SlowConsumer",
    "SyncClient",
    "SyncGeneration",
    "Timings",
    "TokenwireError",
    "Unauthorized",
    "UnknownType",
    "Usage",
    "error_from",
]
