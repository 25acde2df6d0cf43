// The live page: every symbol of the market with last price, 24 h change, a sparkline of the last minutes, bid/ask
// and the measured lag from the event's time (E) to its render. Plain ES modules, no build step.

import { claimsOf, currentToken, streamFilter, tokenCanChange, watchTokenAttribute } from "./auth.js";
import { backoffDelay } from "./backoff.js";
import { MarketConnection } from "./connection.js";
import { Samples, decimalsOf, formatMs, formatPercent, formatPrice } from "./format.js";
import { Picker, initialSelection } from "./picker.js";
import { Series, createSparkline, drawSparkline } from "./sparkline.js";

const $ = (id) => document.getElementById(id);
const STATUS_TEXT = {
  connecting: "connecting…",
  live: "live",
  stale: "stale",
  reconnecting: "reconnecting",
  unauthorized: "unauthorized",
  offline: "offline",
  waiting: "waiting for market data",
};
const HISTORY_MINUTES = 15; // sparkline window, filled from 1-minute klines at first
const CLOCK_RESYNC_MS = 5 * 60_000;

class RefusedError extends Error {}

const rows = new Map(); // symbol -> Row
const dirty = new Set();
const lag = new Samples(256);
let clockOffsetMs = 0; // gateway clock minus ours: event times are the gateway's (or the exchange's)
let frameRequested = false;
let connection = null;

// ---- status and notices ---------------------------------------------------------------------------------------

function setStatus(state, detail = "") {
  const element = $("status");
  element.dataset.state = state;
  element.textContent = detail ? `${STATUS_TEXT[state]} ${detail}` : STATUS_TEXT[state];
}

let noticeTimer = null;
function notice(text) {
  const element = $("notice");
  element.textContent = text;
  element.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (element.hidden = true), 15_000);
}

// ---- REST ------------------------------------------------------------------------------------------------------

