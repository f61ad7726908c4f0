"""``tokenwire serve`` with one change made for a diagnosis (bench/ws_diag.sh), then the usual arguments:

    python bench/serve_variant.py [--switch-interval SECONDS] [--no-backlog] serve --model ... --port ...

--switch-interval  ``sys.setswitchinterval``: how long a thread waiting for the GIL waits before it asks the
                   holder to drop it (CPython's default: 0.005)
--no-backlog       the WebSocket pump does not ask the socket for its unread bytes (server/streaming/backlog.py: one
                   ``ioctl(TIOCOUTQ)`` per message) and writes as the event loop lets it
"""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if "--no-backlog" in args:
        args.remove("--no-backlog")
        from tokenwire.server.streaming import backlog

        backlog.Backlog.known = property(lambda self: False)  # type: ignore[method-assign,assignment]
    if "--switch-interval" in args:
        at = args.index("--switch-interval")
        sys.setswitchinterval(float(args[at + 1]))
        del args[at : at + 2]
    from tokenwire.cli import main as tokenwire

    tokenwire(args)


if __name__ == "__main__":
    main()
