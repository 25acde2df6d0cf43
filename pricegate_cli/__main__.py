"""``pricegate demo | gateway | ingest | record | db | keys | watch``: parse flags over PRICEGATE_* settings and run
one role (``watch`` is a client: pricegate_cli/watch.py).

Every setting a command reads is a flag (``--redis-url``) and an environment variable (``PRICEGATE_REDIS_URL``);
flags win. Which settings each command reads, and so lists in its ``--help``, is declared once in
pricegate_cli/settings_flags.py. A PRICEGATE_* variable that is no setting is warned about, with the closest name.
Configuration problems (an unparsable value, Redis unreachable at start) end the process with exit code 2
and one line naming the setting, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import importlib.metadata
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pricegate_cli.logs import adopt_uvicorn_loggers, configure_logging
from pricegate_cli.settings_flags import EPILOG, add_settings_flags, setting_help, unknown_variables
from pricegate_cli.watch import add_watch_parser
from shared.errors import BrokerError, ConfigError, PricegateError
from shared.settings import Settings, env_name

EXIT_CONFIG = 2
# At its default, ingest's /metrics port moves up to this many ports on when taken (another ingest on the host).
INGEST_METRICS_PORT_SCAN = 20


def version() -> str:
    """pricegate's version: the installed distribution's (pyproject.toml's ``version``, its only definition)."""
    return importlib.metadata.version("pricegate")


def _source_help(kinds: str) -> str:
    spec = next(spec for spec in dataclasses.fields(Settings) if spec.name == "source")
    return f"{kinds} {setting_help(spec).removeprefix(spec.metadata['doc'] + ' ')}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pricegate", description="Real-time market-data gateway (Binance protocol)")
    parser.add_argument("--version", action="version", version=f"pricegate {version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, epilog=EPILOG, **kwargs)

    demo = command("demo", "ingest + gateway in one process on the in-memory broker")
    demo.add_argument(
        "--source",
        nargs="+",
        metavar=("KIND", "FILE"),
        help=_source_help("synthetic (default) or replay [FILE] (default FILE: the bundled sample)"),
    )
    add_settings_flags(demo, "demo", skip=("source",))  # --source takes an optional FILE
    gateway = command("gateway", "a gateway replica (needs PRICEGATE_REDIS_URL)")
    add_settings_flags(gateway, "gateway")
    ingest = command("ingest", "the ingest process (needs PRICEGATE_REDIS_URL)")
    ingest.add_argument(
        "--source",
        nargs="+",
        metavar=("KIND", "FILE"),
        help=_source_help("synthetic (default), replay FILE, or binance"),
    )
    add_settings_flags(ingest, "ingest", skip=("source",))
    record = command("record", "record a live Binance session to a JSON-lines file")
    record.add_argument("--streams", required=True, help="comma-separated stream names, e.g. btcusdt@trade")
    record.add_argument("--out", required=True, type=Path, help="output file (JSON lines)")
    record.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    record.add_argument("--max-messages", type=int, default=None, help="stop after this many frames")
    add_settings_flags(record, "record")
    db = command("db", "PostgreSQL schema (needs PRICEGATE_DATABASE_URL)")
    db.add_argument("action", choices=("migrate", "status"), help="apply pending migrations, or show the version")
    add_settings_flags(db, "db")
    keys = command("keys", "API keys in PostgreSQL (needs PRICEGATE_DATABASE_URL, migrated)")
    key_actions = keys.add_subparsers(dest="keys_action", required=True)

    def key_action(name: str, help: str) -> argparse.ArgumentParser:
        return key_actions.add_parser(name, help=help, description=help, epilog=EPILOG)

    create = key_action("create", "issue a key; it is printed once and cannot be shown again")
    create.add_argument("--label", required=True, help="who or what the key is for (shown by list)")
    add_settings_flags(create, "keys")
    add_settings_flags(key_action("list", "every key's subject, label, creation and revocation"), "keys")
    revoke = key_action("revoke", "revoke a key: refused and disconnected within the cache TTL")
    revoke.add_argument("key", metavar="KEY", help="the key itself (64 hex characters)")
    add_settings_flags(revoke, "keys")
    add_watch_parser(commands)
    return parser


def load_settings(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    settings = Settings.from_env(environ)
    overrides: dict[str, Any] = {
        spec.name: getattr(args, spec.name) for spec in dataclasses.fields(Settings) if hasattr(args, spec.name)
    }
    overrides.pop("source", None)
    source = getattr(args, "source", None)
    if source:
        if len(source) > 2:
            raise ConfigError("--source", " ".join(source), "expected KIND [FILE]")
        overrides["source"] = source[0]
        if len(source) == 2:
            overrides["replay_file"] = source[1]
    return settings.with_overrides(overrides)


def _configure_logging(settings: Settings) -> None:
    configure_logging(settings)


def _make_source(settings: Settings) -> Any:
    from ingest.service import always_on_streams

    always_on_streams(settings.always_on_streams)  # named as PRICEGATE_ALWAYS_ON_STREAMS, before any source opens
    if settings.source == "synthetic":
        from ingest.sources.synthetic.source import SyntheticSource

        return SyntheticSource(
            list(settings.symbols), seed=settings.synthetic_seed, trade_rate_per_s=settings.synthetic_trade_rate
        )
    if settings.source == "replay":
        from ingest.sources.replay.recording import SAMPLE_PATH, parse_recording_line
        from ingest.sources.replay.source import ReplaySource

        path = Path(settings.replay_file) if settings.replay_file else SAMPLE_PATH
        if not path.is_file():
            raise ConfigError(env_name("replay_file"), str(path), "no such file")
        # A file that is not a recording at all (a wrong path) is found now: its first non-blank line tells. A
        # malformed line further on still stops the replay when it is reached.
        first = None
        try:
            with path.open("rb") as file:
                for number, line in enumerate(file, start=1):
                    first = parse_recording_line(line, number, path)
                    if first is not None:
                        break
        except (OSError, ValueError) as error:
            raise ConfigError(env_name("replay_file"), str(path), f"not a recording: {error}") from None
        if first is None:
            raise ConfigError(env_name("replay_file"), str(path), "not a recording: no frame in it")
        return ReplaySource(path, speed=settings.replay_speed, loop=settings.replay_loop)
    from ingest.sources.binance.source import BinanceSource

    return BinanceSource(
        settings.binance_ws_url,
        settings.binance_rest_url,
        always_on=settings.always_on_streams,
        max_streams_per_connection=settings.upstream_max_streams,
        control_rate_per_s=settings.upstream_control_rate_per_s,
        stall_timeout_s=settings.upstream_stall_s,
        rotate_after_s=settings.upstream_rotate_after_s,
        overlap_timeout_s=settings.upstream_overlap_timeout_s,
        malformed_limit=settings.upstream_malformed_limit,
        connect_attempts=settings.upstream_connect_attempts,
        connect_window_s=settings.upstream_connect_window_s,
        rest_weight_limit=settings.upstream_rest_weight_limit,
    )


def _make_redis_broker(settings: Settings) -> Any:
    if not settings.redis_url:
        raise ConfigError(env_name("redis_url"), "", "required for this command (e.g. redis://127.0.0.1:6379/0)")
    from shared.broker.factory import redis_broker

    # One server, a Sentinel-watched master or a Redis Cluster, by the URL's form (shared/redis/urls.py).
    return redis_broker(
        settings.redis_url,
        prefix=settings.channel_prefix,
        venue=settings.venue,
        history_maxlen=settings.history_maxlen,
        history_max_age_s=settings.history_max_age_s,
    )


async def _start_broker(broker: Any, settings: Settings) -> None:
    try:
        await broker.start()
    except BrokerError as error:
        # safe_url: never print a password from the URL.
        shown = getattr(broker, "safe_url", "")
        cause = str(error).removeprefix(f"Redis at {shown}: ")
        raise ConfigError(env_name("redis_url"), shown, f"cannot reach Redis: {cause}") from None


def _ignore_stop_signals() -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default SIGTERM action that
    # would kill us after a clean drain (exit 143). A no-op handler lets us close the broker and exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


async def serve(
    settings: Settings,
    broker: Any,
    *,
    background: Sequence[Any] = (),
    banner: str = "",
    candles: Any = None,
    sockets: Sequence[socket.socket] | None = None,
    on_serving: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. A worker of ``--workers`` (pricegate_cli/workers.py) passes its own
    ``sockets`` to listen on, and ``on_serving`` to be told the port instead of printing the banner."""
    import uvicorn

    from gateway.app import create_app
    from gateway.server import bound_port, serving_banner, uvicorn_config

    await _start_broker(broker, settings)
    try:
        app = create_app(settings, broker, background=background, candles=candles)
        config = uvicorn_config(app, settings)
        adopt_uvicorn_loggers(settings)  # after uvicorn.Config, which installs its own handlers
        server = uvicorn.Server(config)
        _ignore_stop_signals()

        async def announce() -> None:
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag, no event
                await asyncio.sleep(0.05)
            port = bound_port(server)
            if on_serving is not None:
                on_serving(port)
            else:
                print(f"{banner}{serving_banner(settings, port)}", flush=True)

        announcer = asyncio.create_task(announce())
        await server.serve(sockets=list(sockets) if sockets is not None else None)
        announcer.cancel()
    finally:
        await broker.close()
        if candles is not None:
            await candles.close()


async def run_demo(settings: Settings) -> None:
    from ingest.service import IngestMetrics, IngestService
    from pricegate_cli.storage import candle_recorder, demo_candle_store
    from shared.broker.memory import MemoryBroker

    broker = MemoryBroker(history_maxlen=settings.history_maxlen)
    market_source = _make_source(settings)
    # Synthetic history ends exactly where the live synthetic market opens.
    market = getattr(market_source, "market", None)
    candles = await demo_candle_store(settings, market.now_ms if market is not None else None)
    metrics = IngestMetrics()
    recorder = candle_recorder(settings, candles, metrics.registry)
    service = IngestService(settings, broker, market_source, metrics, candles=recorder)
    source = settings.source
    if source == "replay":
        source = f"replay of {settings.replay_file or 'the bundled sample'}"
    storage = "PostgreSQL" if settings.database_url else "in-memory"
    await serve(
        settings,
        broker,
        background=[service.run],
        candles=candles,
        banner=f"pricegate demo: {source} market for {', '.join(settings.symbols)}, in-memory broker, "
        f"{storage} candles\n",
    )


async def run_gateway(
    settings: Settings,
    *,
    sockets: Sequence[socket.socket] | None = None,
    on_serving: Callable[[int], None] | None = None,
) -> None:
    from pricegate_cli.storage import open_candle_store

    broker = _make_redis_broker(settings)
    if sockets is None:
        _check_gateway_ports(settings)
    await serve(settings, broker, candles=await open_candle_store(settings), sockets=sockets, on_serving=on_serving)


def _check_gateway_ports(settings: Settings) -> None:
    """A single gateway process's ports, tried before anything starts: a second gateway on a host with the defaults
    gets one line naming the setting (uvicorn would log its bind error among its startup lines, and prometheus_client
    would raise a traceback). A race with another process starting at the same moment remains possible."""
    from gateway.server import hold_port

    for name in ("port", "metrics_port"):
        port = getattr(settings, name)
        if not port:
            continue  # 0: the kernel picks a free port, or (metrics_port) no port of its own
        try:
            held, _ = hold_port(settings.host, port)
        except OSError as error:
            raise ConfigError(
                env_name(name),
                port,
                f"cannot listen on {settings.host}: {error.strerror or error} (another gateway on this host? give each "
                "its own port)",
            ) from None
        for sock in held:
            sock.close()


def _serve_ingest_metrics(settings: Settings, registry: Any) -> tuple[Any, int]:
    """Start ingest's /metrics server: ``(server, port)``, or ``(None, 0)`` when disabled. Several ingest processes
    on one host (README: run two or more) all start with the defaults: at the default port, a taken port moves to
    the next free one (logged); a port chosen by hand must be free. Otherwise one ConfigError line naming the
    setting, never a traceback."""
    from prometheus_client import start_http_server

    wanted = settings.ingest_metrics_port
    if not wanted:
        return None, 0
    default = next(spec.default for spec in dataclasses.fields(Settings) if spec.name == "ingest_metrics_port")
    last = min(wanted + INGEST_METRICS_PORT_SCAN, 65536) if wanted == default else wanted + 1
    ports = range(wanted, last)
    for port in ports:
        try:
            server, _ = start_http_server(port, addr=settings.host, registry=registry)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                continue
            raise ConfigError(
                env_name("ingest_metrics_port"),
                wanted,
                f"cannot serve /metrics on {settings.host}:{port}: {error.strerror or error}",
            ) from None
        if port != wanted:
            logging.getLogger("pricegate.ingest").warning(
                "%s=%d is taken (another ingest on this host?): /metrics on port %d instead",
                env_name("ingest_metrics_port"),
                wanted,
                port,
            )
        return server, port
    taken = f"ports {ports[0]}-{ports[-1]} are all" if len(ports) > 1 else "the port is"
    raise ConfigError(
        env_name("ingest_metrics_port"),
        wanted,
        f"{taken} in use on {settings.host} (another process?): give each ingest its own, or 0 to disable /metrics",
    )


async def run_ingest(settings: Settings) -> None:
    from ingest.metrics import UpstreamCollector
    from ingest.publish.backfill import TradeBackfiller
    from ingest.publish.leader import LeaderLease
    from ingest.service import IngestMetrics, IngestService
    from ingest.sources.binance.source import BinanceSource
    from pricegate_cli.storage import candle_recorder, open_candle_store

    broker = _make_redis_broker(settings)
    source = _make_source(settings)
    metrics = IngestMetrics()
    metrics_server, metrics_port = _serve_ingest_metrics(settings, metrics.registry)  # a taken port: said at once
    candles = await open_candle_store(settings)
    await _start_broker(broker, settings)
    recorder = candle_recorder(settings, candles, metrics.registry) if candles is not None else None
    assert settings.redis_url is not None  # _make_redis_broker refused to go on without it
    lease = LeaderLease(
        settings.redis_url,
        broker.namer.leader_key,
        ttl_s=settings.leader_ttl_s,
        renew_s=settings.leader_renew_s,
        fence=broker.take_fencing_epoch,  # a new leader's epoch reaches every slot before it publishes
    )
    fetcher = None
    if isinstance(source, BinanceSource):
        metrics.registry.register(UpstreamCollector(source))
        fetcher = TradeBackfiller(source.rest, trades=settings.backfill_trades)
    service = IngestService(
        settings, broker, source, metrics, candles=recorder, lease=lease, fetcher=fetcher, gc_freeze=True
    )
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel if main else (lambda: None))
    print(
        f"pricegate ingest: {settings.source} source publishing to {broker.safe_url} while it holds the leader lease "
        f"{lease.key} (as {lease.token})"
        + (f"; /metrics on http://{settings.host}:{metrics_port}/metrics" if metrics_server is not None else ""),
        flush=True,
    )
    try:
        await service.run()
    except asyncio.CancelledError:
        logging.getLogger("pricegate.ingest").info("stopping on signal")
    finally:
        await broker.close()
        if candles is not None:
            await candles.close()
        if metrics_server is not None:
            metrics_server.shutdown()


async def run_record(settings: Settings, args: argparse.Namespace) -> None:
    from ingest.sources.replay.recorder import record

    # SIGTERM and SIGINT end the recording like --duration does: the file is complete and the count printed.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    streams = [name.strip() for name in args.streams.split(",") if name.strip()]
    try:
        count = await record(
            settings.binance_ws_url,
            streams,
            args.out,
            duration_s=args.duration,
            max_messages=args.max_messages,
            stop=stop,
        )
    except ConfigError as error:
        # record() names its parameters; the user typed the command's flags.
        flags = {"streams": "--streams", "duration_s": "--duration", "max_messages": "--max-messages"}
        flag = flags.get(error.setting)
        if flag is None:
            raise
        raise ConfigError(flag, error.value, error.problem) from None
    print(f"recorded {count} frames to {args.out}", flush=True)


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. Windows): asyncio's loop works, slower
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "watch":  # a client: it reads no setting
        from pricegate_cli.watch import run_watch

        return run_watch(args)
    environ = dict(os.environ)
    unknown = unknown_variables(environ)
    try:
        try:
            settings = load_settings(args, environ)
        except ConfigError:
            for warning in unknown:  # a misspelt variable may be why
                print(f"pricegate: warning: {warning}", file=sys.stderr)
            raise
        _configure_logging(settings)
        for warning in unknown:
            logging.getLogger("pricegate.settings").warning("%s", warning)
        if args.command == "gateway":
            from pricegate_cli.workers import supervise, worker_count

            workers = worker_count(settings)
            if workers > 1:  # --workers 1 is the single process, exactly as without the setting
                return supervise(settings, workers)
        with _runner() as runner:
            if args.command == "demo":
                runner.run(run_demo(settings))
            elif args.command == "gateway":
                runner.run(run_gateway(settings))
            elif args.command == "ingest":
                runner.run(run_ingest(settings))
            elif args.command == "record":
                runner.run(run_record(settings, args))
            elif args.command == "db":
                from pricegate_cli.storage import run_db

                print(runner.run(run_db(settings, args.action)), flush=True)
            elif args.command == "keys":
                from pricegate_cli.keys import run_keys

                label, key = getattr(args, "label", None), getattr(args, "key", None)
                print(runner.run(run_keys(settings, args.keys_action, label=label, key=key)), flush=True)
    except ConfigError as error:
        print(f"pricegate: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except PricegateError as error:
        print(f"pricegate: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
