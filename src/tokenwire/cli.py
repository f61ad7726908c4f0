"""Command line: flags -> settings -> app. No logic of its own.

tokenwire serve [--model M] [--device D] [--port P] ...
tokenwire prepare [--model M] [--engine E]     (make the model loadable now: the caches a first start fills)
tokenwire generate "prompt" [--url U] [--json]  (one answer from a running server, to stdout)
tokenwire chat [--url U]                        (a terminal chat with a running server)

The client commands need only ``pip install tokenwire``; ``serve`` and ``prepare`` need ``tokenwire[server]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import fields

from tokenwire import __version__, logs
from tokenwire.config import ENV_PREFIX, Settings, from_env


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenwire", description="Real-time streaming inference server.")
    parser.add_argument("--version", action="version", version=f"tokenwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Every flag can also be "
        f"set as an environment variable {ENV_PREFIX}NAME (e.g. {ENV_PREFIX}PORT).",
    )
    prepare = sub.add_parser(
        "prepare",
        help="prepare the model and exit",
        description="Fill the caches a first start of `serve` with the same flags would fill (the tokenizer read "
        "from a GGUF file for the openvino engine, the converted model folder for transformers), then exit: "
        "for images built ahead of time.",
    )
    from tokenwire.commands import chat, generate

    generate.add_parser(sub)
    chat.add_parser(sub)
    for command in (serve, prepare):
        for f in fields(Settings):
            kind = str(f.type)
            conv = int if "int" in kind else float if "float" in kind else str
            command.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=conv,
                default=None,
                help=f"{f.metadata.get('help', '')} (default: {f.default}; env {ENV_PREFIX}{f.name.upper()})",
            )
    return parser


SERVER_PACKAGES = ("starlette", "uvicorn", "transformers")
# what each engine adds; --engine auto falls back to transformers (saying why) where openvino-genai is missing
ENGINE_PACKAGES = {"openvino": ("openvino_genai",), "transformers": ("torch",), "auto": ("torch",)}
SERVER_MISSING = (
    "tokenwire {command} needs the server's packages ({missing} is not installed): pip install 'tokenwire[server]'"
)


def settings_from_args(argv: list[str] | None = None) -> Settings:
    return _parse(_parser().parse_args(argv))


def _parse(args: argparse.Namespace) -> Settings:
    base = from_env()
    given = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    return base.replace(**given)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in ("generate", "chat"):
        from tokenwire.commands import chat, generate

        sys.exit((generate if args.command == "generate" else chat).run(args))
    command = args.command
    try:
        settings = _parse(args)
        settings.check()
    except ValueError as exc:  # a bad TOKENWIRE_* value, a number out of its range
        sys.exit(f"tokenwire: error: {exc}")
    try:
        _server_installed(settings.engine)
    except ModuleNotFoundError as exc:
        sys.exit("tokenwire: error: " + SERVER_MISSING.format(command=command, missing=exc.name))
    try:
        logs.configure(settings.log_level, settings.log_format)
    except ValueError as exc:
        sys.exit(f"tokenwire: error: {exc}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if command == "prepare":
        from tokenwire.engine.factory import prepare_model

        try:
            print(prepare_model(settings))
        except ValueError as exc:
            sys.exit(f"tokenwire: error: {exc}")
        sys.exit(0)
    from tokenwire.server.running.serve import run

    try:
        code = run(settings)
    except ValueError as exc:  # a model that does not exist, an unknown dtype, ...
        sys.exit(f"tokenwire: error: {exc}")
    sys.exit(code)


def _server_installed(engine: str) -> None:
    """Raises ModuleNotFoundError naming the first of the server's packages, or the engine's, that is missing
    (without importing them: that is the server's job, and slow)."""
    for name in (*SERVER_PACKAGES, *ENGINE_PACKAGES.get(engine, ())):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(name=name)


if __name__ == "__main__":
    main()
