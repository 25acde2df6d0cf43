"""The reconnect policy (shared.backoff): delay bounds, growth, jitter range, retryable/fatal classification."""

from __future__ import annotations

import asyncio
import errno
import itertools
import random
from collections.abc import Iterator
from typing import Any

import pytest

from shared.backoff import backoff_delays, is_retryable


def take(iterator: Iterator[float], count: int) -> list[float]:
    return list(itertools.islice(iterator, count))


def test_without_jitter_delays_grow_geometrically_then_stay_at_the_cap() -> None:
    delays = take(backoff_delays(initial=0.1, maximum=1.0, factor=2, jitter=0), 8)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_the_sequence_is_endless_and_never_exceeds_the_cap() -> None:
    delays = take(backoff_delays(initial=0.5, maximum=5.0, factor=3, jitter=0), 10_000)
    assert len(delays) == 10_000
    assert max(delays) == 5.0
    assert delays[-1] == 5.0


def test_jittered_delays_stay_within_the_upper_jitter_fraction_of_the_nominal_delay() -> None:
    rng = random.Random(7)
    nominal = [min(5.0, 0.1 * 2**n) for n in range(12)]
    for _ in range(200):
        delays = take(backoff_delays(initial=0.1, maximum=5.0, factor=2, jitter=0.5, rng=rng), 12)
        for delay, expected in zip(delays, nominal, strict=True):
            assert expected * 0.5 <= delay <= expected


def test_jitter_actually_spreads_processes_apart() -> None:
    rng = random.Random(11)
    firsts = {next(backoff_delays(initial=1.0, maximum=10.0, jitter=1.0, rng=rng)) for _ in range(100)}
    assert len(firsts) > 90  # full jitter: practically every process picks its own delay
    assert min(firsts) < 0.2 and max(firsts) > 0.8


def test_a_seeded_generator_gives_a_reproducible_schedule() -> None:
    first = take(backoff_delays(jitter=0.3, rng=random.Random(3)), 20)
    second = take(backoff_delays(jitter=0.3, rng=random.Random(3)), 20)
    assert first == second


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"initial": 0}, "initial"),
        ({"initial": 2.0, "maximum": 1.0}, "maximum"),
        ({"factor": 0.5}, "factor"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
    ],
)
def test_nonsensical_parameters_are_rejected_with_the_parameter_named(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        next(backoff_delays(**kwargs))


class LibraryConnectionError(Exception):
    """Stands in for a client library's own connection error (not a builtin ConnectionError)."""


class LibraryAuthError(LibraryConnectionError):
    """Stands in for an authentication error that subclasses the library's connection error."""


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(),
        ConnectionResetError(),
        BrokenPipeError(),
        TimeoutError(),
        EOFError(),
        OSError(errno.EHOSTUNREACH, "No route to host"),
        OSError(errno.ENETUNREACH, "Network is unreachable"),
    ],
)
def test_network_trouble_is_retryable(error: BaseException) -> None:
    assert is_retryable(error)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bug"),
        KeyError("bug"),
        OSError(errno.EACCES, "Permission denied"),
        OSError("no errno"),
        LibraryConnectionError(),  # unknown to the classifier unless the caller declares it
    ],
)
def test_everything_else_is_fatal_by_default(error: BaseException) -> None:
    assert not is_retryable(error)


def test_cancellation_is_never_retried() -> None:
    assert not is_retryable(asyncio.CancelledError())


def test_callers_declare_their_library_errors_and_fatal_wins_over_retryable() -> None:
    retryable = (LibraryConnectionError,)
    fatal = (LibraryAuthError,)
    assert is_retryable(LibraryConnectionError(), retryable=retryable, fatal=fatal)
    assert not is_retryable(LibraryAuthError(), retryable=retryable, fatal=fatal)
    # fatal also overrides the builtin defaults
    assert not is_retryable(ConnectionResetError(), fatal=(ConnectionResetError,))