async function api(path) {
  const token = await currentToken();
  const response = await fetch(path, { headers: token ? { Authorization: `Bearer ${token}` } : {} });
  if (response.status === 401) {
    const body = await response.json().catch(() => ({}));
    throw new RefusedError(body.msg || "credential refused");
  }
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

/** The gateway's clock minus ours, from the quickest of a few /api/v3/time round trips (as NTP picks its sample);
 * zero when the difference is within that round trip's uncertainty. */
async function syncClock() {
  let best = null;
  for (let i = 0; i < 3; i++) {
    try {
      const sent = performance.now();
      const { serverTime } = await api("/api/v3/time");
      const received = performance.now();
      const rtt = received - sent;
      const offset = serverTime - (performance.timeOrigin + (sent + received) / 2);
      if (Number.isFinite(offset) && (best === null || rtt < best.rtt)) best = { rtt, offset };
    } catch {
      // keep the last offset: the lag readout assumes synchronised clocks until the next try
    }
  }
  if (best) clockOffsetMs = Math.abs(best.offset) <= best.rtt / 2 + 1 ? 0 : best.offset;
}

/** The market's trading symbols, in exchangeInfo's order, with their price decimals; retried until it answers. */
async function loadMarket() {
  for (let attempt = 0; ; attempt++) {
    try {
      const info = await api("/api/v3/exchangeInfo");
      const symbols = (info.symbols || []).filter((s) => !s.status || s.status === "TRADING");
      if (symbols.length) return symbols;
      setStatus("waiting", "(no symbols yet)");
    } catch (error) {
      if (error instanceof RefusedError) {
        const token = await currentToken();
        setStatus("unauthorized", token ? "(token refused)" : "(no token)");
        notice(
          token
            ? `The gateway refused this page's token (${error.message}): open the page with a fresh one, /?token=…`
            : "This gateway needs a connection token: open the page as /?token=<token from your backend>.",
        );
      } else {
        setStatus("waiting");
      }
    }
    await new Promise((resolve) => setTimeout(resolve, backoffDelay(attempt)));
  }
}

async function fillHistory(symbols) {
  const queue = symbols.filter((symbol) => rows.get(symbol)?.series.points.length < 2);
  const worker = async () => {
    for (let symbol = queue.shift(); symbol; symbol = queue.shift()) {
      try {
        const klines = await api(`/api/v3/klines?symbol=${symbol}&interval=1m&limit=${HISTORY_MINUTES}`);
        const row = rows.get(symbol);
        row.series.prepend(klines.map((k) => [Number(k[6]), Number(k[4])])); // close time, close
        row.sparkDirty = true;
        markDirty(row);
      } catch {
        // the sparkline fills from live prices instead
      }
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
}

// ---- rows ------------------------------------------------------------------------------------------------------

class Row {
  constructor(market) {
    this.symbol = market.symbol;
    this.decimals = decimalsOf(market.filters?.find((f) => f.filterType === "PRICE_FILTER")?.tickSize);
    this.series = new Series(HISTORY_MINUTES * 60_000, 10_000);
    this.bookTicker = false; // bid/ask come from @bookTicker (else from the ticker's b/a)
    this.ticker = null;
    this.book = null;
    this.shown = null;
    this.sparkDirty = false;
    this.fresh = true; // the next ticker may be a snapshot (its E is older than the connection): not a lag sample
    this.picked = false;

    const element = document.createElement("div");
    element.className = "grid";
    element.dataset.symbol = this.symbol;
    const cell = (name, text = "–") => {
      const span = document.createElement("span");
      span.className = `${name} pending`;
      span.textContent = text;
      element.append(span);
      return span;
    };
    this.name = cell("sym", "");
    const base = market.baseAsset && this.symbol.startsWith(market.baseAsset) ? market.baseAsset : this.symbol;
    const quote = document.createElement("span");
    quote.className = "quote";
    quote.textContent = base === this.symbol ? "" : `/${this.symbol.slice(base.length)}`;
    this.name.classList.remove("pending");
    this.name.append(base, quote);
    this.name.title = this.symbol;
    this.last = cell("last");
    this.change = cell("chg");
    this.spark = document.createElement("span");
    this.spark.className = "spark";
    this.sparkline = createSparkline();
    this.spark.append(this.sparkline);
    element.append(this.spark);
    this.bid = cell("bid");
    this.ask = cell("ask");
    this.lag = cell("lag");
    this.element = element;
  }

  /** Apply what arrived since the last frame; returns the lag of a newly rendered ticker event (or NaN). */
  render(nowServerMs) {
    let measured = NaN;
    const ticker = this.ticker;
    if (ticker) {
      this.ticker = null;
      const price = Number(ticker.c);
      if (this.shown !== null && price !== this.shown) {
        this.last.classList.remove("flash-up", "flash-down");
        void this.last.offsetWidth; // restart the animation
        this.last.classList.add(price > this.shown ? "flash-up" : "flash-down");
      }
      this.shown = price;
      this.last.textContent = formatPrice(ticker.c, this.decimals);
      const change = formatPercent(ticker.P);
      this.change.textContent = change.text;
      this.change.className = `chg ${change.sign > 0 ? "up" : change.sign < 0 ? "down" : ""}`;
      this.last.classList.remove("pending");
      if (!this.bookTicker && ticker.b !== undefined) this.#quote(ticker.b, ticker.a);
      const eventTime = Number(ticker.E);
      if (Number.isFinite(eventTime)) {
        if (!this.fresh) {
          measured = Math.max(0, nowServerMs - eventTime);
          this.lag.textContent = formatMs(measured);
          this.lag.classList.remove("pending");
        }
        this.series.add(eventTime, price);
        this.sparkDirty = true;
      }
      this.fresh = false;
    }
    if (this.book) {
      this.#quote(this.book.b, this.book.a);
      this.book = null;
    }
    if (this.sparkDirty) {
      this.sparkDirty = false;
      drawSparkline(this.sparkline, this.series, nowServerMs);
    }
    return measured;
  }

  #quote(bid, ask) {
    this.bid.textContent = formatPrice(bid, this.decimals);
    this.ask.textContent = formatPrice(ask, this.decimals);
    this.bid.classList.remove("pending");
    this.ask.classList.remove("pending");
  }
}

function markDirty(row) {
  dirty.add(row);
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(renderFrame);
  }
}

function renderFrame() {
  frameRequested = false;
  const nowServerMs = Date.now() + clockOffsetMs;
  let rendered = false;
  for (const row of dirty) {
    const measured = row.render(nowServerMs);
    if (Number.isFinite(measured)) {
      lag.add(measured);
      rendered = true;
    }
  }
  dirty.clear();
  if (rendered) {
    $("lag").textContent = formatMs(lag.percentile(50));
    $("lag-p99").textContent = formatMs(lag.percentile(99));
  }
}

function onFrame(stream, data) {
  const at = stream.indexOf("@");
  const row = rows.get(stream.slice(0, at).toUpperCase());
  if (!row || !data) return;
  const kind = stream.slice(at + 1);
  if (kind === "ticker") row.ticker = data;
  else if (kind === "bookTicker") row.book = data;
  else return;
  markDirty(row);
}

// ---- wiring ----------------------------------------------------------------------------------------------------

async function streamsFor(symbols) {
  const allowed = streamFilter(claimsOf(await currentToken()));
  const streams = [];
  for (const symbol of symbols) {
    const lower = symbol.toLowerCase();
    const row = rows.get(symbol);
    row.bookTicker = allowed(`${lower}@bookTicker`);
    if (allowed(`${lower}@ticker`)) streams.push(`${lower}@ticker`);
    if (row.bookTicker) streams.push(`${lower}@bookTicker`);
  }
  return streams;
}

function applyFilter() {
  const needle = $("filter").value.trim().toUpperCase();
  for (const row of rows.values()) {
    row.element.hidden = !row.picked || (needle !== "" && !row.symbol.includes(needle));
  }
}

async function main() {
  setStatus("connecting");
  await syncClock();
  setInterval(syncClock, CLOCK_RESYNC_MS);
  const market = await loadMarket();
  const symbols = market.map((m) => m.symbol);
  const list = $("rows");
  for (const entry of market) {
    const row = new Row(entry);
    rows.set(row.symbol, row);
    list.append(row.element);
  }
  const selected = new Set(initialSelection(symbols));
  const pick = async (picked) => {
    const chosen = new Set(picked);
    for (const row of rows.values()) {
      if (!row.picked && chosen.has(row.symbol)) row.fresh = true;
      row.picked = chosen.has(row.symbol);
    }
    applyFilter();
    connection?.setStreams(await streamsFor(picked));
    fillHistory(picked);
  };
  const picker = new Picker({
    details: $("picker"),
    list: $("picker-list"),
    count: $("picked-count"),
    pickAll: $("pick-all"),
    pickNone: $("pick-none"),
    symbols,
    selected,
    onChange: pick,
  });
  $("filter").addEventListener("input", () => {
    applyFilter();
    picker.filter($("filter").value);
  });
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  connection = new MarketConnection({
    endpoint: `${scheme}//${location.host}/stream`,
    token: currentToken,
    tokenCanChange,
    onOpen: () => rows.forEach((row) => (row.fresh = true)),
    onFrame,
    onState: setStatus,
    onProblem: notice,
  });
  await pick([...selected]);
  watchTokenAttribute(() => connection.refreshToken());
  connection.start();
}

main().catch((error) => {
  setStatus("offline", "(the page failed to start; reload it)");
  notice(String(error?.message || error));
});
