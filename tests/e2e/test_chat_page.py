"""The chat page at / in headless Chromium, against a real server on a scripted engine (tests/fakes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Page, async_playwright

from tests.conftest import scaled
from tests.e2e.browser import ARGS, require_chromium, screenshot_path
from tests.e2e.server import free_port, serving
from tests.fakes import FakeEngine
from tokenwire.engine.interface import EngineError, EngineErrorCode
from tokenwire.server.admission.auth import AuthPolicy
from tokenwire.server.requests.params import Limits
from tokenwire.server.settings import ServerSettings

MS = scaled(10) * 1000  # Playwright timeouts, in milliseconds


@contextlib.asynccontextmanager
async def browser_page(**context: Any) -> AsyncIterator[Page]:
    chromium = require_chromium()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            ctx = await browser.new_context(**context)
            yield await ctx.new_page()
        finally:
            await browser.close()


async def open_chat(page: Page, base: str) -> None:
    await page.goto(base + "/")
    await page.wait_for_selector('#conn[data-state="open"]', timeout=MS)


async def ask(page: Page, text: str) -> None:
    await page.fill("#prompt", text)
    await page.press("#prompt", "Enter")


async def last_answer(page: Page, state: str = "done") -> Any:
    """The latest answer, once it is in ``state`` (an earlier answer in that state does not count)."""
    return await page.wait_for_selector(f'.msg.assistant:last-child[data-state="{state}"]', timeout=MS)


async def test_answer_streams_in_steps_and_the_conversation_is_sent_as_messages() -> None:
    engine = FakeEngine(reply="The answer is **42**.\n\n- one\n- two", pieces=8, delay=0.05)
    async with serving(engine) as (base, _), browser_page() as page:
        await open_chat(page, base)
        await ask(page, "What is it?")
        answer = await last_answer(page)
        assert int(await answer.get_attribute("data-updates") or 0) >= 3  # it grew in several steps
        body = await answer.query_selector(".body")
        assert body is not None
        assert "The answer is 42." in (await body.inner_text())
        assert await body.eval_on_selector("strong", "e => e.textContent") == "42"
        assert await body.eval_on_selector_all("li", "els => els.length") == 2
        figures = await answer.eval_on_selector(".figures", "e => e.textContent")
        chunks = -(-len(engine.reply) // (len(engine.reply) // 8))  # the fake engine's token count
        assert re.fullmatch(rf"TTFT \d+ ms · 100\.0 tok/s · {chunks} tokens", figures), figures
        assert await answer.get_attribute("aria-busy") == "false"
        await ask(page, "And then?")
        await page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 2")
        sent = engine.requests[-1].messages
        assert sent is not None
        assert [(m.role, m.content) for m in sent] == [
            ("user", "What is it?"),
            ("assistant", engine.reply),
            ("user", "And then?"),
        ]
        await page.screenshot(path=str(screenshot_path("chat-conversation.png")), full_page=True)


async def test_enter_sends_and_shift_enter_makes_a_new_line() -> None:
    engine = FakeEngine()
    async with serving(engine) as (base, _), browser_page() as page:
        await open_chat(page, base)
        await page.click("#prompt")
        await page.keyboard.type("line one")
        await page.keyboard.press("Shift+Enter")
        await page.keyboard.type("line two")
        assert await page.input_value("#prompt") == "line one\nline two"
        assert engine.requests == []
        await page.keyboard.press("Enter")
        await last_answer(page)
        assert engine.requests[-1].messages is not None
        assert engine.requests[-1].messages[-1].content == "line one\nline two"


async def test_stop_cancels_the_running_answer() -> None:
    engine = FakeEngine(reply="word " * 300, pieces=300, delay=0.02)
    async with serving(engine) as (base, _), browser_page() as page:
        await open_chat(page, base)
        await ask(page, "Talk")
        await page.wait_for_function(
            "Number(document.querySelector('.msg.assistant')?.dataset.updates || 0) >= 2", timeout=MS
        )
        await page.click("#stop")
        answer = await last_answer(page, "stopped")
        text = await answer.inner_text()
        assert "stopped" in text
        assert len(engine.aborted) == 1
        before = await answer.eval_on_selector(".body", "e => e.textContent.length")
        await asyncio.sleep(0.5)
        assert await answer.eval_on_selector(".body", "e => e.textContent.length") == before
        assert before < len(engine.reply)
        assert await page.is_hidden("#stop") and await page.is_enabled("#send")


async def drop_every_socket(state: Any) -> None:
    for conn in list(state.connections):
        await conn.ws.close(1012)  # the server drops the socket, as a restarting proxy or a lost network would


async def updates(page: Page, at_least: int) -> None:
    await page.wait_for_function(
        f"Number(document.querySelector('.msg.assistant:last-child')?.dataset.updates || 0) >= {at_least}", timeout=MS
    )


async def test_a_dropped_socket_resumes_the_running_answer_without_losing_or_repeating_text() -> None:
    """Twice during one answer the server drops the socket; the page reconnects, resumes from the last seq it saw,
    and the answer ends whole: exactly the engine's text, one request, nothing regenerated."""
    reply = " ".join(f"w{i}" for i in range(240))
    engine = FakeEngine(reply=reply, pieces=240, delay=0.02)
    async with serving(engine) as (base, state), browser_page() as page:
        await open_chat(page, base)
        await ask(page, "Count for me")
        await page.evaluate(  # remember every note shown, however briefly
            """window.__notes = [];
            new MutationObserver(() => document.querySelectorAll('.note').forEach(
                (n) => window.__notes.push(n.textContent))).observe(document.body, {subtree: true, childList: true});"""
        )
        tokens = set()
        for at_least in (2, 40):
            await updates(page, at_least)
            tokens |= {c.ws.query_params.get("affinity") for c in state.connections}
            await drop_every_socket(state)
            await page.wait_for_selector('#conn[data-state="reconnecting"]', timeout=MS, state="attached")
        answer = await last_answer(page)
        assert await answer.eval_on_selector(".body", "e => e.textContent") == reply
        tokens |= {c.ws.query_params.get("affinity") for c in state.connections}
        assert len(tokens) == 1 and None not in tokens  # one ?affinity= token for the tab (see deploy/nginx.conf)
        assert len(engine.requests) == 1 and not engine.aborted
        assert "tokens" in await answer.inner_text() and "connection lost" not in await answer.inner_text()
        assert "connection lost; resuming…" in await page.evaluate("window.__notes")
        assert state.generations.journals()[0].holder is None  # delivered: no connection holds it any more
        await page.screenshot(path=str(screenshot_path("chat-resumed.png")), full_page=True)


