"""Which browser origins may open a WebSocket (pure).

``PRICEGATE_ALLOWED_ORIGINS`` lists origins matched exactly (``https://app.example.com``) or with ``*`` wildcards
where written (``https://*.example.com``; a ``*`` never spans a ``/``); matching ignores case, as origins do. An
empty list allows every origin. A handshake without an ``Origin`` header comes from a non-browser client (bots,
libraries) and is always allowed: the policy protects browsers' users from other sites opening connections in their
name, it is not authentication.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


class OriginPolicy:
    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(pattern.strip().lower() for pattern in patterns if pattern.strip())
        self._regex = (
            re.compile("|".join("(?:" + "[^/]*".join(map(re.escape, p.split("*"))) + ")" for p in self.patterns))
            if self.patterns
            else None
        )

    def allows(self, origin: str | None) -> bool:
        if origin is None or self._regex is None:
            return True
        return self._regex.fullmatch(origin.strip().lower()) is not None
