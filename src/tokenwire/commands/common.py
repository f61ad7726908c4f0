"""What the client commands share: where the server is, the key, and the sampling flags."""

from __future__ import annotations

import argparse
import os
from typing import Any

from tokenwire.client import DEFAULT_URL
from tokenwire.client.connection import websocket_url

URL_ENV = "TOKENWIRE_URL"
KEY_ENV = "TOKENWIRE_API_KEY"

# Exit codes of the client commands (docs/clients.md).
EXIT_OK = 0
EXIT_REFUSED = 1  # the server refused or failed the request (invalid parameter, overloaded, ...)
EXIT_USAGE = 2  # bad arguments (argparse uses 2 as well)
EXIT_CONNECTION = 3  # no server at the URL, or the connection was lost and could not be brought back
EXIT_UNAUTHORIZED = 4  # the server wants a key, and this one is missing or wrong
EXIT_INTERRUPTED = 130  # Ctrl+C


def server_url(text: str) -> str:
    """``--url`` (or ``TOKENWIRE_URL``) as a WebSocket URL; a usage error (exit 2) names what is wrong."""
    try:
        return websocket_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        type=server_url,
        default=os.environ.get(URL_ENV) or DEFAULT_URL,
        help=f"the server's WebSocket URL; http://HOST:PORT and HOST:PORT work too (default: {DEFAULT_URL}; env "
        f"{URL_ENV})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(KEY_ENV) or None,
        help=f"the API key, if the server needs one (env {KEY_ENV}: one key)",
    )


def add_sampling_flags(parser: argparse.ArgumentParser, temperature: float | None = None) -> None:
    parser.add_argument("--system", help="a system message before the prompt")
    parser.add_argument("--max-tokens", type=int, help="at most this many tokens (server default: 256)")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 is greedy (server default: 1.0)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int, help="the same seed, prompt and parameters give the same text")
    parser.add_argument("--stop", action="append", help="end before this text (repeat for several)")


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The generate fields the flags set (the server's defaults for the others)."""
    names = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