class HalfOpeningProxy:
    """A TCP proxy on 127.0.0.1 whose client sides can be cut while its server sides stay open: what a server sees
    when a client's network goes away silently (a half-open socket, up to 40 s before pings tell)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[asyncio.Task[None]]]] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HalfOpeningProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for client, upstream, pumps in self._pairs:
            for task in pumps:
                task.cancel()
            for writer in (client, upstream):
                writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        pumps = [asyncio.create_task(self._pipe(reader, up_writer)), asyncio.create_task(self._pipe(up_reader, writer))]
        self._pairs.append((writer, up_writer, pumps))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    def cut_clients(self) -> None:
        """Drop every client side at once; the server sides stay open and hear nothing."""
        for client, _, pumps in self._pairs:
            for task in pumps:
                task.cancel()
            client.transport.abort()


async def test_a_half_open_socket_hands_the_answer_over_to_the_reconnected_page() -> None:
    """The page's network goes away but the server still holds its connection open. The page reconnects and
    resumes with the answer's resume_token, which takes the answer over from the open connection: the answer ends
    whole, with no new request (without the token, the server would refuse to hand it over)."""
    reply = " ".join(f"h{i}" for i in range(240))
    engine = FakeEngine(reply=reply, pieces=240, delay=0.02)
    async with (
        serving(engine) as (base, state),
        HalfOpeningProxy(int(base.rsplit(":", 1)[1])) as proxy,
        browser_page() as page,
    ):
        await open_chat(page, f"http://127.0.0.1:{proxy.port}")
        await ask(page, "Count for me")
        await updates(page, 5)
        old = list(state.connections)
        proxy.cut_clients()
        answer = await last_answer(page)
        assert await answer.eval_on_selector(".body", "e => e.textContent") == reply
        assert len(engine.requests) == 1 and not engine.aborted
        assert len(old) == 1 and old[0].is_open and old[0] in state.connections  # it was taken from an open one
        journal = state.generations.journals()[0]
        assert journal.bound is not old[0] and journal.bound in state.connections


async def test_a_reload_keeps_the_conversation_and_resumes_the_running_answer() -> None:
    """Reloading the tab mid-answer: the conversation is back, the answer goes on from where the old page stopped
    reading (no text lost or repeated, no new request), and the next question carries the whole history."""
    reply = " ".join(f"r{i}" for i in range(200))
    engine = FakeEngine(reply="First answer.", pieces=2)
    async with serving(engine) as (base, _), browser_page() as page:
        await open_chat(page, base)
        await ask(page, "One")
        await last_answer(page)
        engine.reply, engine.pieces, engine.delay = reply, 200, 0.02
        await ask(page, "Two")
        await updates(page, 3)
        await page.reload()
        await page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 2")
        bodies = await page.eval_on_selector_all(".msg.assistant .body", "els => els.map(e => e.textContent)")
        assert bodies == ["First answer.", reply]
        assert await page.eval_on_selector_all(".msg.user", "els => els.map(e => e.textContent)") == ["One", "Two"]
        assert len(engine.requests) == 2 and not engine.aborted
        engine.reply, engine.pieces, engine.delay = "Three.", 1, 0.0
        await ask(page, "Three")
        await page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 3")
        assert [(m.role, m.content) for m in engine.requests[-1].messages or ()] == [
            ("user", "One"),
            ("assistant", "First answer."),
            ("user", "Two"),
            ("assistant", reply),
            ("user", "Three"),
        ]
        await page.click("#new-chat")
        await page.reload()
        await page.wait_for_selector('#conn[data-state="open"]', timeout=MS)
        assert await page.eval_on_selector_all(".msg", "e => e.length") == 0  # New chat is remembered too


async def test_stop_while_disconnected_cancels_the_answer_once_reconnected() -> None:
    engine = FakeEngine(reply="slow " * 300, pieces=300, delay=0.02)
    async with serving(engine) as (base, state), browser_page() as page:
        await open_chat(page, base)
        await ask(page, "Tell me")
        await updates(page, 2)
        await drop_every_socket(state)
        await page.wait_for_selector('#conn[data-state="reconnecting"]', timeout=MS, state="attached")
        await page.click("#stop")
        answer = await last_answer(page, "stopped")
        assert "stopped" in await answer.inner_text()
        assert len(engine.aborted) == 1 and len(engine.requests) == 1


async def test_after_a_server_restart_the_lost_answer_is_marked_and_can_be_regenerated() -> None:
    """A restarted server knows nothing of the running answer: resume is refused, the page says the answer is
    incomplete, and Regenerate asks the new server."""
    port = free_port()
    async with browser_page() as page:
        async with serving(FakeEngine(reply="slow " * 200, pieces=200, delay=0.03), port) as (base, _):
            await open_chat(page, base)
            await ask(page, "Tell me")
            await updates(page, 1)
        fresh = FakeEngine(reply="Back again.", pieces=3, delay=0.01)
        async with serving(fresh, port):
            interrupted = await last_answer(page, "interrupted")
            assert "connection lost" in await interrupted.inner_text()
            await page.wait_for_selector('#conn[data-state="open"]', timeout=MS)
            await page.click(".regen")
            answer = await last_answer(page)
            assert "Back again." in await answer.inner_text()
            assert [(m.role, m.content) for m in fresh.requests[-1].messages or ()] == [("user", "Tell me")]
            await page.screenshot(path=str(screenshot_path("chat-reconnected.png")), full_page=True)


XSS = (
    '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> '
    "[click](javascript:window.__xss=3) [ok](https://example.com/a) `<b>code</b>`"
)


async def test_model_output_cannot_inject_html_or_script() -> None:
    engine = FakeEngine(reply=XSS, pieces=5, delay=0.01)
    async with serving(engine) as (base, _), browser_page() as page:
        await open_chat(page, base)
        await ask(page, "Say something nasty")
        answer = await last_answer(page)
        await asyncio.sleep(0.3)
        assert await page.evaluate("window.__xss") is None
        assert await page.eval_on_selector_all(".messages img, .messages script, .messages b", "e => e.length") == 0
        text = await answer.inner_text()
        assert '<img src=x onerror="window.__xss=1">' in text and "<script>" in text
        links = await answer.eval_on_selector_all("a", "els => els.map(a => [a.textContent, a.href, a.rel])")
        assert links == [["ok", "https://example.com/a", "noopener noreferrer nofollow"]]
        assert "[click](javascript:window.__xss=3)" in text
        await page.screenshot(path=str(screenshot_path("chat-xss-as-text.png")), full_page=True)


async def test_markdown_code_blocks_lists_and_tables_render() -> None:
    reply = "Here:\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n1. first\n2. second\n"
    engine = FakeEngine(reply=reply, pieces=6, delay=0.01)
    async with serving(engine) as (base, _), browser_page() as page:
        await open_chat(page, base)
        await ask(page, "Show me")
        answer = await last_answer(page)
        assert await answer.eval_on_selector("pre code", "e => e.textContent") == "print('hi')"
        assert await answer.eval_on_selector("pre code", "e => e.dataset.lang") == "python"
        assert await answer.query_selector('pre button[aria-label="Copy code"]') is not None
        assert await answer.eval_on_selector_all("table th", "e => e.map(x => x.textContent)") == ["a", "b"]
        assert await answer.eval_on_selector_all("table td", "e => e.map(x => x.textContent)") == ["1", "2"]
        assert await answer.eval_on_selector_all("ol li", "e => e.length") == 2


async def test_settings_are_remembered_and_sent() -> None:
    engine = FakeEngine()
    async with serving(engine) as (base, _), browser_page() as page:
        await open_chat(page, base)
        await page.click("#settings-toggle")
        await page.fill("#system", "Be terse.")
        await page.fill("#max-tokens", "77")
        await page.reload()
        await page.wait_for_selector('#conn[data-state="open"]', timeout=MS)
        assert await page.input_value("#system") == "Be terse."
        assert await page.input_value("#max-tokens") == "77"
        await ask(page, "Hi")
        await last_answer(page)
        req = engine.requests[-1]
        assert req.params.max_tokens == 77
        assert req.messages is not None and (req.messages[0].role, req.messages[0].content) == ("system", "Be terse.")


async def test_new_chat_and_regenerate() -> None:
    engine = FakeEngine(reply="First.", pieces=2)
    async with serving(engine) as (base, _), browser_page() as page:
        await open_chat(page, base)
        await ask(page, "One")
        await last_answer(page)
        engine.reply = "Second."
        await page.click(".regen")
        await page.wait_for_function(
            "document.querySelector('.msg.assistant[data-state=done] .body')?.textContent === 'Second.'", timeout=MS
        )
        assert await page.eval_on_selector_all(".msg.assistant", "e => e.length") == 1
        assert [(m.role, m.content) for m in engine.requests[-1].messages or ()] == [("user", "One")]
        await page.click("#new-chat")
        assert await page.eval_on_selector_all(".msg", "e => e.length") == 0
        await ask(page, "Fresh")
        await last_answer(page)
        assert [(m.role, m.content) for m in engine.requests[-1].messages or ()] == [("user", "Fresh")]


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_phone_sized_viewport_fits_and_has_labels(scheme: str) -> None:
    engine = FakeEngine(reply="A reply that wraps on a small screen. " * 4, pieces=4)
    async with (
        serving(engine) as (base, _),
        browser_page(viewport={"width": 390, "height": 800}, color_scheme=scheme, is_mobile=True) as page,
    ):
        await open_chat(page, base)
        await ask(page, "Hello from a phone")
        await last_answer(page)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert await page.is_visible("#prompt") and await page.is_visible("#send")
        assert await page.get_attribute("#prompt", "aria-label") == "Message"
        assert await page.get_attribute("#messages", "role") == "log"
        # keyboard alone: Tab reaches the message box and the send button
        await page.focus("#prompt")
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.id") in ("send", "stop")
        await page.screenshot(path=str(screenshot_path(f"chat-phone-{scheme}.png")), full_page=True)


async def active(page: Page) -> str:
    """The focused element, as tag#id.class."""
    return str(
        await page.evaluate(
            "(() => { const e = document.activeElement; return e.tagName.toLowerCase() + (e.id ? '#' + e.id : '')"
            " + (e.className ? '.' + String(e.className).split(' ').join('.') : ''); })()"
        )
    )


