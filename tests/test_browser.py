"""The live page in a real browser: Debian's Chromium, driven by Playwright, against real ``pricegate demo`` processes.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (``./run-tests`` installs Debian's
package when it is missing). Without it the tests skip, and under ``CI=true`` they fail. Screenshots land in
``test-artifacts/`` (gitignored).

What a person would check: a row for every symbol of the market, prices that move, a lag readout that is a number,
a sparkline, the connection state through a server crash and restart on the same port, a phone-width layout that
never scrolls sideways, a gateway with ``PRICEGATE_AUTH=jwt`` and the token in the page's URL, and no console
errors from the page. While the server is down the browser itself logs each failed connection attempt (Chromium
reports "WebSocket connection to … failed" and "Failed to load resource" as console errors, whatever the page does);
those, and only while the server is down, are expected.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import service_missing
from tests.processes import PricegateProcess, free_port, start_pricegate

if os.environ.get("CI") != "true":  # under CI a missing Playwright is an import error, not a skip
    pytest.importorskip("playwright.async_api", reason="Playwright is in the test extra: ./run-tests installs it")
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SERVING = r"pricegate is serving on http://127\.0\.0\.1:\d+"
SECRET = "a-browser-test-secret-of-32-bytes!!"
EMPTY = "\u2013"  # the page's en dash in a cell that has no value yet
# What Chromium itself logs for a connection attempt to a server that is not there (not the page's doing).
BROWSER_NETWORK_FAILURE = re.compile(
    r"^(WebSocket connection to '.*' failed: .*|Failed to load resource: net::ERR_CONNECTION_(REFUSED|RESET))$"
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        service_missing(
            f"{CHROMIUM} (./run-tests installs Debian's chromium package: apt-get install chromium)",
            FileNotFoundError(str(CHROMIUM)),
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


class Console:
    """Every console error and uncaught exception of a page, with the phase of the test it happened in."""

    def __init__(self, page: Page) -> None:
        self.phase = "up"
        self.entries: list[tuple[str, str]] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.entries.append((self.phase, f"uncaught: {error}")))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.entries.append((self.phase, message.text))

    def unexpected(self, allowed: re.Pattern[str] | None = None) -> list[tuple[str, str]]:
        return [
            (phase, text)
            for phase, text in self.entries
            if not (phase == "down" and BROWSER_NETWORK_FAILURE.match(text))
            and not (allowed is not None and allowed.match(text))
        ]


async def start_demo(port: int, **env: str) -> PricegateProcess:
    demo = await start_pricegate("demo", "--port", str(port), "--shutdown-drain-s", "1", env=env)
    await demo.wait_for_line(SERVING)
    return demo


async def market_symbols(base: str, token: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=base, headers=headers) as client:
        info = (await client.get("/api/v3/exchangeInfo")).json()
    return [entry["symbol"] for entry in info["symbols"] if entry["status"] == "TRADING"]


async def row_texts(page: Page, cell: str) -> dict[str, str]:
    texts: dict[str, str] = await page.eval_on_selector_all(
        f"#rows [data-symbol] .{cell}",
        "cells => Object.fromEntries(cells.map(c => [c.parentElement.dataset.symbol, c.textContent]))",
    )
    return texts


async def wait_for_filled_rows(page: Page, symbols: list[str], timeout_ms: float = 10_000) -> None:
    """Every symbol has a row whose last price, bid and ask are numbers."""
    await page.wait_for_function(
        """symbols => symbols.every(s => {
            const row = document.querySelector(`#rows [data-symbol="${s}"]`);
            const number = cls => /\\d/.test(row?.querySelector(`.${cls}`)?.textContent ?? "");
            return row && !row.hidden && number("last") && number("bid") && number("ask");
        })""",
        arg=symbols,
        timeout=timeout_ms,
    )


async def wait_for_status(page: Page, state: str, timeout_ms: float = 20_000) -> str:
    await page.wait_for_function(
        "state => document.getElementById('status').dataset.state === state", arg=state, timeout=timeout_ms
    )
    return await page.inner_text("#status")


async def wait_for_price_change(page: Page, timeout_ms: float = 10_000) -> None:
    before = await row_texts(page, "last")
    await page.wait_for_function(
        """before => [...document.querySelectorAll('#rows [data-symbol] .last')]
            .some(c => before[c.parentElement.dataset.symbol] !== c.textContent)""",
        arg=before,
        timeout=timeout_ms,
    )


def lag_ms(text: str) -> int:
    assert re.fullmatch(r"\d+", text), f"the lag readout is not a number of milliseconds: {text!r}"
    return int(text)


async def test_the_page_shows_the_market_live_and_fits_a_phone(browser: Browser) -> None:
    port = free_port()
    demo = await start_demo(port)
    base = f"http://127.0.0.1:{port}"
    try:
        symbols = await market_symbols(base)
        assert len(symbols) >= 5
        context = await browser.new_context(viewport={"width": 1200, "height": 640})
        page = await context.new_page()
        console = Console(page)
        await page.goto(f"{base}/")
        await wait_for_filled_rows(page, symbols)
        assert await page.eval_on_selector_all("#rows [data-symbol]", "rows => rows.map(r => r.dataset.symbol)") == (
            symbols
        )
        assert (await wait_for_status(page, "live")) == "live"
        await wait_for_price_change(page)
        await page.wait_for_function("() => /^\\d+$/.test(document.getElementById('lag').textContent)")
        assert lag_ms(await page.inner_text("#lag")) < 5000  # one machine, one clock: far below a second
        assert all(lag_ms(text) < 5000 for text in (await row_texts(page, "lag")).values() if text != EMPTY)
        changes = await row_texts(page, "chg")
        assert all(re.fullmatch(r"[+-]?\d+\.\d\d %", text) for text in changes.values()), changes
        # The sparklines were filled from the last minutes' klines and keep moving with live prices.
        points = await page.eval_on_selector_all(
            "#rows svg.sparkline polyline", "lines => lines.map(line => line.getAttribute('points'))"
        )
        assert len(points) == len(symbols) and all(p.count(",") >= 2 for p in points)
        # The favicon is the hashed SVG, served immutable.
        icon = await page.get_attribute("link[rel=icon]", "href")
        assert icon is not None and re.fullmatch(r"/static/favicon\.[0-9a-f]{12}\.svg", icon)
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "ticker-wide.png"))

        # The symbol picker: unticking a symbol hides its row and unsubscribes it; ticking it brings it back at once.
        await page.click("#picker summary")
        await page.uncheck(f"#picker-list input[value={symbols[0]}]")
        await page.wait_for_selector(f'#rows [data-symbol="{symbols[0]}"]', state="hidden")
        assert await page.inner_text("#picked-count") == f"({len(symbols) - 1}/{len(symbols)})"
        await page.check(f"#picker-list input[value={symbols[0]}]")
        await page.keyboard.press("Escape")
        await wait_for_filled_rows(page, symbols)
        # The filter narrows the rows as one types.
        await page.fill("#filter", symbols[1][:3])
        visible = await page.eval_on_selector_all("#rows [data-symbol]:not([hidden])", "rows => rows.length")
        assert 1 <= visible < len(symbols)
        await page.fill("#filter", "")

        # A phone: every row still there, nothing wider than the screen.
        phone = await browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
        mobile = await phone.new_page()
        mobile_console = Console(mobile)
        await mobile.goto(f"{base}/")
        await wait_for_filled_rows(mobile, symbols)
        await wait_for_price_change(mobile)
        widths = await mobile.evaluate(
            "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth, window.innerWidth]"
        )
        assert widths[0] <= widths[1] <= 375, f"horizontal scrolling at phone width: {widths}"
        overflowing = await mobile.evaluate(
            "() => [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > "
            "document.documentElement.clientWidth + 0.5).map(e => e.tagName + '.' + e.className)"
        )
        assert overflowing == []
        await mobile.screenshot(path=str(ARTIFACTS / "ticker-phone.png"), full_page=True)

        assert console.unexpected() == [] and mobile_console.unexpected() == []
        await context.close()
        await phone.close()
    finally:
        await demo.stop()


async def test_the_page_shows_reconnecting_while_the_server_is_down_and_live_again(browser: Browser) -> None:
    port = free_port()
    demo = await start_demo(port)
    base = f"http://127.0.0.1:{port}"
    try:
        symbols = await market_symbols(base)
        page = await browser.new_page(viewport={"width": 1000, "height": 600})
        console = Console(page)
        await page.goto(f"{base}/")
        await wait_for_filled_rows(page, symbols)
        await wait_for_status(page, "live")

        console.phase = "down"
        demo.process.send_signal(signal.SIGKILL)  # a crash: no close frame, the browser sees the socket die
        await demo.process.wait()
        text = await wait_for_status(page, "reconnecting", timeout_ms=10_000)
        assert text.startswith("reconnecting"), text
        await page.screenshot(path=str(ARTIFACTS / "ticker-reconnecting.png"))
        # The page keeps trying (with backoff): the rows stay, with their last values.
        assert set(await row_texts(page, "last")) == set(symbols)

        started = time.monotonic()
        demo = await start_demo(port)  # the same port
        text = await wait_for_status(page, "live", timeout_ms=25_000)
        console.phase = "up"
        assert text == "live"
        assert time.monotonic() - started < 25
        await wait_for_price_change(page)
        assert console.unexpected() == [], console.entries
    finally:
        await demo.stop()


def token(**claims: Any) -> str:
    return jwt.encode({"exp": int(time.time()) + 300, "sub": "browser-test", **claims}, SECRET, algorithm="HS256")


async def test_the_page_with_a_jwt_from_its_url(browser: Browser) -> None:
    port = free_port()
    demo = await start_demo(port, PRICEGATE_AUTH="jwt", PRICEGATE_JWT_SECRET=SECRET)
    base = f"http://127.0.0.1:{port}"
    try:
        # The token only allows tickers: bid and ask then come from the ticker, and the page asks for nothing else.
        only_tickers = token(streams=["*@ticker"])
        symbols = await market_symbols(base, only_tickers)
        page = await browser.new_page(viewport={"width": 1000, "height": 600})
        console = Console(page)
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        await page.goto(f"{base}/?token={only_tickers}")
        await wait_for_filled_rows(page, symbols)
        assert (await wait_for_status(page, "live")) == "live"
        await page.wait_for_function("() => /^\\d+$/.test(document.getElementById('lag').textContent)")
        assert len(sockets) == 1 and f"token={only_tickers}" in sockets[0] and "bookTicker" not in sockets[0]
        assert await page.is_hidden("#notice")  # no error reply from the gateway

        # An embedding app's hook instead of the URL: a function, asked once for all the page's requests.
        hooked = await browser.new_page(viewport={"width": 1000, "height": 600})
        hooked_console = Console(hooked)
        full = token()
        await hooked.add_init_script(
            f"window.hookCalls = 0;window.pricegateToken = async () => {{ window.hookCalls += 1; return {full!r}; }};"
        )
        hooked_sockets: list[str] = []
        hooked.on("websocket", lambda ws: hooked_sockets.append(ws.url))
        await hooked.goto(f"{base}/")
        await wait_for_filled_rows(hooked, symbols)
        assert (await wait_for_status(hooked, "live")) == "live"
        assert len(hooked_sockets) == 1 and f"token={full}" in hooked_sockets[0] and "bookTicker" in hooked_sockets[0]
        assert await hooked.evaluate("() => window.hookCalls") == 1
        assert hooked_console.unexpected() == []

        # Without a token the gateway refuses the page's REST calls, and the page says so.
        await page.goto(f"{base}/")
        await wait_for_status(page, "unauthorized", timeout_ms=10_000)
        assert "token" in (await page.inner_text("#notice"))
        refused = re.compile(r"^Failed to load resource: the server responded with a status of 401 .*$")
        assert console.unexpected(allowed=refused) == []
    finally:
        await demo.stop()


async def test_the_pages_modules_behave(browser: Browser) -> None:
    """The pure parts of the page's modules, run in the browser: backoff bounds, the token's stream globs (as the
    gateway's fnmatch reads them), tick-size decimals."""
    port = free_port()
    demo = await start_demo(port)
    try:
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{port}/")
        results = await page.evaluate(
            """async () => {
                const { backoffDelay } = await import('/static/backoff.js');
                const { streamFilter, claimsOf } = await import('/static/auth.js');
                const { decimalsOf, formatMs } = await import('/static/format.js');
                const delays = [0, 1, 2, 3, 10, 50].map(a => [backoffDelay(a, { random: () => 0 }),
                                                              backoffDelay(a, { random: () => 0.999 })]);
                const allowed = streamFilter({ streams: ['*@ticker', 'btc?sdt@*', '[ex]thusdt@bookTicker'] });
                const names = ['btcusdt@ticker', 'btcusdt@bookTicker', 'ethusdt@bookTicker', 'xthusdt@bookticker',
                               'solusdt@bookTicker', 'SOLUSDT@TICKER'];
                const payload = btoa(JSON.stringify({ exp: 5, streams: ['a'] })).replace(/=+$/, '');
                return {
                    delays,
                    allowed: names.map(n => [n, allowed(n)]),
                    everything: streamFilter(null)('anything@trade'),
                    claims: claimsOf(`x.${payload}.y`),
                    decimals: ['0.01000000', '1.00000000', '0.00001000', 'nonsense'].map(decimalsOf),
                    ms: [formatMs(12.4), formatMs(-3), formatMs(NaN)],
                };
            }"""
        )
        assert results["delays"] == [
            [250, pytest.approx(500, abs=1)],
            [500, pytest.approx(1000, abs=1)],
            [1000, pytest.approx(2000, abs=2)],
            [2000, pytest.approx(4000, abs=4)],
            [7500, pytest.approx(15000, abs=15)],
            [7500, pytest.approx(15000, abs=15)],
        ]
        assert results["allowed"] == [
            ["btcusdt@ticker", True],
            ["btcusdt@bookTicker", True],
            ["ethusdt@bookTicker", True],
            ["xthusdt@bookticker", True],
            ["solusdt@bookTicker", False],
            ["SOLUSDT@TICKER", True],
        ]
        assert results["everything"] is True
        assert results["claims"] == {"exp": 5, "streams": ["a"]}
        assert results["decimals"] == [2, 0, 5, None]
        assert results["ms"] == ["12", "0", EMPTY]
    finally:
        await demo.stop()
