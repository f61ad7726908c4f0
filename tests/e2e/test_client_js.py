"""The browser client (/client.js, an ES module) in headless Chromium, against a real server on a scripted engine
(tests/fakes.py). Each test imports the module into a blank page served from the server's origin."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Page, Route, async_playwright

from tests.conftest import scaled
from tests.e2e.browser import ARGS, require_chromium
from tests.e2e.server import serving
from tests.fakes import FakeEngine
from tokenwire.server.settings import ServerSettings

MS = scaled(10) * 1000  # Playwright timeouts, in milliseconds
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "browser-client.html"
LNA = "LocalNetworkAccessChecks"
BLANK = "<!DOCTYPE html><html><head><meta charset='utf-8'><title>client.js</title></head><body></body></html>"


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[Page]:
    chromium = require_chromium()
    async with async_playwright() as p:
        # The test pages are answered by Playwright (page.route), which gives them no address space: Chromium's
        # Local Network Access checks would take them for public pages and block their WebSocket to 127.0.0.1.
        browser = await p.chromium.launch(executable_path=chromium, args=[*ARGS, f"--disable-features={LNA}"])
        try:
            yield await (await browser.new_context()).new_page()
        finally:
            await browser.close()


async def serve_page(page: Page, url: str, html: str) -> None:
    """Answer ``url`` with ``html`` in the browser, so that a page has that URL's origin."""

    async def fulfill(route: Route) -> None:
        await route.fulfill(body=html, content_type="text/html; charset=utf-8")

    await page.route(url, fulfill)


async def open_blank(page: Page, base: str, module: str | None = None) -> None:
    """A blank page at ``base``/blank.html with the module at ``module`` (by default ``base``/client.js) imported
    as ``window.tw``."""
    await serve_page(page, base + "/blank.html", BLANK)
    await page.goto(base + "/blank.html")
    await evaluate(page, "async (url) => { window.tw = await import(url); }", module or base + "/client.js")


async def evaluate(page: Page, script: str, arg: Any = None) -> Any:
    """``page.evaluate``, failing after a while instead of hanging on a promise that never settles."""
    return await asyncio.wait_for(page.evaluate(script, arg), scaled(15))


async def drop_every_socket(state: Any) -> None:
    for conn in list(state.connections):
        await conn.ws.close(1012)  # the server drops the socket, as a restarting proxy or a lost network would


# Streams a generation into window.run: its events, and once it ends its outcome (or the error it threw).
START = """([request, options]) => {
    const client = window.client || (window.client = new tw.TokenwireClient(options || {}));
    const gen = client.generate(request);
    const run = window.run = { events: [], gen, result: null };
    (async () => {
        try {
            for await (const ev of gen) run.events.push(ev);
            run.result = { finishReason: gen.finishReason, text: gen.text, usage: gen.usage, lastSeq: gen.lastSeq };
        } catch (err) {
            run.result = { error: { name: err.name, code: err.code, param: err.param, lost: err.lost } };
        }
    })();
}"""


async def run_result(page: Page) -> Any:
    await page.wait_for_function("window.run.result !== null", timeout=MS)
    return await page.evaluate("window.run.result")


async def events_at_least(page: Page, n: int) -> None:
    await page.wait_for_function(f"window.run.events.length >= {n}", timeout=MS)