async def tab_to(page: Page, selector: str, most: int = 25) -> None:
    """Press Tab until ``selector`` has the focus, as a keyboard user would; fail if it never gets it."""
    for _ in range(most):
        if await page.evaluate(f"document.activeElement.matches({selector!r})"):
            return
        await page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached {selector}; the focus is on {await active(page)}")


async def test_everything_works_with_the_keyboard_alone() -> None:
    """No mouse: type and Enter; Escape stops; Tab reaches Stop, the settings (Escape closes them), Regenerate,
    a code block's Copy and New chat, each working with Enter; after Stop the focus returns to the message box."""
    engine = FakeEngine(reply="slow " * 300, pieces=300, delay=0.02)
    async with (
        serving(engine) as (base, _),
        browser_page(permissions=["clipboard-read", "clipboard-write"]) as page,
    ):
        await open_chat(page, base)
        assert await active(page) == "textarea#prompt"  # focused on load
        await page.keyboard.type("Talk")
        await page.keyboard.press("Enter")
        await updates(page, 2)
        await page.keyboard.press("Escape")
        await last_answer(page, "stopped")
        assert len(engine.aborted) == 1

        await page.keyboard.type("More")
        await page.keyboard.press("Enter")
        await updates(page, 2)
        await page.keyboard.press("Tab")  # Send is disabled while answering, so the next stop is Stop
        assert await active(page) == "button#stop"
        await page.keyboard.press("Enter")
        await page.wait_for_selector('.msg.assistant:last-child[data-state="stopped"]', timeout=MS)
        assert len(engine.aborted) == 2 and await active(page) == "textarea#prompt"

        await tab_to(page, "#settings-toggle")
        await page.keyboard.press("Enter")
        assert await page.is_visible("#settings")
        assert await page.get_attribute("#settings-toggle", "aria-expanded") == "true"
        await tab_to(page, "#system")
        await page.keyboard.type("Be brief.")
        await tab_to(page, "#max-tokens")
        await page.keyboard.press("Control+A")
        await page.keyboard.type("33")
        await page.screenshot(path=str(screenshot_path("chat-settings-by-keyboard.png")), full_page=True)
        await page.keyboard.press("Escape")
        assert await page.is_hidden("#settings") and await active(page) == "button#settings-toggle"

        engine.reply, engine.pieces, engine.delay = "Use:\n\n```sh\nls -la\n```\n", 3, 0.0
        await tab_to(page, "#prompt")
        await page.keyboard.type("How do I list files?")
        await page.keyboard.press("Enter")
        await page.wait_for_selector('.msg.assistant:last-child[data-state="done"]', timeout=MS)
        req = engine.requests[-1]
        assert req.params.max_tokens == 33
        assert req.messages is not None and (req.messages[0].role, req.messages[0].content) == ("system", "Be brief.")

        await tab_to(page, "pre .copy")
        await page.keyboard.press("Enter")
        await page.wait_for_function("document.querySelector('pre .copy').textContent === 'Copied'", timeout=MS)
        assert await page.evaluate("navigator.clipboard.readText()") == "ls -la"

        before = len(engine.requests)
        await page.eval_on_selector(".msg.assistant:last-child", "e => { e.dataset.old = '1'; }")
        await tab_to(page, ".regen")
        await page.keyboard.press("Enter")
        await page.wait_for_selector('.msg.assistant:last-child:not([data-old])[data-state="done"]', timeout=MS)
        assert len(engine.requests) == before + 1 and await page.query_selector("[data-old]") is None

        await tab_to(page, "#new-chat")
        await page.keyboard.press("Enter")
        assert await page.eval_on_selector_all(".msg", "e => e.length") == 0
        assert await active(page) == "textarea#prompt"


