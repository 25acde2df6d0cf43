"""Whether a WebSocket handshake is accepted: the parsed stream URL and who the client is, or why it is refused.

Both connection kinds (the native uvicorn protocol and the ASGI fallback) describe the upgrade request as a
:class:`Handshake` and ask :class:`Admission` before answering it, so a refused client never costs a session.
Checks run cheapest first: capacity (503), Origin (403), the path (404), credentials (401, or 503 while they
cannot be verified), the credential's own connection limit (429). Authentication may need I/O (an API key not
in any cache): then :meth:`Admission.admit` returns an awaitable and the connection waits for it with reading
paused. Refusals are counted by a bounded reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from gateway.auth.principal import ANONYMOUS, AuthRefusal, Principal
from gateway.edge.origins import OriginPolicy
from gateway.ws.control import ConnectRequest, error_frame, parse_connect_path
from shared.errors import ProtocolError
from shared.streams import INVALID_REQUEST

AuthOutcome = Principal | AuthRefusal
# (api key, token) -> who it is, or why refused; an awaitable when deciding needs I/O.
Authenticate = Callable[[str | None, str | None], AuthOutcome | Awaitable[AuthOutcome]]


@dataclass(frozen=True, slots=True)
class Handshake:
    path: str  # percent-decoded
    query: str  # raw query string
    origin: str | None
    api_key: str | None  # X-MBX-APIKEY
    token: str | None  # ?token= (a JWT connection token)
    client_ip: str  # after trusted-proxy resolution ("" when unknown)


@dataclass(frozen=True, slots=True)
class Admitted:
    connect: ConnectRequest
    principal: Principal
    client_ip: str


class Rejection:
    """A handshake the gateway refuses, with the HTTP status and text to answer."""

    __slots__ = ("headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers or {}


Decision = Admitted | Rejection


def query_token(query: str) -> str | None:
    """The ``token`` query parameter, if any (cheap: most URLs have none)."""
    if "token=" not in query:
        return None
    for part in query.split("&"):
        if part.startswith("token="):
            return part[len("token=") :] or None
    return None


def handshake_from(
    path: str, query: str, header_values: Callable[[str], Sequence[str]], client_ip: str
) -> Handshake | Rejection:
    """A :class:`Handshake` from an upgrade request's parts (``header_values`` gives every value of a header,
    case-insensitively), or 400 when a single-valued header is sent more than once: which value counts would be a
    guess."""
    single: dict[str, str | None] = {}
    for name in ("origin", "x-mbx-apikey"):
        values = header_values(name)
        if len(values) > 1:
            return Rejection(400, f"Invalid request: the {name} header is sent more than once", {})
        single[name] = values[0] if values else None
    return Handshake(
        path=path,
        query=query,
        origin=single["origin"],
        api_key=single["x-mbx-apikey"],
        token=query_token(query),
        client_ip=client_ip,
    )


class Admission:
    """Decides on handshakes for one gateway process."""

    def __init__(
        self,
        *,
        max_streams: int,
        is_known_symbol: Callable[[str], bool],
        unavailable: Callable[[], str | None],
        rejected: Callable[[str], None],
        origins: OriginPolicy | None = None,
        authenticate: Authenticate | None = None,
        key_limit: Callable[[Principal], bool] | None = None,
    ) -> None:
        self.max_streams = max_streams
        self.is_known_symbol = is_known_symbol
        self.unavailable = unavailable  # why no new connection is taken now (draining, full), or None
        self.rejected = rejected  # counts a refusal by reason
        self.origins = origins or OriginPolicy(())
        self.authenticate = authenticate  # None: authentication off (everyone is ANONYMOUS)
        self.key_limit = key_limit  # False when the principal's credential holds all the connections it may

    def admit(self, handshake: Handshake) -> Decision | Awaitable[Decision]:
        reason = self.unavailable()
        if reason is not None:
            return self._reject(reason, Rejection(503, f"gateway unavailable: {reason}", {"Retry-After": "1"}))
        if not self.origins.allows(handshake.origin):
            return self._reject("origin", Rejection(403, "origin not allowed"))
        try:
            connect = parse_connect_path(
                handshake.path, handshake.query, max_streams=self.max_streams, is_known_symbol=self.is_known_symbol
            )
        except ProtocolError as error:
            return self._reject("not_found", Rejection(404, error.reason))
        if self.authenticate is None:
            return Admitted(connect, ANONYMOUS, handshake.client_ip)
        outcome = self.authenticate(handshake.api_key, handshake.token)
        if isinstance(outcome, Principal | AuthRefusal):
            return self._decide(connect, outcome, handshake.client_ip)
        return self._decide_later(connect, outcome, handshake.client_ip)

    async def _decide_later(self, connect: ConnectRequest, pending: Awaitable[AuthOutcome], client_ip: str) -> Decision:
        return self._decide(connect, await pending, client_ip)

    def _decide(self, connect: ConnectRequest, outcome: AuthOutcome, client_ip: str) -> Decision:
        if isinstance(outcome, AuthRefusal):
            headers = {"Retry-After": "1"} if outcome.status == 503 else {}
            return self._reject(f"auth_{outcome.reason}", Rejection(outcome.status, outcome.message, headers))
        if self.key_limit is not None and not self.key_limit(outcome):
            return self._reject("connections_per_key", Rejection(429, "too many connections for this API key"))
        return Admitted(restrict(connect, outcome), outcome, client_ip)

    def _reject(self, reason: str, rejection: Rejection) -> Rejection:
        self.rejected(reason)
        return rejection


def restrict(connect: ConnectRequest, principal: Principal) -> ConnectRequest:
    """The URL's streams the principal may have; each other one becomes an error frame (as an invalid name does:
    Binance-style clients would only reconnect in a loop if the whole connection were refused)."""
    if principal.patterns is None:
        return connect
    allowed = [stream for stream in connect.streams if principal.allows(stream.name)]
    if len(allowed) == len(connect.streams):
        return connect
    errors = [
        error_frame(INVALID_REQUEST, f"Invalid request: stream {stream.name!r} is not allowed by your token", None)
        for stream in connect.streams
        if not principal.allows(stream.name)
    ]
    return replace(connect, streams=allowed, errors=[*connect.errors, *errors])
