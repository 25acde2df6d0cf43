"""Authentication for one gateway process: credentials checked at the handshake, enforced on open connections.

:class:`Authenticator` is what ``create_app`` wires in when ``PRICEGATE_AUTH`` is not ``none``:

* :meth:`~Authenticator.authenticate` (admission and REST): an ``X-MBX-APIKEY`` key through the
  :class:`~gateway.auth.key_validator.KeyValidator`, or a JWT through the
  :class:`~gateway.auth.tokens.TokenVerifier`; a :class:`Principal` or an :class:`AuthRefusal`, at once when no
  I/O is needed, else an awaitable.
* :meth:`~Authenticator.key_limit`: ``PRICEGATE_MAX_CONNECTIONS_PER_KEY`` per API key or token subject, across
  replicas within about a second (:mod:`gateway.auth.key_counts`).
* Open connections: the node reports sessions opening and closing. A token connection is closed with 4401 when
  its token runs out (plus :data:`~gateway.auth.tokens.LEEWAY_S`) unless the client sent ``REFRESH_TOKEN``
  (:meth:`~Authenticator.refresh`) in time: one timer per process over one heap (:mod:`gateway.auth.expiry`),
  nothing per message. An API-key connection is closed with 4403 once its key no longer validates: every
  :attr:`~Authenticator.sweep_s` (at most a second) the keys of open connections whose cache entry is past its
  TTL are looked up again (Redis, then PostgreSQL; one lookup per key), so a revoked key's connections close
  within ``auth_cache_ttl_s`` plus a second and the lookup. While PostgreSQL is down, nothing is closed.

No key, token or ``sub`` is ever logged or used as a metric label: failures are counted by bounded reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from gateway.auth.api_keys import ApiKeys
from gateway.auth.expiry import ExpirySchedule
from gateway.auth.key_counts import ConnectionCounts
from gateway.auth.key_validator import KeyStore, KeyValidator, auth_redis
from gateway.auth.principal import AuthRefusal, Principal, refresh_problem, refused
from gateway.auth.tokens import LEEWAY_S, KeyConfigError, TokenVerifier
from gateway.ws.close_codes import CloseCode
from shared.db import create_pool
from shared.errors import ConfigError
from shared.settings import Settings, env_name

logger = logging.getLogger("pricegate.gateway.auth")

Outcome = Principal | AuthRefusal
AUTH_POOL_MAX = 4  # key lookups are rare (one per key per TTL): a few connections are plenty
FAILURE_REASONS = ("missing", "malformed", "invalid", "expired", "revoked", "unavailable")


class AuthenticatedSession(Protocol):
    """What the authenticator needs of an open connection (:class:`gateway.ws.session.Session`)."""

    principal: Principal

    def close(self, code: CloseCode, reason: str | None = None) -> None: ...


class AuthCounters(Protocol):
    """Bounded-label counters (:class:`gateway.metrics.GatewayMetrics` provides them)."""

    def auth_failure(self, reason: str) -> None: ...

    def auth_cache(self, result: str) -> None: ...

    def auth_key_lookup(self, result: str) -> None: ...


class _NoCounters:
    def auth_failure(self, reason: str) -> None:
        """Not counted."""

    def auth_cache(self, result: str) -> None:
        """Not counted."""

    def auth_key_lookup(self, result: str) -> None:
        """Not counted."""


def public_key_pem(value: str) -> bytes:
    """``PRICEGATE_JWT_PUBLIC_KEY`` as PEM bytes: the PEM itself, or a path to a file holding it."""
    if "-----BEGIN" in value:
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as error:
        raise ConfigError(env_name("jwt_public_key"), value, f"cannot read the key file: {error.strerror}") from None


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        counters: AuthCounters | None = None,
        *,
        store: KeyStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        modes = settings.auth_modes
        self.settings = settings
        self.modes = modes
        self.counters = counters or _NoCounters()
        self.clock = clock
        self.redis = auth_redis(settings.redis_url) if settings.redis_url else None
        self.keys: KeyValidator | None = None
        if "apikey" in modes:
            self.keys = KeyValidator(
                store,
                ttl_s=settings.auth_cache_ttl_s,
                redis=self.redis,
                prefix=settings.channel_prefix,
                cache_result=self.counters.auth_cache,
                lookup_result=self.counters.auth_key_lookup,
                clock=clock,
            )
        self.tokens: TokenVerifier | None = None
        if "jwt" in modes:
            self.tokens = _token_verifier(settings, clock)
        self.counts = ConnectionCounts(
            settings.max_connections_per_key, redis=self.redis, prefix=settings.channel_prefix, clock=clock
        )
        self.missing = refused("missing", _missing_message(modes))
        self.sweep_s = min(1.0, settings.auth_cache_ttl_s / 2)
        self.expiry: ExpirySchedule[AuthenticatedSession] = ExpirySchedule()
        self.by_digest: dict[str, set[AuthenticatedSession]] = {}  # open API-key connections by key digest
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._pool: Any = None

    # ---- lifecycle (the app's lifespan) ----
    async def start(self) -> None:
        """Open the key table's pool (no connection yet: a database down at start only refuses unknown keys)."""
        if self.keys is None or self.keys.store is not None or not self.settings.database_url:
            return
        self._pool = await create_pool(
            self.settings.database_url,
            schema=self.settings.database_schema,
            min_size=0,
            max_size=min(AUTH_POOL_MAX, self.settings.db_pool_max),
            statement_timeout_ms=self.settings.db_statement_timeout_ms,
        )
        self.keys.store = ApiKeys(self._pool)

    async def run(self) -> None:
        """Re-validate open connections' keys and share connection counts, until cancelled."""
        await asyncio.gather(self._sweep_forever(), self.counts.run())

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.counts.aclose()
        if self.keys is not None:
            await self.keys.aclose()
        elif self.redis is not None:
            await self.redis.aclose()
            await self.redis.connection_pool.disconnect()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)

    # ---- admission and REST ----
    def authenticate(self, api_key: str | None, token: str | None) -> Outcome | Awaitable[Outcome]:
        outcome: Outcome | Awaitable[Outcome]
        if api_key is not None and self.keys is not None:
            outcome = self.keys.check(api_key)
        elif token is not None and self.tokens is not None:
            outcome = self._verify_token(token)
        else:
            outcome = self.missing
        if isinstance(outcome, Principal):
            return outcome
        if isinstance(outcome, AuthRefusal):
            self.counters.auth_failure(outcome.reason)
            return outcome
        return self._counted(outcome)

    async def _counted(self, pending: Awaitable[Outcome]) -> Outcome:
        outcome = await pending
        if isinstance(outcome, AuthRefusal):
            self.counters.auth_failure(outcome.reason)
        return outcome

    def _verify_token(self, token: str) -> Outcome:
        assert self.tokens is not None
        try:
            return self.tokens.verify(unquote(token))
        except Exception:  # the verifier promises no exception; a library surprise must still be a 401, not a 500
            logger.exception("token verification raised")
            return refused("malformed", "token malformed")

    def key_limit(self, principal: Principal) -> bool:
        credential = principal.limit_key
        return credential is None or self.counts.allows(credential)

    # ---- open connections (the node reports them) ----
    def session_opened(self, session: AuthenticatedSession) -> None:
        principal = session.principal
        credential = principal.limit_key
        if credential is not None:
            self.counts.opened(credential)
        if principal.digest:
            self.by_digest.setdefault(principal.digest, set()).add(session)
        if principal.expires_at is not None:
            self._expire_at(session, principal.expires_at)

    def session_closed(self, session: AuthenticatedSession) -> None:
        principal = session.principal
        credential = principal.limit_key
        if credential is not None:
            self.counts.closed(credential)
        if principal.digest:
            sessions = self.by_digest.get(principal.digest)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del self.by_digest[principal.digest]
        self.expiry.remove(session)

    def refresh(self, session: AuthenticatedSession, token: str, subscribed: list[str]) -> Outcome:
        """A REFRESH_TOKEN: the new principal (the connection's deadline moved) or why the old one stays."""
        if self.tokens is None:
            return refused("invalid", "this gateway does not take connection tokens")
        outcome = self._verify_token(token)
        if isinstance(outcome, Principal):
            problem = refresh_problem(session.principal, outcome, subscribed)
            if problem is not None:
                outcome = refused("invalid", problem)
        if isinstance(outcome, AuthRefusal):
            self.counters.auth_failure(outcome.reason)
            return outcome
        assert outcome.expires_at is not None  # exp is a required claim
        self._expire_at(session, outcome.expires_at)
        return outcome

    # ---- token expiry: one timer per process ----
    def _expire_at(self, session: AuthenticatedSession, expires_at: float) -> None:
        deadline = expires_at + LEEWAY_S  # the same tolerance as at the handshake
        self.expiry.set(session, deadline)
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline - self.clock()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        try:
            for session in self.expiry.due(self.clock()):
                session.close(CloseCode.TOKEN_EXPIRED)
        finally:
            upcoming = self.expiry.next_deadline()
            if upcoming is not None:
                self._arm(upcoming)

    # ---- API-key re-validation ----
    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                await self.revalidate()
            except Exception:  # one bad sweep must not end re-validation for good
                logger.exception("re-validating the keys of open connections failed")

    async def revalidate(self) -> int:
        """Look up again the keys of open connections whose cache entry is past its TTL; close the connections of
        keys that no longer validate (4403). Returns the connections closed."""
        keys = self.keys
        if keys is None or not self.by_digest:
            return 0
        stale = [digest for digest in self.by_digest if not keys.is_fresh(digest)]
        if not stale:
            return 0
        outcomes = [keys.resolve(digest) for digest in stale]
        resolved = await asyncio.gather(*(_awaited(outcome) for outcome in outcomes))
        closed = 0
        for digest, outcome in zip(stale, resolved, strict=True):
            if isinstance(outcome, AuthRefusal) and outcome.reason in ("invalid", "revoked"):
                for session in list(self.by_digest.get(digest, ())):
                    session.close(CloseCode.CREDENTIAL_REVOKED)
                    closed += 1
        if closed:
            logger.info("closed %d connection(s) whose API key no longer validates", closed)
        return closed

    # ---- health ----
    def status(self) -> dict[str, Any]:
        """``/readyz``'s ``auth`` field. Readiness itself does not depend on it: validated keys and tokens keep
        working while the key database is down, and an unready replica would lose those clients too."""
        status: dict[str, Any] = {"modes": sorted(self.modes)}
        if self.keys is not None:
            status.update(self.keys.status())
        if self.tokens is not None:
            status["token_algorithms"] = sorted(self.tokens.keys)
        status["open_credentials"] = len(self.counts.local)
        return status


async def _awaited(outcome: Outcome | Awaitable[Outcome]) -> Outcome:
    if isinstance(outcome, Principal | AuthRefusal):
        return outcome
    return await outcome


def _token_verifier(settings: Settings, clock: Callable[[], float]) -> TokenVerifier:
    pem = public_key_pem(settings.jwt_public_key) if settings.jwt_public_key else None
    try:
        return TokenVerifier(secret=settings.jwt_secret, public_key_pem=pem, clock=clock)
    except KeyConfigError as error:
        raise ConfigError(env_name(error.setting), "<redacted>", str(error)) from None


def _missing_message(modes: frozenset[str]) -> str:
    if modes == {"apikey"}:
        return "API key missing: send it in the X-MBX-APIKEY header"
    if modes == {"jwt"}:
        return "token missing: pass ?token=<jwt> (on REST also Authorization: Bearer <jwt>)"
    return "credentials missing: send an API key in the X-MBX-APIKEY header, or a token as ?token=<jwt>"
