"""The live dashboard in a real browser: it fills its tiles and charts from the server's own data."""

from __future__ import annotations

import asyncio

from playwright.async_api import async_playwright

from tests.conftest import scaled
from tests.e2e.browser import ARGS, require_chromium, screenshot_path
from tests.e2e.client import Client
from tests.e2e.server import RunningServer


async def test_dashboard_shows_live_figures_and_charts(tiny_server: RunningServer) -> None:
    chromium = require_chromium()
    c = await Client.connect(tiny_server.ws)
    for i in range(4):
        await c.send({"type": "generate", "id": f"d{i}", "prompt": "Hi", "max_tokens": 400, "ignore_eos": True})
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(tiny_server.http + "/dashboard")
            await page.wait_for_function("document.body.dataset.updated", timeout=scaled(10) * 1000)
            for i in range(4):
                await c.finish(f"d{i}")
            await asyncio.sleep(1.5)  # at least one more refresh after the requests finished
            total = int(await page.text_content("#v-total") or "0")
            assert total >= 4
            assert await page.text_content("#status") == "live"
            assert (await page.text_content("#v-ttft") or "").endswith("ms")
            # the tokens/s chart has drawn a line: some pixel of the canvas is not background
            drawn = await page.evaluate(
                """() => {
                    const c = document.getElementById('c-tps');
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
                    return n;
                }"""
            )
            assert drawn > 500
            await page.screenshot(path=str(screenshot_path("dashboard.png")), full_page=True)
        finally:
            await browser.close()
            await c.close()