async def test_copy_works_where_the_clipboard_api_is_missing() -> None:
    """Over plain http to another host there is no navigator.clipboard: Copy falls back to copying a selection."""
    engine = FakeEngine(reply="```\nrm -rf build/\n```", pieces=2)
    async with serving(engine) as (base, _), browser_page() as page:
        await page.add_init_script(
            """Object.defineProperty(Navigator.prototype, 'clipboard', {get: () => undefined});
            window.__copied = [];
            document.addEventListener('copy', () => {
                const a = document.activeElement;
                window.__copied.push(a.value.substring(a.selectionStart, a.selectionEnd));
            });"""
        )
        await open_chat(page, base)
        assert await page.evaluate("navigator.clipboard") is None
        await ask(page, "Clean up")
        answer = await last_answer(page)
        await page.click("pre .copy")
        assert await answer.eval_on_selector("pre .copy", "b => b.textContent") == "Copied"
        assert await page.evaluate("window.__copied") == ["rm -rf build/"]
        assert await page.evaluate("document.querySelectorAll('body > textarea').length") == 0  # the helper is gone


async def test_theme_follows_the_system_and_the_button_switches_it_and_is_remembered() -> None:
    engine = FakeEngine()
    background = "getComputedStyle(document.body).backgroundColor"
    async with serving(engine) as (base, _), browser_page(color_scheme="dark") as page:
        await open_chat(page, base)
        dark = await page.evaluate(background)
        assert dark == "rgb(15, 20, 25)"
        await page.click("#theme")
        assert await page.evaluate(background) == "rgb(246, 247, 249)"
        await page.reload()
        await page.wait_for_selector('#conn[data-state="open"]', timeout=MS)
        assert await page.evaluate(background) == "rgb(246, 247, 249)"  # light, though the system is dark
        await page.click("#theme")
        assert await page.evaluate(background) == dark


