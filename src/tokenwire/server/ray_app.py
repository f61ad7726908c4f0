"""tokenwire as a Ray Serve deployment: ``tokenwire serve --replicas N``.

The same app (WebSocket protocol, OpenAI and Realtime APIs, chat page) runs in each of N Ray Serve replicas, each
with its own engine, behind Ray's HTTP proxy at ``--host``/``--port``. Ray routes every new connection or request
to a replica; a WebSocket stays on its replica for its life. With a shared journal (``--journal redis://...``) a
client whose connection dropped resumes on whichever replica Ray picks, and a stream whose replica died goes on
there (redis_journal.py). A replica whose engine fails reports itself unhealthy, and Ray replaces it.

Autoscaling (``--max-replicas``) uses Ray Serve's own policy: requests in flight per replica (an open WebSocket
counts as one), aiming at ``--ray-target-requests``. Needs the ``ray`` extra: ``pip install "tokenwire[ray]"``.

    tokenwire serve --replicas 2 --journal redis://127.0.0.1:6379/0 --host 0.0.0.0 --port 8765
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from typing import Any

from tokenwire.config import Settings

log = logging.getLogger(__name__)

DEPLOYMENT = "tokenwire"
_apps: list[Any] = []  # the app of this replica's process (one per replica)


def replica_app(settings: Settings) -> Any:
    """The ASGI app one replica serves, with its own engine; the lifespan loads the model before traffic comes."""
    from tokenwire.server.serve import build_app

    app = build_app(settings, on_fatal=None, hosted=True)
    _apps.append(app)
    return app


def replica_problem() -> str | None:
    """Why this replica cannot serve (its model failed to load, or its engine stopped), or None."""
    for app in _apps:
        state = app.state.tokenwire
        if state.load_error or state.engine_error:
            return str(state.load_error or state.engine_error)
    return None


def deployment(settings: Settings) -> Any:
    """The Ray Serve application for ``settings``."""
    from ray import serve

    def build() -> Any:  # runs in each replica: a function, so that Ray calls it there instead of pickling an app
        return replica_app(settings)

    @serve.ingress(build)
    class Tokenwire:
        def check_health(self) -> None:
            """Ray calls this periodically: a replica whose engine failed is replaced."""
            problem = replica_problem()
            if problem is not None:
                raise RuntimeError(f"tokenwire replica cannot serve: {problem}")

    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        # an open WebSocket is one request in flight for its whole life: let a replica hold as many as it serves
        "max_ongoing_requests": max(1024, settings.max_connections),
        "ray_actor_options": {"num_cpus": settings.replica_cpus},
        "graceful_shutdown_timeout_s": max(0.0, settings.drain_timeout) + 5,
        "health_check_period_s": 5,
    }
    if settings.max_replicas > settings.replicas:
        options["autoscaling_config"] = {
            "min_replicas": settings.replicas,
            "initial_replicas": settings.replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.ray_target_requests,
        }
    else:
        options["num_replicas"] = settings.replicas
    return serve.deployment(**options)(Tokenwire).bind()


def run_ray(settings: Settings) -> int:
    """Start a one-machine Ray cluster, Serve's HTTP proxy on --host/--port and the replicas; block until SIGTERM
    or Ctrl-C, then shut down (replicas drain first). Returns the exit code."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError('--replicas needs Ray Serve: pip install "tokenwire[ray]"') from None
    if settings.journal == "memory" and settings.replicas > 1:
        log.warning(
            "%d replicas with the in-memory journal: a resume works only if Ray routes it to the replica that runs "
            "the generation; use --journal redis://... (docs/scaling.md)",
            settings.replicas,
        )
    cpus = math.ceil(settings.replica_cpus * max(settings.replicas, settings.max_replicas)) + 1
    ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port}, proxy_location="HeadOnly")
        serve.run(deployment(settings), name=DEPLOYMENT, route_prefix="/")
        log.info(
            "ready: %d Ray Serve replica(s) of %s at http://%s:%d",
            settings.replicas,
            settings.model or "the default model",
            settings.host,
            settings.port,
        )
        stop.wait()
        log.info("stopping: replicas drain (up to %.0f s)", settings.drain_timeout)
        serve.shutdown()  # type: ignore[no-untyped-call]
        return 0
    except Exception as exc:
        log.error("Ray Serve failed: %s", exc)
        return 1
    finally:
        ray.shutdown()
