"""Reconnect policy as data: jittered exponential delays and a retryable-versus-fatal error classifier.

:func:`backoff_delays` yields an endless sequence of sleep durations (seconds) that grows geometrically from
``initial`` up to ``maximum``, each drawn uniformly from the upper ``jitter`` fraction of its nominal value so a
fleet of processes that lost the same server does not reconnect in lock-step. :func:`is_retryable` says whether
an exception means "the peer is (perhaps briefly) unreachable, try again" or "retrying cannot help" (bad
credentials, a bug); callers pass their library's own exception types because this module imports no I/O
library. Both are pure so the policy is tested without sockets or an event loop.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator

# Builtin exceptions that mean "the network or the server is temporarily unavailable". ConnectionError covers
# refused/reset/aborted connections and broken pipes; TimeoutError is also asyncio.TimeoutError on 3.11+;
# EOFError is what several stream readers raise on an unexpected close.
DEFAULT_RETRYABLE: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, EOFError)

# Plain OSErrors (not ConnectionError subclasses) that are still transient: routing and interface trouble that
# typically heals when a pod or a node comes back.
TRANSIENT_ERRNOS: frozenset[int] = frozenset(
    {
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.ETIMEDOUT,
        errno.EAGAIN,
    }
)


def backoff_delays(
    initial: float = 0.1,
    maximum: float = 5.0,
    factor: float = 2.0,
    jitter: float = 0.5,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Endless reconnect delays: nominal ``initial * factor**n`` capped at ``maximum``, each drawn uniformly
    from ``[nominal * (1 - jitter), nominal]``.

    ``jitter=0`` gives the deterministic schedule, ``jitter=1`` "full jitter" (anywhere from 0 to nominal).
    Start a fresh iterator after each successful connection so the next outage starts short again.
    """
    if initial <= 0 or maximum < initial:
        raise ValueError(f"need 0 < initial <= maximum, got initial={initial!r} maximum={maximum!r}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor!r}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be within [0, 1], got {jitter!r}")
    draw = (rng or random).random
    nominal = initial
    while True:
        yield nominal * (1.0 - jitter * draw())
        # Once capped, stay capped (and avoid float overflow after many attempts).
        nominal = min(maximum, nominal * factor)


def is_retryable(
    error: BaseException,
    *,
    retryable: tuple[type[BaseException], ...] = (),
    fatal: tuple[type[BaseException], ...] = (),
) -> bool:
    """True when ``error`` is worth retrying after a backoff delay.

    ``fatal`` wins over everything (e.g. an authentication error that subclasses the library's connection
    error); then ``retryable`` (the library's transient errors) and :data:`DEFAULT_RETRYABLE`; then plain
    OSErrors whose errno is in :data:`TRANSIENT_ERRNOS`. Anything else (a bug, cancellation) is fatal.
    """
    if isinstance(error, fatal):
        return False
    if isinstance(error, retryable) or isinstance(error, DEFAULT_RETRYABLE):
        return True
    return isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS
