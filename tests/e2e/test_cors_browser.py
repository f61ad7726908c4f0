"""A web app's scripts call the OpenAI API of a tokenwire on this machine, in headless Chromium: a page on
another local origin (a development server's) streams an answer with ``fetch``; a page of a foreign origin is
stopped by its browser after the preflight.

The pages come from a real HTTP server, not from Playwright's routing: with routing on, Playwright answers CORS
preflights itself and the server under test would never see them. ``foreign.test`` resolves to that server
(``--host-resolver-rules``), so its page has a foreign origin."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import AsyncIterator, Iterator

from playwright.async_api import Page, async_playwright

from tests.e2e.browser import ARGS, require_chromium
from tests.e2e.server import serving
from tests.e2e.test_client_js import LNA, evaluate
from tests.fakes import FakeEngine

PAGE = b"<!DOCTYPE html><html><head><meta charset='utf-8'><title>app</title></head><body></body></html>"


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def page_server() -> Iterator[int]:
    """A web app's own server on 127.0.0.1 (any path: the blank page); yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.asynccontextmanager
async def app_page() -> AsyncIterator[tuple[Page, int]]:
    """A browser page and the port of the app server that serves its pages (also as http://foreign.test:PORT)."""
    chromium = require_chromium()
    with page_server() as port:
        async with async_playwright() as p:
            args = [*ARGS, f"--disable-features={LNA}", "--host-resolver-rules=MAP foreign.test 127.0.0.1"]
            browser = await p.chromium.launch(executable_path=chromium, args=args)
            try:
                yield await (await browser.new_context()).new_page(), port
            finally:
                await browser.close()


# POST a streamed chat completion with a JSON body (which needs a preflight) and gather the deltas from the SSE.
STREAM = """async (base) => {
    try {
        const r = await fetch(base + "/v1/chat/completions", {
            method: "POST",
            headers: { "Content-Type": "application/json", "Authorization": "Bearer unused" },
            body: JSON.stringify({ messages: [{ role: "user", content: "Hi" }], stream: true }),
        });
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let raw = "";
        for (;;) {
            const { done, value } = await reader.read();
            if (done) break;
            raw += decoder.decode(value, { stream: true });
        }
        const text = raw.split("\\n").filter((l) => l.startsWith("data: {"))
            .map((l) => JSON.parse(l.slice(6)).choices[0]?.delta?.content || "").join("");
        return { status: r.status, text, done: raw.includes("data: [DONE]") };
    } catch (err) {
        return { error: err.name };
    }
}"""


async def test_a_page_on_another_local_origin_streams_from_the_openai_api() -> None:
    engine = FakeEngine(reply="Hello from the API.", pieces=4)
    async with serving(engine) as (base, _), app_page() as (page, port):
        await page.goto(f"http://localhost:{port}/app.html")  # a local development server's page
        got = await evaluate(page, STREAM, base)
        assert got == {"status": 200, "text": "Hello from the API.", "done": True}
        assert len(engine.requests) == 1


async def test_a_page_of_a_foreign_origin_is_stopped_by_its_browser() -> None:
    engine = FakeEngine(reply="Hello from the API.")
    async with serving(engine) as (base, _), app_page() as (page, port):
        await page.goto(f"http://foreign.test:{port}/app.html")
        got = await evaluate(page, STREAM, base)
        assert got == {"error": "TypeError"}  # the preflight was refused: the request was never sent
        assert engine.requests == []
