"""What this process knows about API keys without asking anyone (pure: the clock is passed in).

:func:`parse_key` turns a presented key into its digest, or a format refusal, without any lookup. :class:`KeyCache`
holds validated keys and recently refused ones in two separate LRUs, so a flood of random keys can evict only
other refusals, never a key that works (which must keep working while PostgreSQL is down). A valid entry is
*fresh* until ``auth_cache_ttl_s`` after the database check it comes from (not after it reached this process:
a copy read from Redis near the end of its life must not get a new lifetime, or revocation would take longer
than the bound), and *stale* after that: stale entries are served only while the database cannot answer.
:func:`redis_value` / :func:`parse_redis_value` are the shared Redis cache's value format.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

import orjson

from gateway.auth.principal import AuthRefusal, Principal, refused

KEY_FORMAT: Final = re.compile(r"[0-9a-f]{64}")  # what `pricegate keys create` issues (secrets.token_hex(32))
MAX_KEYS: Final = 100_000  # valid keys remembered (each entry is a few hundred bytes)
MAX_UNKNOWN: Final = 10_000  # refused keys remembered: bounded whatever a client sends
UNKNOWN_TTL_S: Final = 5.0  # how long a refusal is remembered (capped by the cache TTL)

FRESH: Final = "fresh"
STALE: Final = "stale"
REFUSED: Final = "refused"
ABSENT: Final = "absent"


def parse_key(key: str) -> str | AuthRefusal:
    """The key's SHA-256 (hex), or why it cannot be a key (checked without a lookup; never echoes the key)."""
    if not key:
        return refused("missing", "API key missing: send it in the X-MBX-APIKEY header")
    if len(key) != 64 or KEY_FORMAT.fullmatch(key) is None:
        return refused("malformed", "API key format invalid: expected 64 lowercase hex characters")
    return hashlib.sha256(key.encode()).hexdigest()


def key_principal(digest: str) -> Principal:
    return Principal("apikey", digest[:16], digest=digest)


@dataclass(slots=True)
class KeyEntry:
    principal: Principal
    label: str
    checked_at: float  # unix seconds of the database check this entry comes from
    fresh_until: float


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused key, remembered briefly so a client retrying it does not cost a lookup each time."""

    refusal: AuthRefusal
    until: float


class KeyCache:
    def __init__(
        self,
        ttl_s: float,
        *,
        max_keys: int = MAX_KEYS,
        max_unknown: int = MAX_UNKNOWN,
        unknown_ttl_s: float = UNKNOWN_TTL_S,
    ) -> None:
        self.ttl_s = ttl_s
        self.unknown_ttl_s = min(unknown_ttl_s, ttl_s)
        self.max_keys = max_keys
        self.max_unknown = max_unknown
        self._valid: OrderedDict[str, KeyEntry] = OrderedDict()
        self._refused: OrderedDict[str, Refusal] = OrderedDict()

    def __len__(self) -> int:
        return len(self._valid)

    @property
    def refused_count(self) -> int:
        return len(self._refused)

    def get(self, digest: str, now: float) -> tuple[str, KeyEntry | AuthRefusal | None]:
        """(``fresh``, entry) | (``stale``, entry) | (``refused``, refusal) | (``absent``, None)."""
        entry = self._valid.get(digest)
        if entry is not None:
            self._valid.move_to_end(digest)
            return (FRESH if now < entry.fresh_until else STALE), entry
        remembered = self._refused.get(digest)
        if remembered is not None:
            if now < remembered.until:
                return REFUSED, remembered.refusal
            del self._refused[digest]
        return ABSENT, None

    def entry(self, digest: str) -> KeyEntry | None:
        """The valid entry of ``digest`` (fresh or stale) without touching the LRU order."""
        return self._valid.get(digest)

    def put_valid(self, digest: str, label: str, checked_at: float) -> KeyEntry:
        self._refused.pop(digest, None)
        entry = self._valid.get(digest)
        fresh_until = checked_at + self.ttl_s
        if entry is None:
            entry = self._valid[digest] = KeyEntry(key_principal(digest), label, checked_at, fresh_until)
            while len(self._valid) > self.max_keys:
                self._valid.popitem(last=False)
        elif checked_at >= entry.checked_at:
            entry.label, entry.checked_at, entry.fresh_until = label, checked_at, fresh_until
        self._valid.move_to_end(digest)
        return entry

    def put_refused(self, digest: str, refusal: AuthRefusal, now: float, ttl_s: float | None = None) -> None:
        """Forget ``digest`` as valid and remember the refusal for a few seconds."""
        self._valid.pop(digest, None)
        self._refused[digest] = Refusal(refusal, now + (self.unknown_ttl_s if ttl_s is None else ttl_s))
        self._refused.move_to_end(digest)
        while len(self._refused) > self.max_unknown:
            self._refused.popitem(last=False)


# ---- the shared (Redis) cache's values ----


def redis_value(label: str | None, checked_at: float, reason: str = "") -> bytes:
    """A validated key (``label`` given) or a refused one (``reason``: invalid | revoked), checked at ``checked_at``."""
    if label is not None:
        return orjson.dumps({"valid": True, "label": label, "checked_at": checked_at})
    return orjson.dumps({"valid": False, "reason": reason, "checked_at": checked_at})


def parse_redis_value(raw: bytes) -> tuple[str | None, str, float] | None:
    """(label or None when refused, refusal reason, checked_at); None for a value this code did not write."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    checked_at = value.get("checked_at")
    if isinstance(checked_at, bool) or not isinstance(checked_at, int | float) or not math.isfinite(checked_at):
        return None
    if value.get("valid") is True and isinstance(value.get("label"), str):
        return value["label"], "", float(checked_at)
    if value.get("valid") is False and value.get("reason") in ("invalid", "revoked"):
        return None, str(value["reason"]), float(checked_at)
    return None
