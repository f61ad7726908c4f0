"""tokenwire as a Ray Serve deployment: ``tokenwire serve --replicas N``.

The same app (WebSocket protocol, OpenAI and Realtime APIs, chat page) runs in each of N Ray Serve replicas, each
with its own engine, behind Ray's HTTP proxy at ``--host``/``--port``. Ray routes every new connection or request
to a replica; a WebSocket stays on its replica for its life. With a shared journal (``--journal redis://...``) a
client whose connection dropped resumes on whichever replica Ray picks, and a stream whose replica died goes on
there (resume/redis_journal.py). A replica whose engine fails reports itself unhealthy, and Ray replaces it.

Autoscaling (``--max-replicas``) is on tokenwire's own signal, requests waiting for a batch slot: each replica
reports its engine's waiting and running requests to Ray (``record_autoscaling_stats``) and
:class:`WaitingRequestsPolicy` adds replicas while more than ``--ray-target-waiting`` wait per replica, and takes
one away after a quiet minute (nothing waiting, the batches less than half full). (Ray's default policy counts
requests in flight, where every open WebSocket is one, busy or not.) Needs the ``ray`` extra:
``pip install "tokenwire[ray]"``.

    tokenwire serve --replicas 2 --journal redis://127.0.0.1:6379/0 --host 0.0.0.0 --port 8765
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from typing import Any

from tokenwire.config import Settings

log = logging.getLogger(__name__)

DEPLOYMENT = "tokenwire"
_apps: list[Any] = []  # the app of this replica's process (one per replica)


def replica_app(settings: Settings) -> Any:
    """The ASGI app one replica serves, with its own engine; the lifespan loads the model before traffic comes."""
    from tokenwire.server.running.serve import build_app

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


class WaitingRequestsPolicy:
    """A Ray Serve autoscaling policy (a class: Ray keeps one instance and calls it each tick with its context):
    up to ``ceil(waiting / target_waiting)`` replicas while requests wait for a batch slot; one fewer after
    ``quiet_s`` seconds with nothing waiting and the running batches less than half full. Ray clips the result to
    the deployment's min and max replicas."""

    def __init__(self, target_waiting: float = 4.0, quiet_s: float = 60.0) -> None:
        self.target_waiting = max(0.1, target_waiting)
        self.quiet_s = quiet_s

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        n = max(1, int(ctx.current_num_replicas))
        waiting = sum(metrics.get("waiting", {}).values())
        running = sum(metrics.get("running", {}).values())
        capacity = sum(metrics.get("max_batch_size", {}).values())
        state = dict(ctx.policy_state or {})
        now = ctx.current_time if ctx.current_time is not None else time.time()
        if waiting > self.target_waiting * n:
            state.pop("quiet_since", None)
            return max(n + 1, math.ceil(waiting / self.target_waiting)), state
        if waiting == 0 and running < capacity / 2 * (n - 1) / n:  # the others could take it all
            quiet_since = state.setdefault("quiet_since", now)
            if now - quiet_since >= self.quiet_s:
                state.pop("quiet_since", None)
                return n - 1, state
            return n, state
        state.pop("quiet_since", None)
        return n, state


def replica_stats() -> dict[str, float]:
    """What this replica reports to Ray's autoscaler: its engine's waiting and running requests, and batch size."""
    stats = [app.state.tokenwire.engine.stats() for app in _apps]
    return {
        "waiting": float(sum(s.waiting for s in stats)),
        "running": float(sum(s.running for s in stats)),
        "max_batch_size": float(sum(s.max_batch_size for s in stats)),
    }


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

        def record_autoscaling_stats(self) -> dict[str, float]:
            """Ray's autoscaler reads this (WaitingRequestsPolicy)."""
            return replica_stats()

    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        # an open WebSocket is one request in flight for its whole life: let a replica hold as many as it serves
        "max_ongoing_requests": max(1024, settings.max_connections),
        "ray_actor_options": {"num_cpus": settings.replica_cpus},
        "graceful_shutdown_timeout_s": max(0.0, settings.drain_timeout) + 5,
        "health_check_period_s": 5,
    }
    if settings.max_replicas > settings.replicas:
        options["autoscaling_config"] = autoscaling_config(settings)
    else:
        options["num_replicas"] = settings.replicas
    return serve.deployment(**options)(Tokenwire).bind()


def autoscaling_config(settings: Settings) -> dict[str, Any]:
    return {
        "min_replicas": settings.replicas,
        "initial_replicas": settings.replicas,
        "max_replicas": settings.max_replicas,
        "policy": {
            "policy_function": f"{__name__}:WaitingRequestsPolicy",
            "policy_kwargs": {"target_waiting": settings.ray_target_waiting},
        },
    }


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
