"""Past one process: two replicas share a Redis journal. A generation started on one is resumed on the other
(exactly once, in order, no affinity), and when its replica is killed, the replica a client resumes it on goes on
with it: the text continues at the junction as an uninterrupted greedy run's. Redis and the servers run on
127.0.0.1; the tiny random model on the default (OpenVINO) engine."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.server import RunningServer, free_port, serve
from tests.e2e.test_resume import read_until_seq, reference, seqs, story, text_of

LEASE = 1.0
WINDOW = 30.0


def replica(model: Path, redis_url: str, *more: str, log_path: Path | None = None, port: int | None = None) -> Any:
    """A replica on the shared journal. Float16 weights (``--quantize none``), as in tiny_server: texts continued
    on another replica are compared with one run whole, and int8 rounding tips a random model's near-ties one way
    in a prefill and the other in a decode step."""
    return serve(
        "--model",
        str(model),
        "--quantize",
        "none",
        "--journal",
        redis_url,
        "--journal-lease",
        str(LEASE),
        "--resume-window",
        str(WINDOW),
        "--heartbeat-interval",
        "0",
        *more,
        log_path=log_path,
        port=port,
    )


@pytest.fixture(scope="module")
def pair(tiny_gguf: Path, redis_url: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    with replica(tiny_gguf, redis_url) as a, replica(tiny_gguf, redis_url) as b:
        yield a, b


async def wait_paused(server: RunningServer, paused: int = 1) -> None:
    deadline = time.monotonic() + scaled(20)
    while server.get_json("/v1/stats")["engine"]["paused"] != paused:
        assert time.monotonic() < deadline, "the orphan was not paused"
        await asyncio.sleep(0.05)


async def start_and_drop(server: RunningServer, msg: dict[str, Any], after: int) -> tuple[str, int]:
    """Start ``msg`` on ``server``, read until seq ``after``, then vanish; returns the text read and the last seq."""
    c = await Client.connect(server.ws)
    await c.send(msg)
    await read_until_seq(c, msg["id"], after)
    got = c.by_id[msg["id"]]
    await c.vanish()
    assert [m["seq"] for m in got] == list(range(len(got)))
    return text_of(got), got[-1]["seq"]


async def resume_whole(server: RunningServer, gen_id: str, seen: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Resume ``gen_id`` after ``seen`` on ``server`` and read it to its end: (resumed message, the rest)."""
    b = await Client.connect(server.ws)
    try:
        await b.send({"type": "resume", "id": gen_id, "after_seq": seen})
        resumed = await b.until(lambda m: m.get("id") == gen_id)
        assert resumed["type"] == "resumed", resumed
        end = await b.finish(gen_id, timeout=scaled(120))
        assert end["type"] == "complete", end
        rest = b.by_id[gen_id][1:]
        return resumed, rest
    finally:
        await b.close()


async def test_a_generation_started_on_one_replica_is_resumed_on_the_other(
    pair: tuple[RunningServer, RunningServer],
) -> None:
    """No proxy, no affinity: replica B replays the shared journal and follows the live entries A writes; A's
    paused orphan goes on as B's client reads (A's flow control follows a reader on another replica)."""
    a, b = pair
    gen_id = "far-" + secrets.token_hex(4)
    whole = await reference(a, story(gen_id + "-ref", max_tokens=300))
    before, seen = await start_and_drop(a, story(gen_id, max_tokens=300), after=4)
    await wait_paused(a)
    resumed, rest = await resume_whole(b, gen_id, seen)
    assert resumed["running"] is True and resumed["after_seq"] == seen
    assert seqs(rest) == list(range(seen + 1, rest[-1]["seq"] + 1))  # every seq once, in order
    assert before + text_of(rest) == whole
    assert rest[-1]["usage"]["completion_tokens"] == 300
    assert a.get_json("/v1/stats")["engine"]["paused"] == 0  # it went on there, not here
    assert b.metrics()["tokenwire_generation_tokens_total"] == 0  # B generated nothing


async def test_a_resume_elsewhere_of_a_generation_held_by_an_open_connection_needs_its_token(
    pair: tuple[RunningServer, RunningServer],
) -> None:
    a, b = pair
    gen_id = "held-" + secrets.token_hex(4)
    owner = await Client.connect(a.ws)
    try:
        await owner.send(story(gen_id, max_tokens=3000))
        started = await owner.until(lambda m: m.get("id") == gen_id and m["type"] == "started")
        await asyncio.sleep(0.3)
        other = await Client.connect(b.ws)
        await other.send({"type": "resume", "id": gen_id, "after_seq": 0})
        refused = await other.until(lambda m: m.get("id") == gen_id)
        assert refused["type"] == "error" and refused["param"] == "resume_token", refused
        await other.send({"type": "resume", "id": gen_id, "after_seq": 0, "resume_token": started["resume_token"]})
        taken = await other.until(lambda m: m.get("id") == gen_id and m["type"] == "resumed")
        assert taken["running"] is True
        assert owner.by_id[gen_id][-1]["type"] != "complete"
        owner_had = len(owner.by_id[gen_id])
        await other.until(lambda m: m.get("id") == gen_id and m.get("seq", 0) > 20)
        await other.send({"type": "cancel", "id": gen_id})
        end = await other.until(lambda m: m.get("id") == gen_id and m["type"] == "complete")
        assert end["finish_reason"] == "cancelled"  # cancelled there, from here
        await asyncio.sleep(0.3)
        assert len(owner.by_id[gen_id]) - owner_had < 64, "the old connection still got the stream"
        await other.close()
    finally:
        await owner.close()