@pytest.mark.parametrize("key", ["plain-token.key_1", "has spaces/+&=?#"])
async def test_the_page_asks_for_the_key_says_when_it_is_wrong_and_sends_it(key: str) -> None:
    """A key that is a valid token goes as the subprotocol bearer.KEY; any other as ?api_key= (URL-encoded)."""
    engine = FakeEngine(reply="Welcome.", pieces=2)
    async with serving(engine, auth=AuthPolicy(api_keys=(key,))) as (base, state), browser_page() as page:
        await page.goto(base + "/")
        await page.wait_for_selector("#key-form:not([hidden])", timeout=MS)
        assert await page.text_content("#conn") == "API key needed"
        assert await active(page) == "input#api-key"
        await page.keyboard.type("wrong")
        await page.keyboard.press("Enter")
        await page.wait_for_function("document.getElementById('conn').textContent === 'API key rejected'", timeout=MS)
        assert await page.is_visible("#key-form")
        await page.screenshot(path=str(screenshot_path("chat-key-rejected.png")), full_page=True)
        await page.fill("#api-key", key)
        await page.press("#api-key", "Enter")
        await page.wait_for_selector('#conn[data-state="open"]', timeout=MS)
        (conn,) = state.connections
        if key.startswith("plain"):
            assert conn.ws.scope["subprotocols"] == [f"bearer.{key}"] and "api_key" not in conn.ws.query_params
        else:
            assert conn.ws.query_params["api_key"] == key and not conn.ws.scope.get("subprotocols")
        await ask(page, "Hi")
        assert "Welcome." in await (await last_answer(page)).inner_text()


