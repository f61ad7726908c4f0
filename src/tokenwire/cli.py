"""Command line: flags -> settings -> app. No logic of its own.

tokenwire serve [--model M] [--device D] [--port P] ...
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
    for f in fields(Settings):
        kind = str(f.type)
        conv = int if "int" in kind else float if "float" in kind else str
        serve.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=conv,
            default=None,
            help=f"{f.metadata.get('help', '')} (default: {f.default}; env {ENV_PREFIX}{f.name.upper()})",
        )
    return parser


def settings_from_args(argv: list[str] | None = None) -> Settings:
    args = _parser().parse_args(argv)
    base = from_env()
    given = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    return base.replace(**given)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = settings_from_args(argv)
    except ValueError as exc:  # a bad TOKENWIRE_* value
        sys.exit(f"tokenwire: error: {exc}")
    try:
        logs.configure(settings.log_level, settings.log_format)
    except ValueError as exc:
        sys.exit(f"tokenwire: error: {exc}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenwire.server.serve import run

    try:
        code = run(settings)
    except ValueError as exc:  # a model that does not exist, an unknown dtype, ...
        sys.exit(f"tokenwire: error: {exc}")
    sys.exit(code)


if __name__ == "__main__":
    main()