async def test_a_generation_goes_on_when_its_replica_dies(tiny_gguf: Path, redis_url: str) -> None:
    """SIGKILL the replica running a generation whose client dropped; the client resumes on another replica, which
    takes it over after the lease: the text continues at the junction exactly as an uninterrupted greedy run."""
    gen_id = "fail-" + secrets.token_hex(4)
    sampled = {**story(gen_id + "-s", max_tokens=150), "temperature": 0.9, "seed": 7}
    with replica(tiny_gguf, redis_url) as a, replica(tiny_gguf, redis_url) as b:
        whole = await reference(b, story(gen_id + "-ref", max_tokens=200))
        before, seen = await start_and_drop(a, story(gen_id, max_tokens=200), after=6)
        await wait_paused(a)
        s_before, s_seen = await start_and_drop(a, sampled, after=5)
        await wait_paused(a, 2)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=scaled(10))
        killed = time.monotonic()
        resumed, rest = await resume_whole(b, gen_id, seen)
        first = rest[0] if rest else None
        assert first is not None and time.monotonic() - killed < scaled(LEASE + 10)
        assert resumed["running"] is True
        assert seqs(rest) == list(range(seen + 1, rest[-1]["seq"] + 1))  # nothing lost or repeated
        assert before + text_of(rest) == whole  # greedy: seamless at the junction
        assert rest[-1]["usage"]["completion_tokens"] == 200
        assert b.metrics()["tokenwire_generation_tokens_total"] > 0  # B made the rest
        # Sampled: what the client had is kept (it is not sent again), the rest continues to max_tokens.
        _, s_rest = await resume_whole(b, sampled["id"], s_seen)
        assert seqs(s_rest) == list(range(s_seen + 1, s_rest[-1]["seq"] + 1))
        assert s_rest[-1]["usage"]["completion_tokens"] == 150 and s_before and text_of(s_rest)


async def test_a_generation_nobody_resumes_after_its_replica_died_is_gone_after_the_window(
    tiny_gguf: Path, redis_url: str
) -> None:
    gen_id = "gone-" + secrets.token_hex(4)
    short = ("--resume-window", "2")
    with replica(tiny_gguf, redis_url, *short) as a:
        await start_and_drop(a, story(gen_id, max_tokens=200), after=3)
        await wait_paused(a)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=scaled(10))
    r = redis.Redis.from_url(redis_url)
    assert r.keys(f"tokenwire:*:{gen_id}:*")
    deadline = time.monotonic() + scaled(2 + LEASE + 5)
    while r.keys(f"tokenwire:*:{gen_id}:*") or r.keys(f"tokenwire:ids:{gen_id}"):
        assert time.monotonic() < deadline, r.keys(f"tokenwire:*{gen_id}*")
        time.sleep(0.2)


async def test_through_nginx_without_affinity_every_reconnect_resumes(
    tiny_gguf: Path, redis_url: str, tmp_path: Path
) -> None:
    """The shipped nginx config, no ?affinity=: reconnects go to whichever replica least_conn picks, and every
    resume succeeds there; the answer arrives whole, each seq once."""
    from tests.e2e.test_nginx import nginx_in_front

    gen_id = "lb-" + secrets.token_hex(4)
    with replica(tiny_gguf, redis_url) as a, replica(tiny_gguf, redis_url) as b:
        whole = await reference(a, story(gen_id + "-ref", max_tokens=300))
        with nginx_in_front([a.port, b.port], tmp_path) as base:
            url = base.replace("http", "ws", 1) + "/ws"
            c = await Client.connect(url)
            await c.send(story(gen_id, max_tokens=300))
            got: list[dict[str, Any]] = []
            seen = -1
            for _ in range(4):
                await c.until(lambda m, seen=seen: m.get("id") == gen_id and m.get("seq", -1) > seen + 2)
                got += [m for m in c.by_id[gen_id] if m.get("seq", -1) > seen]
                seen = got[-1]["seq"]
                await c.vanish()
                await asyncio.sleep(0.2)
                c = await Client.connect(url)
                await c.send({"type": "resume", "id": gen_id, "after_seq": seen})
                resumed = await c.until(lambda m: m.get("id") == gen_id)
                assert resumed["type"] == "resumed", resumed
            end = await c.until(lambda m: m.get("id") == gen_id and m["type"] == "complete", timeout=scaled(120))
            got += [m for m in c.by_id[gen_id] if m.get("seq", -1) > seen]
            await c.close()
            assert end["usage"]["completion_tokens"] == 300
            assert seqs(got) == list(range(end["seq"] + 1))  # every seq once, in order, over five connections
            assert text_of(got) == whole
            resumes = [s.metrics().get("tokenwire_websocket_resumes_total{outcome=resumed}", 0) for s in (a, b)]
            assert sum(resumes) == 4 and min(resumes) >= 1, resumes  # both replicas served resumes


