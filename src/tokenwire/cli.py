"""Command line: flags -> settings -> app. No logic of its own.

tokenwire serve [--model M] [--device D] [--port P] ...
tokenwire prepare [--model M] [--engine E]     (make the model loadable now: the caches a first start fills)
"""

from __future__ import annotations

import argparse
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


def settings_from_args(argv: list[str] | None = None) -> Settings:
    return _parse(argv)[1]


def _parse(argv: list[str] | None) -> tuple[str, Settings]:
    args = _parser().parse_args(argv)
    base = from_env()
    given = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    return args.command, base.replace(**given)


def main(argv: list[str] | None = None) -> None:
    try:
        command, settings = _parse(argv)
    except ValueError as exc:  # a bad TOKENWIRE_* value
        sys.exit(f"tokenwire: error: {exc}")
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
    from tokenwire.server.serve import run

    try:
        code = run(settings)
    except ValueError as exc:  # a model that does not exist, an unknown dtype, ...
        sys.exit(f"tokenwire: error: {exc}")
    sys.exit(code)


if __name__ == "__main__":
    main()