async def test_a_conversation_longer_than_the_context_drops_its_oldest_turns_and_says_so() -> None:
    engine = FakeEngine(reply="Noted.", pieces=1)
    engine.context_turns = 2  # the fake model's context holds two turns
    async with serving(engine) as (base, _), browser_page() as page:
        await open_chat(page, base)
        await ask(page, "One")
        first = await last_answer(page)
        assert await first.query_selector(".note") is None
        await ask(page, "Two")
        await page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length === 2")
        assert engine.requests[-1].truncate
        note = await page.eval_on_selector(".msg.assistant:last-child .note", "e => e.textContent")
        assert note == "the oldest message was left out to fit the model's context"
        await ask(page, "Three")
        await page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length === 3")
        note = await page.eval_on_selector(".msg.assistant:last-child .note", "e => e.textContent")
        assert note == "the 3 oldest messages were left out to fit the model's context"


async def test_the_page_keeps_within_the_servers_limits_instead_of_losing_the_connection() -> None:
    """hello's limits: a question bigger than max_message_bytes is refused on the page (the text stays in the
    box, the connection stays up); a history that outgrows it leaves out its oldest turns, starting on a
    question; max tokens is capped at the server's."""
    engine = FakeEngine(reply="Ok.", pieces=1)
    limits = Limits(max_message_bytes=1500, max_tokens=100)
    settings = ServerSettings(limits=limits, heartbeat_interval=0)
    async with serving(engine, settings=settings) as (base, state), browser_page() as page:
        await open_chat(page, base)
        (first_connection,) = state.connections
        await ask(page, "é" * 1000)  # 2000 bytes of UTF-8
        await page.wait_for_selector("#problem:not([hidden])", timeout=MS)
        assert "at most 1500 bytes" in (await page.text_content("#problem") or "")
        assert await page.input_value("#prompt") == "é" * 1000 and engine.requests == []
        await page.fill("#prompt", "")
        assert await page.is_hidden("#problem")
        for n in range(3):
            await ask(page, f"q{n} " + "x" * 500)
            await page.wait_for_function(
                f"document.querySelectorAll('.msg.assistant[data-state=done]').length === {n + 1}", timeout=MS
            )
        sent = engine.requests[-1].messages or ()
        assert [m.content[:2] for m in sent] == ["q1", "Ok", "q2"]  # q0 and its answer were left out
        assert engine.requests[-1].params.max_tokens == 100  # the page's 512, capped
        note = await page.eval_on_selector(".msg.assistant:last-child .note", "e => e.textContent")
        assert note == "the 2 oldest messages were left out to fit the model's context"
        assert list(state.connections) == [first_connection]  # never dropped