async def test_a_page_imports_client_js_and_streams_a_generation_whose_text_is_the_answer() -> None:
    engine = FakeEngine(reply="The answer is 42, as ever.", pieces=6, delay=0.01)
    pieces = len(range(0, len(engine.reply), len(engine.reply) // 6))  # how the fake engine splits it
    async with serving(engine) as (base, _), browser_page() as page:
        async with httpx.AsyncClient() as http:
            r = await http.get(base + "/client.js")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
        await open_blank(page, base)
        out = await evaluate(
            page,
            """async () => {
                const client = new tw.TokenwireClient();
                const states = [];
                client.addEventListener("state", (e) => states.push(e.detail.state));
                const hello = await client.connect();
                const gen = client.generate({ prompt: "What is it?", max_tokens: 50 });
                const events = [];
                for await (const ev of gen) events.push(ev);
                const text = events.filter((e) => e.type === "token").map((e) => e.content).join("");
                const result = {
                    model: hello.model, sameModel: client.model === hello.model, session: client.session,
                    limits: client.limits, states: states.slice(), types: events.map((e) => e.type), text,
                    genText: gen.text,
                    finishReason: gen.finishReason, usage: gen.usage, timings: gen.timings, id: gen.id,
                    genSession: gen.session, resumeToken: gen.resumeToken, lastSeq: gen.lastSeq,
                    running: client._generations.size,
                };
                client.close();
                return result;
            }""",
        )
        assert out["model"] == "fake-model" and out["sameModel"] and out["session"] == out["genSession"]
        assert out["limits"]["max_tokens"] >= 50
        assert out["states"] == ["connecting", "open"]  # (then "closed", by close())
        assert out["types"] == ["started"] + ["token"] * pieces
        assert out["text"] == out["genText"] == engine.reply
        assert out["finishReason"] == "stop" and out["usage"]["completion_tokens"] == pieces
        assert out["timings"]["tokens_per_second"] == 100.0
        assert out["lastSeq"] == pieces + 1 and out["resumeToken"]  # complete's seq; the token came with started
        assert out["running"] == 0  # a finished generation is not kept
        assert engine.requests[0].prompt == "What is it?" and engine.requests[0].params.max_tokens == 50


async def test_two_concurrent_generations_on_one_client_each_get_their_own_text() -> None:
    engine = FakeEngine(reply=" ".join(f"w{i}" for i in range(30)), pieces=30, delay=0.01)
    async with serving(engine) as (base, _), browser_page() as page:
        await open_blank(page, base)
        out = await evaluate(
            page,
            """async () => {
                const client = new tw.TokenwireClient();
                await client.connect();
                const order = [];
                async function read(name, prompt) {
                    const gen = client.generate({ prompt }, { id: name });
                    let text = "";
                    for await (const ev of gen) if (ev.type === "token") { text += ev.content; order.push(name); }
                    return { id: gen.id, text, finishReason: gen.finishReason };
                }
                const both = await Promise.all([read("a", "first"), read("b", "second")]);
                client.close();
                return { both, order };
            }""",
        )
        assert [(g["id"], g["finishReason"]) for g in out["both"]] == [("a", "stop"), ("b", "stop")]
        assert all(g["text"] == engine.reply for g in out["both"])
        assert sorted(r.prompt or "" for r in engine.requests) == ["first", "second"]
        order = "".join(out["order"])
        assert "ab" in order and "ba" in order  # they ran side by side, interleaved


async def test_cancel_ends_the_generation_with_finish_reason_cancelled_and_keeps_the_text_so_far() -> None:
    engine = FakeEngine(reply="word " * 200, pieces=200, delay=0.01)
    async with serving(engine) as (base, _), browser_page() as page:
        await open_blank(page, base)
        await evaluate(page, START, [{"prompt": "Talk"}, None])
        await events_at_least(page, 4)
        await page.evaluate("window.run.gen.cancel()")
        result = await run_result(page)
        assert result["finishReason"] == "cancelled"
        assert 0 < len(result["text"]) < len(engine.reply) and engine.reply.startswith(result["text"])
        assert len(engine.aborted) == 1


async def test_breaking_out_of_for_await_cancels_the_generation_on_the_server() -> None:
    engine = FakeEngine(reply="word " * 200, pieces=200, delay=0.01)
    async with serving(engine) as (base, _), browser_page() as page:
        await open_blank(page, base)
        out = await evaluate(
            page,
            """async () => {
                const client = window.client = new tw.TokenwireClient();
                const gen = client.generate({ prompt: "Talk" });
                let tokens = 0;
                for await (const ev of gen) if (ev.type === "token" && ++tokens === 3) break;
                return { tokens, done: gen.done, next: (await gen.next()).done };
            }""",
        )
        assert out == {"tokens": 3, "done": False, "next": True}
        for _ in range(int(scaled(100))):
            if engine.aborted:
                break
            await asyncio.sleep(0.02)
        assert len(engine.aborted) == 1
        # the generation's complete (cancelled) still came, and the client let it go
        await page.wait_for_function("window.client._generations.size === 0", timeout=MS)


async def test_an_invalid_parameter_throws_tokenwire_error_with_code_invalid_request_and_the_param() -> None:
    engine = FakeEngine()
    async with serving(engine) as (base, _), browser_page() as page:
        await open_blank(page, base)
        out = await evaluate(
            page,
            """async () => {
                const client = new tw.TokenwireClient();
                const gen = client.generate({ prompt: "Hi", temperature: 50 });
                let caught = null;
                try { for await (const ev of gen) { /* nothing comes */ } } catch (err) { caught = err; }
                const after = client.generate({ prompt: "Hi" });  // the connection is still good
                for await (const ev of after) { /* read it all */ }
                client.close();
                return {
                    isError: caught instanceof tw.TokenwireError, name: caught.name, code: caught.code,
                    param: caught.param, message: caught.message, lost: caught.lost, id: caught.id,
                    genError: gen.error === caught, done: gen.done, after: after.text,
                };
            }""",
        )
        assert out["isError"] and out["name"] == "TokenwireError" and out["genError"] and out["done"]
        assert (out["code"], out["param"], out["lost"]) == ("invalid_request", "temperature", False)
        assert "temperature" in out["message"] and out["id"]
        assert out["after"] == engine.reply and len(engine.requests) == 1


async def test_two_dropped_sockets_mid_answer_still_yield_every_token_exactly_once_in_order() -> None:
    """The server drops the socket twice during one answer: the client reconnects (with ?affinity=), resumes from
    the last seq it received, and the iterator yields each message once, in order: the whole answer."""
    reply = " ".join(f"w{i}" for i in range(150))
    engine = FakeEngine(reply=reply, pieces=150, delay=0.01)
    async with serving(engine) as (base, state), browser_page() as page:
        await open_blank(page, base)
        await evaluate(page, START, [{"prompt": "Count"}, {"minDelayMs": 50, "affinity": "tab-1"}])
        affinities = set()
        for at_least in (5, 40):
            await events_at_least(page, at_least)
            affinities |= {c.ws.query_params.get("affinity") for c in state.connections}
            await drop_every_socket(state)
        result = await run_result(page)
        events = await page.evaluate("window.run.events")
        assert result["finishReason"] == "stop" and result["text"] == reply
        tokens = [e for e in events if e["type"] == "token"]
        assert "".join(e["content"] for e in tokens) == reply
        seqs = [e["seq"] for e in events if "seq" in e]
        assert seqs == list(range(len(seqs))) and result["lastSeq"] == len(seqs)  # 0 started, ..., then complete
        kinds = [e["type"] for e in events if e["type"] in ("detached", "resumed")]
        assert kinds == ["detached", "resumed", "detached", "resumed"]
        assert affinities == {"tab-1"} and len(engine.requests) == 1 and not engine.aborted


async def test_resume_continues_a_generation_by_id_session_and_after_seq_from_a_second_client() -> None:
    """The first client closes abnormally (4000) mid-answer; a second client resumes the generation by id, session
    and the last seq the first one read, and reads the rest: together, the whole answer."""
    reply = " ".join(f"r{i}" for i in range(120))
    engine = FakeEngine(reply=reply, pieces=120, delay=0.01)
    async with serving(engine) as (base, state), browser_page() as page:
        await open_blank(page, base)
        await evaluate(page, START, [{"prompt": "Count"}, {"reconnect": False}])
        await events_at_least(page, 10)
        first = await evaluate(
            page,
            """() => {
                const gen = window.run.gen;
                window.client.close(4000, "handing over");  // not 1000: the server keeps the generation
                const read = window.run.events.filter((e) => e.type === "token").map((e) => e.content).join("");
                return { id: gen.id, session: gen.session, afterSeq: gen.lastSeq, read };
            }""",
        )
        result = await run_result(page)
        assert result["error"] == {"name": "TokenwireError", "code": "closed", "param": None, "lost": True}
        for _ in range(int(scaled(100))):  # until the server has seen the close (else it would want the resume_token)
            if not state.connections:
                break
            await asyncio.sleep(0.02)
        out = await evaluate(
            page,
            """async (which) => {
                const client = new tw.TokenwireClient();
                const gen = client.resume(which);
                const types = [];
                let text = "";
                for await (const ev of gen) { types.push(ev.type); if (ev.type === "token") text += ev.content; }
                client.close();
                return { types, text, finishReason: gen.finishReason, id: gen.id };
            }""",
            {"id": first["id"], "session": first["session"], "afterSeq": first["afterSeq"]},
        )
        assert out["types"][0] == "resumed" and "started" not in out["types"]
        assert first["read"] + out["text"] == reply and first["read"] and out["text"]
        assert out["finishReason"] == "stop" and out["id"] == first["id"]
        assert len(engine.requests) == 1 and not engine.aborted


async def test_a_resume_the_server_cannot_serve_throws_its_error_code_as_a_lost_generation() -> None:
    async with serving(FakeEngine()) as (base, _), browser_page() as page:
        await open_blank(page, base)
        out = await evaluate(
            page,
            """async () => {
                const client = new tw.TokenwireClient();
                const gen = client.resume({ id: "never-ran", session: "nope", afterSeq: 3 });
                try { for await (const ev of gen) { /* nothing */ } } catch (err) {
                    return { code: err.code, lost: err.lost, running: client._generations.size };
                } finally { client.close(); }
                return null;
            }""",
        )
        assert out == {"code": "not_found", "lost": True, "running": 0}


async def test_the_client_answers_the_servers_ping_with_pong() -> None:
    settings = ServerSettings(heartbeat_interval=0.1)
    async with serving(FakeEngine(), settings=settings) as (base, _), browser_page() as page:
        await page.add_init_script(
            """window.__sent = [];
            const send = WebSocket.prototype.send;
            WebSocket.prototype.send = function (data) { window.__sent.push(data); return send.call(this, data); };"""
        )
        await open_blank(page, base)
        await evaluate(page, "window.client = new tw.TokenwireClient(); window.client.connect()")
        await page.wait_for_function("window.__sent.length >= 2", timeout=MS)
        sent = [json.loads(s) for s in await page.evaluate("window.__sent")]
        assert all(m["type"] == "pong" and isinstance(m["ts"], (int, float)) for m in sent)


async def test_a_page_on_another_origin_imports_client_js_and_connects_to_the_server_it_came_from() -> None:
    """http://localhost:PORT is another origin than http://127.0.0.1:PORT: the import needs CORS, and with no URL
    the client connects to /ws of the server that served the module (a page on localhost may, by default)."""
    engine = FakeEngine(reply="From afar.", pieces=2)
    async with serving(engine) as (base, _), browser_page() as page:
        other = base.replace("127.0.0.1", "localhost")
        await open_blank(page, other, module=base + "/client.js")
        text = await evaluate(
            page,
            """async () => {
                const client = new tw.TokenwireClient();
                const gen = client.generate({ prompt: "Hi" });
                for await (const ev of gen) { /* read it all */ }
                client.close();
                return gen.text;
            }""",
        )
        assert text == "From afar." and len(engine.requests) == 1


async def test_the_example_page_in_docs_streams_an_answer() -> None:
    """docs/examples/browser-client.html, served as is from the server's origin: type, Send, the answer streams."""
    engine = FakeEngine(reply="Waves fold on the shore.", pieces=5, delay=0.02)
    async with serving(engine) as (base, _), browser_page() as page:
        await serve_page(page, base + "/example.html", EXAMPLE.read_text(encoding="utf-8"))
        await page.goto(base + "/example.html")
        await page.wait_for_selector("#send:not([disabled])", timeout=MS)
        await page.fill("#prompt", "A poem, please")
        await page.click("#send")
        await page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=MS)
        assert await page.text_content("#output") == engine.reply
        pieces = len(range(0, len(engine.reply), len(engine.reply) // 5))  # how the fake engine splits it
        assert await page.text_content("#status") == f"done (stop, {pieces} tokens)"
        messages = engine.requests[0].messages
        assert messages is not None and [(m.role, m.content) for m in messages] == [("user", "A poem, please")]


async def test_the_browser_example_in_clients_md_runs() -> None:
    """The ```js example of docs/clients.md, run as a module script in a page of the server's origin."""
    doc = (EXAMPLE.parents[1] / "clients.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"^```js\n(.*?)^```", doc, flags=re.DOTALL | re.MULTILINE)
    engine = FakeEngine(reply="Waves fold on the shore.", pieces=4)
    async with serving(engine) as (base, _), browser_page() as page:
        logged: list[str] = []
        page.on("console", lambda msg: logged.append(msg.text))
        await serve_page(page, base + "/example.html", BLANK)
        await page.goto(base + "/example.html")
        await page.add_script_tag(content=code, type="module")
        for _ in range(int(scaled(200))):
            if "connection: closed" in logged:
                break
            await asyncio.sleep(0.05)
    assert logged == [
        "connection: connecting", "connection: open", "connected to fake-model", "Waves fold on the shore.",
        "stop 4 tokens", "refused: invalid_request temperature", "connection: closed",
    ]  # fmt: skip
    assert engine.requests[0].messages is not None and engine.requests[0].params.max_tokens == 64
