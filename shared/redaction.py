"""Passwords out of URLs before they reach a log line, an error message or a metric: :func:`redact_url` is the one
redaction for every secret-bearing URL pricegate is given, Redis URLs (``redis://``, ``rediss://``, ``unix://``)
and PostgreSQL DSNs alike. It hides the password of the userinfo and the value of every ``password=`` argument
(``sslpassword=`` included) and leaves the rest as written, so the host, port and database still show."""

from __future__ import annotations

import re

# A password argument in a query string (``?password=pw&...``) or a libpq keyword DSN (``password = 'a b'``).
_PASSWORD_ARGUMENT = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^&\s]*)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with any password (in the userinfo or a ``password=`` argument) replaced by ``***``."""
    return _PASSWORD_ARGUMENT.sub(r"\1***", _redact_userinfo(url))


def _redact_userinfo(url: str) -> str:
    # The userinfo runs from "//" to the LAST "@": a password may hold an unencoded "@", "/", "?" or "#"
    # (generated base64 passwords often hold "/"), which would end the authority early for a URL parser and show
    # the rest of the password. The price is that an "@" later in the URL hides more than the password.
    start = url.find("//")
    at = url.rfind("@")
    if start < 0 or at < start:
        return url
    user, colon, _password = url[start + 2 : at].partition(":")
    if not colon:
        return url  # a user name alone is no secret
    # Rebuilt in place rather than with urlunsplit(), which would turn "unix:///path" into "unix:/path".
    return f"{url[: start + 2]}{user}:***{url[at:]}"