async def test_a_failed_answer_says_why_and_its_question_is_not_sent_again() -> None:
    engine = FakeEngine(reply="Fine.", pieces=1)
    engine.fail_with = EngineError(EngineErrorCode.OVERLOADED, "the server is busy; try again")
    async with serving(engine) as (base, _), browser_page() as page:
        await open_chat(page, base)
        await ask(page, "First try")
        failed = await last_answer(page, "error")
        assert "the server is busy; try again" in await failed.inner_text()
        engine.fail_with = None
        await ask(page, "Something else")
        await page.wait_for_selector('.msg.assistant:last-child[data-state="done"]', timeout=MS)
        assert [(m.role, m.content) for m in engine.requests[-1].messages or ()] == [("user", "Something else")]
        assert await page.eval_on_selector_all(".msg.user", "e => e.map(x => x.textContent)") == [
            "First try",
            "Something else",
        ]


async def test_the_page_and_the_dashboard_work_under_a_path_prefix() -> None:
    """Behind a proxy that serves tokenwire under /llm/, every URL the pages use is relative: the styles load,
    the WebSocket connects to /llm/ws and the dashboard reads /llm/v1/stats."""
    engine = FakeEngine(reply="From under a prefix.", pieces=3)
    async with serving(engine, prefix="/llm") as (base, state), browser_page() as page:
        assert base.endswith("/llm")
        await page.goto(base + "/")
        await page.wait_for_selector('#conn[data-state="open"]', timeout=MS)
        assert await page.evaluate("getComputedStyle(document.querySelector('.app')).display") == "flex"
        (conn,) = state.connections
        assert conn.ws.scope["root_path"] == "/llm" and conn.ws.query_params.get("affinity")
        await ask(page, "Hi")
        assert "From under a prefix." in await (await last_answer(page)).inner_text()
        await page.goto(base + "/dashboard")
        await page.wait_for_function("/^\\d+$/.test(document.getElementById('v-running').textContent)", timeout=MS)


