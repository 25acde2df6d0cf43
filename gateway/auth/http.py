"""Credentials on REST requests and refusals in Binance's REST shape (pure).

A REST client sends an API key the Binance way (``X-MBX-APIKEY``) or a connection token as
``Authorization: Bearer <jwt>`` or ``?token=<jwt>``. A refusal is answered with Binance's body, byte for byte
what its clients match on (``{"code":-2014,"msg":"API-key format invalid."}`` for a missing or malformed
credential, ``-2015`` for one that is not accepted), with the precise reason in ``WWW-Authenticate``
(RFC 6750's ``error_description``), since Binance's message cannot carry it. A credential that cannot be
verified now (the key database is down) is 503 with ``-1001``, our message and ``Retry-After``.
"""

from __future__ import annotations

import orjson

from gateway.auth.principal import BINANCE_MESSAGES, AuthRefusal


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def rest_refusal(refusal: AuthRefusal) -> tuple[int, bytes, dict[str, str]]:
    """(HTTP status, body, headers) answering a refused REST request."""
    if refusal.status == 503:
        body = orjson.dumps({"code": refusal.code, "msg": refusal.message})
        return 503, body, {"Retry-After": "1"}
    body = orjson.dumps({"code": refusal.code, "msg": BINANCE_MESSAGES.get(refusal.code, refusal.message)})
    description = refusal.message.replace("\\", "").replace('"', "'")
    error = "invalid_request" if refusal.reason in ("missing", "malformed") else "invalid_token"
    challenge = f'Bearer realm="pricegate", error="{error}", error_description="{description}"'
    return refusal.status, body, {"WWW-Authenticate": challenge}
