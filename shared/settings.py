"""Every PRICEGATE_* setting in one typed, validated object.

``Settings.from_env(environ)`` reads the environment; ``with_overrides`` applies CLI flags on top (flags win).
Any invalid value raises one ``ConfigError`` naming the variable and the value, which the CLI prints as a
single line before exiting. The table in README.md ("Configuration") is :func:`settings_table`, checked by
tests/test_readme.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import ConfigError
from shared.redaction import redact_url
from shared.redis.urls import parse_redis_url
from shared.streams import KLINE_INTERVALS

ENV_PREFIX = "PRICEGATE_"
SOURCES = ("synthetic", "replay", "binance")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")
AUTH_MODES = ("none", "apikey", "jwt")
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
DEFAULT_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT")
BINANCE_WS_URL = "wss://stream.binance.com:9443"
BINANCE_REST_URL = "https://api.binance.com"
# PRICEGATE_WORKERS=auto: one gateway worker per core, counted where the gateway starts (this module stays pure).
WORKERS_AUTO = 0


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def _parse_csv_upper(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip().upper() for item in raw.split(",") if item.strip())
    for item in items:
        if not item.isalnum() or not 2 <= len(item) <= 20:
            raise ValueError(f"{item!r} is not a symbol (2-20 letters or digits)")
    return items


def _parse_csv(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_optional_str(raw: str) -> str | None:
    return raw.strip() or None


def _parse_workers(raw: str) -> int:
    text = raw.strip().lower()
    if text == "auto":
        return WORKERS_AUTO
    if not text.isdigit() or int(text) < 1:
        raise ValueError("expected a whole number (1 or more) or auto")
    return int(text)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": _parse_bool,
    "symbols": _parse_csv_upper,
    "csv": _parse_csv,
    "optional_str": _parse_optional_str,
    "process count": _parse_workers,
}


def _setting(default: Any, kind: str, doc: str, **limits: Any) -> Any:
    return field(default=default, metadata={"kind": kind, "doc": doc, **limits})


@dataclass(frozen=True, slots=True)
class Settings:
    # --- network / serving ---
    host: str = _setting("127.0.0.1", "str", "Address the gateway (or demo) listens on.")
    port: int = _setting(8000, "int", "TCP port of the gateway (or demo).", min=0, max=65535)
    workers: int = _setting(
        1,
        "process count",
        "Gateway processes sharing PRICEGATE_PORT (SO_REUSEPORT) under one supervisor, or auto (one per core); "
        "above 1 needs PRICEGATE_METRICS_PORT (worker i serves /metrics on it + i).",
        min=WORKERS_AUTO,
    )
    ssl_certfile: str | None = _setting(None, "optional_str", "PEM certificate: serve https/wss directly.")
    ssl_keyfile: str | None = _setting(None, "optional_str", "PEM private key for ssl_certfile.")
    log_level: str = _setting("info", "str", "Log level: critical, error, warning, info, debug.")
    log_format: str = _setting(
        "text",
        "str",
        "Log format of every logger, uvicorn's included: text, or json (one object per line: time, level, logger, "
        "message, exception).",
    )
    # --- broker ---
    redis_url: str | None = _setting(
        None,
        "optional_str",
        "Redis URL: one server (redis://, rediss://, unix://), a Redis Cluster by its seed nodes "
        "(redis+cluster://h1:p1,h2:p2,h3:p3/; Redis 7+, sharded Pub/Sub) or a master watched by Sentinels "
        "(redis+sentinel://h1:p1,h2:p2,h3:p3/<master-name>[/db]). Required by gateway and ingest; "
        "demo uses the in-memory broker when unset.",
    )
    channel_prefix: str = _setting("pg:md", "str", "Prefix of every Redis key and channel.")
    venue: str = _setting("binance", "str", "Venue name in channel names (pg:md:<venue>:{stream}).")
    history_maxlen: int = _setting(1000, "int", "Messages kept per channel for gap repair.", min=1)
    history_max_age_s: float = _setting(300.0, "float", "Idle history is dropped after this many seconds.", min=1)
    # --- ingest / sources ---
    symbols: tuple[str, ...] = _setting(
        DEFAULT_SYMBOLS,
        "symbols",
        "Comma-separated market symbols served by the synthetic source (and allowed on the gateway when no "
        "exchangeInfo is cached yet).",
    )
    source: str = _setting("synthetic", "str", "Market source of ingest/demo: synthetic, replay or binance.")
    replay_file: str | None = _setting(None, "optional_str", "Recording to replay (default: the bundled sample).")
    replay_speed: float = _setting(1.0, "float", "Replay speed factor (2 = twice as fast).", min=0.001)
    replay_loop: bool = _setting(True, "bool", "Restart the replay at the end of the file.")
    synthetic_seed: int = _setting(7, "int", "Seed of the synthetic market (same seed, same market).")
    synthetic_trade_rate: float = _setting(
        5.0, "float", "Average synthetic trades per second per symbol (bursty).", min=0.01
    )
    always_on_streams: tuple[str, ...] = _setting(
        (), "csv", "Streams ingest always keeps flowing, whether or not a client asks (comma-separated)."
    )
    binance_ws_url: str = _setting(BINANCE_WS_URL, "str", "Binance market-stream base URL.")
    binance_rest_url: str = _setting(BINANCE_REST_URL, "str", "Binance REST base URL.")
    upstream_max_streams: int = _setting(
        1024, "int", "Streams per upstream connection (Binance allows 1024).", min=1, max=1024
    )
    demand_linger_s: float = _setting(
        60.0, "float", "Seconds ingest keeps a stream upstream after the last client left.", min=0
    )
    max_upstream_streams: int = _setting(
        5000,
        "int",
        "Most streams ingest keeps upstream: always-on streams, then the most recently announced demand; demand "
        "beyond it is refused (logged, counted).",
        min=1,
    )
    exchange_info_refresh_s: float = _setting(3600.0, "float", "How often ingest refreshes exchangeInfo.", min=1)
    ingest_metrics_port: int = _setting(
        9108,
        "int",
        "Port of ingest's own /metrics endpoint (0 = disabled). At the default, a port taken by another process "
        "(another ingest on the host) moves it to the next free one up to 9127, logged; any other port must be free.",
        min=0,
        max=65535,
    )
    # --- ingest: leadership, upstream limits, backfill ---
    leader_ttl_s: float = _setting(
        3.0,
        "float",
        "Lifetime of ingest's leader lease in Redis: a standby takes over at most about TTL + renew after the "
        "leader died.",
        min=0.2,
    )
    leader_renew_s: float = _setting(
        1.0,
        "float",
        "How often the leader renews its lease (and a standby tries to take it); at most TTL / 2.",
        min=0.05,
    )
    standby_buffer_s: float = _setting(
        15.0, "float", "Seconds of feed a standby keeps to publish on takeover (must span a failover).", min=0
    )
    outage_buffer_messages: int = _setting(
        100_000,
        "int",
        "Messages the leading ingest holds while Redis is unreachable, published in order once it is back; beyond "
        "it the oldest are dropped and counted (pricegate_ingest_outage_dropped_messages_total).",
        min=1,
    )
    upstream_stall_s: float = _setting(
        60.0, "float", "Replace an upstream connection that received nothing (no data, no ping) for this long.", min=0.1
    )
    upstream_rotate_after_s: float = _setting(
        84600.0,
        "float",
        "Replace each upstream connection (make-before-break) after this long; Binance cuts them at 24 h.",
        min=1,
    )
    upstream_overlap_timeout_s: float = _setting(
        10.0, "float", "Longest a rotation waits for old and new connection to overlap before switching.", min=0.1
    )
    upstream_malformed_limit: int = _setting(
        1, "int", "Malformed frames after which an upstream connection is replaced (each is skipped).", min=1
    )
    upstream_control_rate_per_s: float = _setting(
        3.0,
        "float",
        "Control messages per second per upstream connection, pongs included (Binance: 5).",
        min=0.1,
        max=5,
    )
    upstream_connect_attempts: int = _setting(
        250,
        "int",
        "Upstream connection attempts allowed per PRICEGATE_UPSTREAM_CONNECT_WINDOW_S (Binance: 300 per 5 min "
        "per IP, shared by every process on the IP).",
        min=1,
        max=300,
    )
    upstream_connect_window_s: float = _setting(
        300.0, "float", "Window of PRICEGATE_UPSTREAM_CONNECT_ATTEMPTS (Binance: 5 min).", min=1
    )
    upstream_rest_weight_limit: int = _setting(
        3000,
        "int",
        "REST request weight per minute ingest allows itself on Binance (the IP's limit is 6000, shared with "
        "gateways' exchange fallback).",
        min=25,
    )
    backfill_trades: bool = _setting(
        True,
        "bool",
        "Backfill @trade gaps from historicalTrades (weight 25 per 1000 trades); @aggTrade always.",
    )
    backfill_max_trades: int = _setting(
        10000, "int", "Most trades fetched for one gap (the newest); older ones are counted as lost.", min=0
    )
    backfill_max_wait_s: float = _setting(
        30.0, "float", "Longest a stream's live trades wait for its backfill (then the rest is counted lost).", min=0.1
    )
    # --- candles (PostgreSQL) ---
    database_url: str | None = _setting(
        None,
        "optional_str",
        "PostgreSQL DSN (postgresql://user@host:5432/db). Ingest stores closed candles there and the gateway "
        "serves klines from it; demo keeps candles in memory when unset.",
    )
    database_schema: str = _setting("public", "str", "PostgreSQL schema (search_path) holding pricegate's tables.")
    db_pool_min: int = _setting(1, "int", "Connections a process keeps open to PostgreSQL.", min=0)
    db_pool_max: int = _setting(10, "int", "Most connections a process opens to PostgreSQL.", min=1)
    db_statement_timeout_ms: int = _setting(
        5000, "int", "PostgreSQL cancels a statement running longer than this (0 = no limit).", min=0
    )
    db_migrate_on_start: bool = _setting(
        False, "bool", "Apply pending schema migrations at start (otherwise run `pricegate db migrate`)."
    )
    candle_intervals: tuple[str, ...] = _setting(
        ("1m", "5m", "15m", "1h", "4h", "1d"),
        "csv",
        "Kline intervals whose closed candles ingest stores for every symbol in PRICEGATE_SYMBOLS (kept flowing).",
    )
    candle_batch_size: int = _setting(500, "int", "Most candles ingest writes in one statement.", min=1)
    candle_flush_interval_s: float = _setting(
        1.0, "float", "Longest time a closed candle waits in ingest before it is written.", min=0.01
    )
    demo_history_candles: int = _setting(
        1000, "int", "Synthetic past candles per symbol and interval the demo starts with (0 = none).", min=0
    )
    # --- REST (klines, technicals, cache) ---
    cache_ttl_klines_s: float = _setting(60.0, "float", "How long a klines response is served from the cache.", min=0)
    cache_ttl_technicals_s: float = _setting(
        180.0, "float", "How long a technicals response is served from the cache.", min=0
    )
    cache_ttl_live_s: float = _setting(
        1.0, "float", "Cache lifetime of exchange fallbacks for depth and ticker/price (no fresh stream value).", min=0
    )
    cache_stale_s: float = _setting(
        900.0, "float", "How long a cached response is kept to be served stale when its backend fails.", min=0
    )
    cache_max_bytes: int = _setting(
        67108864,
        "int",
        "Bytes of responses the gateway's in-process cache holds (least recently used out first); one response "
        "above 1/16 of it is served but not cached (in Redis too).",
        min=65536,
    )
    exchange_timeout_s: float = _setting(10.0, "float", "Timeout of one exchange REST call.", min=0.1)
    exchange_max_connections: int = _setting(20, "int", "Pooled HTTP connections to the exchange REST API.", min=1)
    exchange_weight_limit_per_min: int = _setting(
        2000,
        "int",
        "REST request weight per minute each gateway's exchange fallback allows itself on Binance (the IP's limit "
        "is 6000, shared with ingest's PRICEGATE_UPSTREAM_REST_WEIGHT_LIMIT).",
        min=1,
    )
    rest_weight_limit_per_min: int = _setting(
        6000, "int", "Request weight one IP may use per minute on the REST API (Binance: 6000).", min=1
    )
    rest_last_value_wait_s: float = _setting(
        2.0,
        "float",
        "Without an exchange, how long depth and ticker/price wait for a stream they just asked ingest for.",
        min=0,
    )
    # --- gateway client limits ---
    max_streams_per_connection: int = _setting(1024, "int", "Streams one WebSocket may subscribe.", min=1)
    control_rate_per_s: float = _setting(
        5.0, "float", "Inbound control messages per second per connection (Binance: 5).", min=0.1
    )
    control_burst: int = _setting(10, "int", "Control messages a connection may send in a burst.", min=1)
    max_frame_bytes: int = _setting(1048576, "int", "Largest inbound WebSocket message (close 1009 above).", min=128)
    client_buffer_bytes: int = _setting(
        262144,
        "int",
        "Per-client outbound buffer; beyond it state streams conflate, event streams close 4000.",
        min=1024,
    )
    flush_chunk_clients: int = _setting(
        256,
        "int",
        "Fan-out writes per event-loop turn before the gateway reads the broker again (streams are not split; "
        "0: one pass over every pending stream).",
        min=0,
    )
    closes_per_turn: int = _setting(
        16,
        "int",
        "Connections whose client went away that are closed per event-loop turn; the rest wait their turn "
        "(delivering nothing), so thousands of clients dropping at once cannot stall the fan-out (0: close each "
        "at once).",
        min=0,
    )
    client_sndbuf_bytes: int = _setting(
        65536,
        "int",
        "Kernel send buffer (SO_SNDBUF; Linux doubles it) of each WebSocket client, fixed so a client that stops "
        "reading holds at most this in the kernel before client_buffer_bytes applies (0: kernel autotuning, up "
        "to tcp_wmem's maximum per client).",
        min=0,
    )
    ping_interval_s: float = _setting(20.0, "float", "Server ping interval (Binance: 20 s).", min=0.05)
    ping_timeout_s: float = _setting(60.0, "float", "Close a client whose pong is this late (Binance: 60 s).", min=0.05)
    max_connections: int = _setting(
        50000,
        "int",
        "Open connections per gateway process, WebSockets, HTTP and unfinished handshakes alike (beyond: 503).",
        min=1,
    )
    max_fragments_per_message: int = _setting(
        64, "int", "Frames one fragmented inbound message may span (close 1009 beyond).", min=1
    )
    # --- the edge: per-IP limits, handshakes, origins, proxies ---
    max_connections_per_ip: int = _setting(
        300, "int", "Open connections per client IP (IPv6: per /64) on one gateway process (beyond: 429).", min=1
    )
    connection_attempts_per_ip: int = _setting(
        300,
        "int",
        "New connections one IP may open per PRICEGATE_CONNECTION_ATTEMPT_WINDOW_S (Binance: 300 per 5 min; "
        "beyond: 429 with Retry-After).",
        min=1,
    )
    connection_attempt_window_s: float = _setting(
        300.0, "float", "Window of PRICEGATE_CONNECTION_ATTEMPTS_PER_IP.", min=1
    )
    max_subscriptions_per_ip: int = _setting(
        20000, "int", "Live stream subscriptions all connections of one IP may hold together on one process.", min=1
    )
    handshake_timeout_s: float = _setting(
        10.0,
        "float",
        "Time from accepting a TCP connection to the end of its request headers (and from one keep-alive request "
        "to the next one's headers); slower clients are closed.",
        min=0.1,
    )
    handshakes_per_turn: int = _setting(
        16,
        "int",
        "New connections whose first request is parsed per event-loop turn; the rest wait their turn (reading "
        "paused), so a reconnect storm cannot starve the fan-out (0: no gate).",
        min=0,
    )
    max_request_line_bytes: int = _setting(
        8000, "int", "Longest request target (URL) accepted (414 beyond).", min=256, max=8000
    )
    max_header_bytes: int = _setting(
        16384, "int", "Most bytes of request headers accepted (431 beyond; one header line at most 8000).", min=1024
    )
    max_headers: int = _setting(100, "int", "Most request headers accepted (431 beyond).", min=8, max=120)
    allowed_origins: tuple[str, ...] = _setting(
        (),
        "csv",
        "Origins a browser may open WebSockets from (comma list, * wildcards, e.g. https://*.example.com); empty: "
        "any. A handshake without Origin (a non-browser client) is always allowed.",
    )
    forwarded_allow_ips: tuple[str, ...] = _setting(
        (),
        "csv",
        "Proxies (IPs or CIDRs, * = any) whose X-Forwarded-For names the client for per-IP limits and weights; "
        "empty: no proxy is trusted.",
    )
    metrics_port: int = _setting(
        0,
        "int",
        "Serve the gateway's /metrics on this port only (keep it internal; with PRICEGATE_WORKERS above 1, worker i "
        "on this port + i); 0: on the client port.",
        min=0,
        max=65535,
    )
    # --- authentication ---
    auth: str = _setting("none", "str", "Client authentication: none, apikey, jwt or apikey,jwt (either).")
    auth_cache_ttl_s: float = _setting(
        30.0,
        "float",
        "How long a validated API key is trusted without asking PostgreSQL again; a revoked key stops working "
        "within this (new and open connections).",
        min=1,
    )
    jwt_secret: str | None = _setting(None, "optional_str", "HS256 key of connection tokens (its UTF-8 bytes).")
    jwt_public_key: str | None = _setting(
        None, "optional_str", "PEM public key (or a path to one) verifying RS256/ES256 connection tokens."
    )
    max_connections_per_key: int = _setting(
        1000, "int", "Open WebSockets per API key across all replicas (beyond: 429).", min=1
    )
    demand_ttl_s: float = _setting(5.0, "float", "Lifetime of a gateway's demand announcement in Redis.", min=1)
    gc_freeze_interval_s: float = _setting(
        0.25,
        "float",
        "Every this many seconds the gateway hides surviving objects from the garbage collector (gc.freeze), so a "
        "full collection never scans tens of thousands of connections (0: off, Python's default collector).",
        min=0,
    )
    shutdown_drain_s: float = _setting(
        5.0, "float", "On SIGTERM, spread client closes (1001) over this many seconds.", min=0
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        return cls().with_overrides(
            {f.name: environ[env_name(f.name)] for f in dataclasses.fields(cls) if env_name(f.name) in environ},
            source="env",
        )

    def with_overrides(self, values: Mapping[str, Any], *, source: str = "flag") -> Settings:
        """Return a copy with ``values`` applied; strings are parsed and every value is validated."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        parsed: dict[str, Any] = {}
        for name, value in values.items():
            if value is None:
                continue
            spec = fields[name]
            label = env_name(name) if source == "env" else "--" + name.replace("_", "-")
            if isinstance(value, str):
                try:
                    value = _PARSERS[spec.metadata["kind"]](value)
                except ValueError as error:
                    raise ConfigError(label, value, f"not a valid {spec.metadata['kind']}: {error}") from None
            _check_limits(label, value, spec.metadata)
            parsed[name] = value
        settings = dataclasses.replace(self, **parsed)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(env_name("source"), self.source, f"must be one of {', '.join(SOURCES)}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(env_name("log_level"), self.log_level, f"must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(env_name("log_format"), self.log_format, f"must be one of {', '.join(LOG_FORMATS)}")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError(env_name("ssl_keyfile"), self.ssl_keyfile, "ssl_certfile and ssl_keyfile go together")
        if not self.symbols:
            raise ConfigError(env_name("symbols"), "", "at least one symbol is required")
        if self.redis_url is not None:
            self._validate_redis_url(self.redis_url)
        for url_field in ("binance_ws_url",):
            value = getattr(self, url_field)
            if not value.startswith(("ws://", "wss://")):
                raise ConfigError(env_name(url_field), value, "must start with ws:// or wss://")
        if not self.binance_rest_url.startswith(("http://", "https://")):
            raise ConfigError(env_name("binance_rest_url"), self.binance_rest_url, "must start with http(s)://")
        if self.leader_renew_s > self.leader_ttl_s / 2:
            raise ConfigError(
                env_name("leader_renew_s"), self.leader_renew_s, "must be at most half of PRICEGATE_LEADER_TTL_S"
            )
        self._validate_storage()
        self._validate_edge()

    def _validate_redis_url(self, url: str) -> None:
        """One of the three forms (shared/redis/urls.py); on a cluster, names whose hash tags stay the streams'."""
        try:
            target = parse_redis_url(url)
        except ValueError as error:
            raise ConfigError(env_name("redis_url"), redact_url(url), str(error)) from None
        if target.kind == "cluster":
            for name in ("channel_prefix", "venue"):
                if "{" in getattr(self, name) or "}" in getattr(self, name):
                    raise ConfigError(
                        env_name(name), getattr(self, name), "must hold no { or } on a Redis Cluster (hash tags)"
                    )

    def _validate_edge(self) -> None:
        modes = [mode.strip() for mode in self.auth.split(",") if mode.strip()]
        if not modes or any(mode not in AUTH_MODES for mode in modes) or ("none" in modes and len(modes) > 1):
            raise ConfigError(env_name("auth"), self.auth, "must be none, apikey, jwt or apikey,jwt")
        if "jwt" in modes and not (self.jwt_secret or self.jwt_public_key):
            raise ConfigError(env_name("auth"), self.auth, "jwt needs PRICEGATE_JWT_SECRET or PRICEGATE_JWT_PUBLIC_KEY")
        if "apikey" in modes and not self.database_url:
            raise ConfigError(env_name("auth"), self.auth, "apikey needs PRICEGATE_DATABASE_URL (keys live there)")
        for entry in self.forwarded_allow_ips:
            if entry != "*":
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ConfigError(env_name("forwarded_allow_ips"), entry, "not an IP address or network") from None
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError(env_name("metrics_port"), self.metrics_port, "must differ from PRICEGATE_PORT")

    @property
    def auth_modes(self) -> frozenset[str]:
        """The enabled credential kinds (empty when authentication is off)."""
        return frozenset(mode.strip() for mode in self.auth.split(",") if mode.strip() not in ("", "none"))

    def _validate_storage(self) -> None:
        if self.database_url is not None and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(env_name("database_url"), "<redacted>", "must start with postgresql:// or postgres://")
        if SCHEMA_NAME.fullmatch(self.database_schema) is None:
            raise ConfigError(env_name("database_schema"), self.database_schema, "must be a lowercase identifier")
        if self.db_pool_min > self.db_pool_max:
            raise ConfigError(env_name("db_pool_min"), self.db_pool_min, "must not exceed PRICEGATE_DB_POOL_MAX")
        unknown = [interval for interval in self.candle_intervals if interval not in KLINE_INTERVALS]
        if unknown:
            raise ConfigError(
                env_name("candle_intervals"), ",".join(unknown), f"not kline intervals ({' '.join(KLINE_INTERVALS)})"
            )


@dataclass(frozen=True, slots=True)
class SettingGroup:
    """Settings that belong together: one titled section of a command's ``--help``."""

    name: str
    title: str
    settings: tuple[str, ...]


# Every setting is in exactly one group (tests/test_cli_help.py checks it). Which groups each command reads, and so
# shows in its --help, is pricegate_cli/settings_flags.py's COMMAND_SETTINGS.
SETTING_GROUPS: tuple[SettingGroup, ...] = (
    SettingGroup("logging", "logging", ("log_level", "log_format")),
    SettingGroup(
        "network",
        "network (where the gateway listens, TLS, processes, shutdown)",
        ("host", "port", "ssl_certfile", "ssl_keyfile", "metrics_port", "workers", "shutdown_drain_s"),
    ),
    SettingGroup(
        "broker",
        "broker (Redis, channels, history, demand)",
        ("redis_url", "channel_prefix", "venue", "history_maxlen", "history_max_age_s", "demand_ttl_s"),
    ),
    SettingGroup(
        "sources",
        "sources (the market: synthetic, replay or binance)",
        (
            "symbols",
            "source",
            "replay_file",
            "replay_speed",
            "replay_loop",
            "synthetic_seed",
            "synthetic_trade_rate",
            "binance_ws_url",
            "binance_rest_url",
        ),
    ),
    SettingGroup(
        "ingest",
        "ingest (demand, leadership, buffers, metrics)",
        (
            "always_on_streams",
            "demand_linger_s",
            "max_upstream_streams",
            "exchange_info_refresh_s",
            "ingest_metrics_port",
            "leader_ttl_s",
            "leader_renew_s",
            "standby_buffer_s",
            "outage_buffer_messages",
        ),
    ),
    SettingGroup(
        "upstream",
        "upstream (Binance connections, limits, backfill)",
        (
            "upstream_max_streams",
            "upstream_stall_s",
            "upstream_rotate_after_s",
            "upstream_overlap_timeout_s",
            "upstream_malformed_limit",
            "upstream_control_rate_per_s",
            "upstream_connect_attempts",
            "upstream_connect_window_s",
            "upstream_rest_weight_limit",
            "backfill_trades",
            "backfill_max_trades",
            "backfill_max_wait_s",
        ),
    ),
    SettingGroup(
        "database",
        "database (PostgreSQL)",
        (
            "database_url",
            "database_schema",
            "db_pool_min",
            "db_pool_max",
            "db_statement_timeout_ms",
            "db_migrate_on_start",
        ),
    ),
    SettingGroup(
        "candles",
        "candles (what ingest stores, the demo's history)",
        ("candle_intervals", "candle_batch_size", "candle_flush_interval_s", "demo_history_candles"),
    ),
    SettingGroup(
        "rest",
        "REST (cache, exchange fallback, weights)",
        (
            "cache_ttl_klines_s",
            "cache_ttl_technicals_s",
            "cache_ttl_live_s",
            "cache_stale_s",
            "cache_max_bytes",
            "exchange_timeout_s",
            "exchange_max_connections",
            "exchange_weight_limit_per_min",
            "rest_weight_limit_per_min",
            "rest_last_value_wait_s",
        ),
    ),
    SettingGroup(
        "limits",
        "limits (per WebSocket connection and per process)",
        (
            "max_streams_per_connection",
            "control_rate_per_s",
            "control_burst",
            "max_frame_bytes",
            "client_buffer_bytes",
            "flush_chunk_clients",
            "closes_per_turn",
            "client_sndbuf_bytes",
            "ping_interval_s",
            "ping_timeout_s",
            "max_connections",
            "max_fragments_per_message",
            "gc_freeze_interval_s",
        ),
    ),
    SettingGroup(
        "edge",
        "edge (per-IP limits, handshakes, origins, proxies)",
        (
            "max_connections_per_ip",
            "connection_attempts_per_ip",
            "connection_attempt_window_s",
            "max_subscriptions_per_ip",
            "handshake_timeout_s",
            "handshakes_per_turn",
            "max_request_line_bytes",
            "max_header_bytes",
            "max_headers",
            "allowed_origins",
            "forwarded_allow_ips",
        ),
    ),
    SettingGroup(
        "auth",
        "authentication",
        ("auth", "auth_cache_ttl_s", "jwt_secret", "jwt_public_key", "max_connections_per_key"),
    ),
)


def _check_limits(label: str, value: Any, metadata: Mapping[str, Any]) -> None:
    if "min" in metadata and value < metadata["min"]:
        raise ConfigError(label, value, f"must be >= {metadata['min']}")
    if "max" in metadata and value > metadata["max"]:
        raise ConfigError(label, value, f"must be <= {metadata['max']}")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def settings_table() -> str:
    """Markdown table of every setting (variable, default, meaning) for README.md."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for spec in dataclasses.fields(Settings):
        default = spec.default
        shown = ",".join(default) if isinstance(default, tuple) else ("" if default is None else str(default))
        if isinstance(default, bool):
            shown = str(default).lower()
        rows.append(f"| `{env_name(spec.name)}` | `{shown}` | {spec.metadata['doc']} |")
    return "\n".join(rows)
