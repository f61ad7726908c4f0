"""``tokenwire generate PROMPT``: one answer streamed to stdout, for shells and pipes.

The prompt is an argument, or stdin when it is ``-``. Text goes to stdout as it arrives (with ``--json``, one
JSON object per message instead); errors go to stderr with an exit code that says which kind
(common.py: 1 refused, 2 usage, 3 connection, 4 unauthorized, 130 interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from typing import Any, TextIO

from tokenwire.client import Client, ConnectionFailed, Generation, TokenwireError, Unauthorized
from tokenwire.commands.common import (
    EXIT_CONNECTION,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAUTHORIZED,
    EXIT_USAGE,
    add_connection_flags,
    add_sampling_flags,
    sampling,
)


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "generate",
        help="stream one answer from a running server to stdout",
        description="Stream one answer from a running tokenwire server to stdout. Errors go to stderr; the exit "
        "code is 0 on success, 1 when the server refused or failed the request, 2 for bad arguments, 3 when "
        "there is no server (or the connection was lost for good), 4 for a missing or wrong API key, 130 when "
        "interrupted.",
    )
    parser.add_argument("prompt", help="the prompt; - reads it from stdin")
    add_connection_flags(parser)
    add_sampling_flags(parser)
    parser.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per message (started, token, complete)"
    )


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        print("tokenwire generate: error: the prompt is empty", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_generate(args, prompt, sys.stdout))
    except KeyboardInterrupt:
        print("\ntokenwire generate: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of a pipe left (`| head`): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


async def _generate(args: argparse.Namespace, prompt: str, out: TextIO) -> int:
    params: dict[str, Any] = sampling(args)
    if args.raw:
        params["raw"] = True
    try:
        async with Client(args.url, api_key=args.api_key) as client:
            if args.system:
                messages = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]
                gen = client.generate(messages=messages, **params)
            else:
                gen = client.generate(prompt, **params)
            await (_json_lines(gen, out) if args.json else _text(gen, out))
    except Unauthorized as exc:
        return _fail(f"{exc} (give the key with --api-key or TOKENWIRE_API_KEY)", EXIT_UNAUTHORIZED)
    except ConnectionFailed as exc:
        return _fail(str(exc), EXIT_CONNECTION)
    except TokenwireError as exc:
        return _fail(str(exc), EXIT_REFUSED)
    return EXIT_OK


async def _text(gen: Generation, out: TextIO) -> None:
    async for delta in gen:
        out.write(delta.text)
        out.flush()
    if not gen.text.endswith("\n"):
        out.write("\n")
    out.flush()


async def _json_lines(gen: Generation, out: TextIO) -> None:
    def line(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        out.flush()

    started = False
    async for delta in gen:
        if not started:
            started = True
            line({"type": "started", "id": gen.id, "prompt_tokens": gen.prompt_tokens})
        line({"type": "token", "id": gen.id, "seq": delta.seq, "content": delta.text, "tokens": delta.tokens})
    if not started:
        line({"type": "started", "id": gen.id, "prompt_tokens": gen.prompt_tokens})
    line(
        {
            "type": "complete",
            "id": gen.id,
            "finish_reason": str(gen.finish_reason),
            "usage": asdict(gen.usage) if gen.usage else None,
            "timings": asdict(gen.timings) if gen.timings else None,
        }
    )


def _fail(message: str, code: int) -> int:
    print(f"tokenwire generate: error: {message}", file=sys.stderr)
    return code