async def test_a_replica_that_is_rolled_hands_its_running_answers_over(tiny_gguf: Path, redis_url: str) -> None:
    """SIGTERM with a shared journal: an answer still running when the drain ends is not cut with shutting_down;
    its socket closes (1001), the client resumes on the other replica, which goes on with it at once."""
    gen_id = "roll-" + secrets.token_hex(4)
    with replica(tiny_gguf, redis_url, "--drain-timeout", "0.5") as a, replica(tiny_gguf, redis_url) as b:
        whole = await reference(b, story(gen_id + "-ref", max_tokens=2000))
        c = await Client.connect(a.ws)
        await c.send(story(gen_id, max_tokens=2000))
        await read_until_seq(c, gen_id, 3)
        a.proc.send_signal(signal.SIGTERM)
        closed = time.monotonic()
        try:
            while True:
                await c.recv(timeout=scaled(30))
        except Exception:
            pass  # the socket closed
        got = c.by_id[gen_id]
        assert all(m["type"] in ("started", "token") for m in got), got[-1]  # no shutting_down: it is not over
        seen = got[-1]["seq"]
        assert seqs(got) == list(range(seen + 1))
        resumed, rest = await resume_whole(b, gen_id, seen)
        assert resumed["running"] is True
        assert seqs(rest) == list(range(seen + 1, rest[-1]["seq"] + 1))
        assert text_of(got) + text_of(rest) == whole
        assert time.monotonic() - closed < scaled(60)


async def test_the_python_client_goes_on_through_a_restart_of_its_server(tiny_gguf: Path, redis_url: str) -> None:
    """tokenwire.client (which tokenwire chat uses) against a server that is stopped mid-answer and started again
    on the same port with the same journal: the client reconnects with backoff, resumes, and its loop gets the
    whole greedy answer, each delta once."""
    from tokenwire.client import Client as PyClient
    from tokenwire.client import ConnectionState, Delta

    prompt, request = "Tell me a story about a lighthouse", {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    port = free_port()
    deltas: list[Delta] = []
    states: list[ConnectionState] = []
    with contextlib.ExitStack() as servers:
        first = servers.enter_context(replica(tiny_gguf, redis_url, "--drain-timeout", "0.2", port=port))
        async with PyClient(first.ws + "/ws") as client:
            whole = await client.generate(prompt, **request).collect()
        async with PyClient(first.ws + "/ws", min_delay=0.1, on_state=states.append) as client:
            gen = client.generate(prompt, **request)
            async for delta in gen:
                deltas.append(delta)
                if len(deltas) == 5:
                    first.proc.send_signal(signal.SIGTERM)  # rolled: its answers are handed over on the journal
                    await asyncio.to_thread(first.proc.wait, scaled(30))
                    servers.enter_context(replica(tiny_gguf, redis_url, port=port))  # within the reconnect time
    assert ConnectionState.RECONNECTING in states
    assert "".join(d.text for d in deltas) == whole == gen.text
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))
    assert gen.usage is not None and gen.usage.completion_tokens == 2000


def test_a_journal_that_cannot_be_reached_stops_the_server_with_a_clear_error(tiny_gguf: Path, tmp_path: Path) -> None:
    """--journal names a Redis nobody listens on: the server says so and exits 1 (its supervisor restarts it)."""
    import subprocess
    import sys

    from tests.e2e.server import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(free_port()), "--model", str(tiny_gguf)]
    proc = subprocess.run(
        [*cmd, "--journal", f"redis://127.0.0.1:{port}/0"], capture_output=True, text=True, timeout=scaled(120)
    )
    assert proc.returncode == 1
    assert f"cannot reach the journal at redis://127.0.0.1:{port}/0" in proc.stderr


def test_a_bad_journal_setting_is_refused_before_anything_starts() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "tokenwire.cli", "serve", "--journal", "postgres://x"],
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode != 0 and "--journal must be memory or a redis:// URL" in proc.stderr
