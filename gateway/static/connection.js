// One WebSocket to the gateway's combined-stream endpoint, kept open: the streams the page wants, our snapshot
// extension (each new subscription starts with the stream's last value), reconnects with exponential backoff and
// jitter, and the connection token (passed as ?token=, refreshed in place with REFRESH_TOKEN before it expires).

import { backoffDelay } from "./backoff.js";
import { claimsOf } from "./auth.js";

const URL_BUDGET = 6000; // characters of stream names put in the URL; the rest is subscribed by SUBSCRIBE
const PER_REQUEST = 200; // stream names per SUBSCRIBE / UNSUBSCRIBE (the gateway allows 5 requests a second)
const STALE_MS = 10_000; // connected, but no data for this long: said so
const REFRESH_BEFORE_S = 30; // ask for a new token this long before the current one expires
const TOKEN_EXPIRED = 4401;

/**
 * States reported to ``onState(state, detail)``: "connecting", "live", "stale" (open, no data lately),
 * "reconnecting" (waiting for the next attempt, or attempting), "unauthorized" (the token was refused or ran out),
 * "offline" (the browser has no network).
 */
export class MarketConnection {
  constructor({ endpoint, token, tokenCanChange, onOpen, onFrame, onState, onProblem }) {
    this.endpoint = endpoint; // e.g. ws://host/stream
    this.token = token; // async () => string | null
    this.tokenCanChange = tokenCanChange; // () => boolean
    this.onOpen = onOpen; // () => void: a new connection, so each stream's next frame may be its snapshot
    this.onFrame = onFrame; // (stream, data) => void
    this.onState = onState;
    this.onProblem = onProblem; // (message) => void: an error reply or a refusal worth showing
    this.wanted = new Set();
    this.subscribed = new Set(); // what the open connection holds (or has asked for)
    this.ws = null;
    this.attempt = 0;
    this.nextId = 1;
    this.lastData = 0;
    this.state = null;
    this.retryAt = 0;
    this.retryTimer = null;
    this.refreshTimer = null;
    this.sentToken = null;
    this.unauthorized = false;
    this.started = false;
  }

  start() {
    this.started = true;
    setInterval(() => this.#tick(), 1000);
    addEventListener("online", () => this.#retryNow());
    addEventListener("offline", () => {
      if (this.ws?.readyState !== WebSocket.OPEN) this.#setState("offline", "(no network)");
    });
    this.#connect();
  }

  /** The streams to hold from now on; on an open connection the difference is (un)subscribed at once. */
  setStreams(streams) {
    this.wanted = new Set(streams);
    if (this.ws?.readyState !== WebSocket.OPEN) return;
    const add = [...this.wanted].filter((s) => !this.subscribed.has(s));
    const remove = [...this.subscribed].filter((s) => !this.wanted.has(s));
    this.#request("UNSUBSCRIBE", remove);
    this.#request("SUBSCRIBE", add);
  }

  /** A fresh token is available (the embedding app changed it): move the open connection onto it. */
  async refreshToken() {
    const token = await this.token();
    if (!token || token === this.sentToken) return;
    if (this.ws?.readyState === WebSocket.OPEN) {
      this.#send({ method: "REFRESH_TOKEN", params: [token], id: this.nextId++ });
      this.sentToken = token;
      this.#scheduleRefresh(token);
    } else if (this.unauthorized) {
      this.#retryNow();
    }
  }

  async #connect() {
    if (this.opening) return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (!navigator.onLine) {
      this.#setState("offline", "(no network)");
      return;
    }
    this.#setState(this.attempt === 0 ? "connecting" : "reconnecting", this.attempt === 0 ? "" : `(attempt ${this.attempt + 1})`);
    this.opening = true;
    let token;
    try {
      token = await this.token();
    } finally {
      this.opening = false;
    }
    const query = new URLSearchParams({ snapshot: "true" });
    if (token) query.set("token", token);
    const initial = [];
    let length = 0;
    for (const stream of this.wanted) {
      if (length + stream.length + 1 > URL_BUDGET) break;
      initial.push(stream);
      length += stream.length + 1;
    }
    // "/" must stay unescaped between stream names: appended by hand (names are [a-z0-9@_!] only).
    const url = `${this.endpoint}?${query}${initial.length ? `&streams=${initial.join("/")}` : ""}`;
    const ws = new WebSocket(url);
    this.ws = ws;
    this.sentToken = token;
    this.subscribed = new Set(initial);
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.unauthorized = false;
      this.lastData = Date.now();
      this.onOpen();
      this.#setState("live", "");
      this.setStreams(this.wanted); // whatever did not fit in the URL, or changed meanwhile
      this.#scheduleRefresh(token);
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame && typeof frame.stream === "string") {
        this.lastData = Date.now();
        this.attempt = 0; // data flows: the next outage starts its backoff afresh
        if (this.state !== "live") this.#setState("live", "");
        this.onFrame(frame.stream, frame.data);
      } else if (frame && frame.error) {
        this.onProblem(`gateway: ${frame.error.msg}`);
      }
    };
    ws.onerror = () => {}; // the close event follows with the code
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearTimeout(this.refreshTimer);
      if (event.code === TOKEN_EXPIRED) {
        this.unauthorized = true;
        this.onProblem(
          this.tokenCanChange()
            ? "The connection token expired; getting a new one."
            : "The connection token expired: open the page again with a fresh token.",
        );
      }
      this.#scheduleReconnect(event.code);
    };
  }

  #request(method, streams) {
    for (let i = 0; i < streams.length; i += PER_REQUEST) {
      const chunk = streams.slice(i, i + PER_REQUEST);
      this.#send({ method, params: chunk, id: this.nextId++ });
      for (const stream of chunk) {
        if (method === "SUBSCRIBE") this.subscribed.add(stream);
        else this.subscribed.delete(stream);
      }
    }
  }

  #send(message) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  #scheduleReconnect(code) {
    const delay = backoffDelay(this.attempt++);
    this.retryAt = Date.now() + delay;
    this.retryCode = code;
    this.#tick();
    this.retryTimer = setTimeout(() => this.#connect(), delay);
  }

  #retryNow() {
    if (this.started && !this.ws && !this.opening) this.#connect();
  }

  #scheduleRefresh(token) {
    clearTimeout(this.refreshTimer);
    const exp = claimsOf(token)?.exp;
    if (!Number.isFinite(exp) || !this.tokenCanChange()) return;
    const inMs = Math.max(1000, (exp - REFRESH_BEFORE_S) * 1000 - Date.now());
    this.refreshTimer = setTimeout(() => this.refreshToken(), Math.min(inMs, 2 ** 31 - 1));
  }

  #tick() {
    if (this.retryTimer) {
      const seconds = Math.max(1, Math.ceil((this.retryAt - Date.now()) / 1000));
      const why = this.retryCode && this.retryCode !== 1006 ? ` (closed ${this.retryCode})` : "";
      if (this.unauthorized) this.#setState("unauthorized", `(token expired; retrying in ${seconds} s)`);
      else this.#setState("reconnecting", `in ${seconds} s${why}`);
    } else if (this.ws?.readyState === WebSocket.OPEN) {
      const quiet = Date.now() - this.lastData;
      if (quiet > STALE_MS) this.#setState("stale", `(no data for ${Math.round(quiet / 1000)} s)`);
    }
  }

  #setState(state, detail) {
    if (state === this.state && detail === this.detail) return;
    this.state = state;
    this.detail = detail;
    this.onState(state, detail);
  }
}