async def test_reconnects_back_off_exponentially_and_the_page_comes_back_when_the_server_does() -> None:
    """With the server gone, retries wait 0.5 s, 1 s, 2 s, ... (each +-25% jitter), shown in the header; once the
    server is back on its port, the page connects again and works."""
    port = free_port()
    async with browser_page() as page:
        async with serving(FakeEngine(), port) as (base, _):
            await open_chat(page, base)
            await page.evaluate(
                """window.__waits = [];
                new MutationObserver(() => {
                    const m = /retrying in ([0-9.]+) s/.exec(document.getElementById('conn').textContent);
                    if (m) window.__waits.push(parseFloat(m[1]));
                }).observe(document.getElementById('conn'), {childList: true, characterData: true, subtree: true});"""
            )
        await page.wait_for_function("window.__waits.length >= 3", timeout=scaled(15) * 1000)
        waits = await page.evaluate("window.__waits")
        for i, wait in enumerate(waits[:3]):
            assert 0.5 * 2**i * 0.75 - 0.05 <= wait <= 0.5 * 2**i * 1.25 + 0.05, waits
        engine = FakeEngine(reply="Back.", pieces=1)
        async with serving(engine, port):
            await page.wait_for_selector('#conn[data-state="open"]', timeout=scaled(15) * 1000)
            await ask(page, "Still there?")
            assert "Back." in await (await last_answer(page)).inner_text()


async def test_a_broadcast_notice_is_shown_above_the_conversation_and_can_be_dismissed() -> None:
    """The operator's notice appears as text (never HTML) in an alert; its button hides it."""
    import httpx

    async with serving(FakeEngine(), admin_key="adm") as (base, _), browser_page() as page:
        await open_chat(page, base)
        async with httpx.AsyncClient(base_url=base) as http:
            r = await http.post(
                "/v1/admin/broadcast",
                json={"message": "Back in <b>5</b> minutes", "level": "warning"},
                headers={"Authorization": "Bearer adm"},
            )
            assert r.json() == {"delivered": 1}
        notice = await page.wait_for_selector("#notice:not([hidden])", timeout=MS)
        assert await notice.get_attribute("role") == "alert"
        assert await notice.get_attribute("data-level") == "warning"
        assert await page.inner_text("#notice-text") == "Back in <b>5</b> minutes"
        await page.screenshot(path=str(screenshot_path("chat-notice.png")), full_page=True)
        await page.click("#notice-close")
        await page.wait_for_selector("#notice", state="hidden", timeout=MS)
