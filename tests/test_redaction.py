"""shared.redaction.redact_url: no password of a Redis URL or a PostgreSQL DSN survives, and the rest still shows."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings, strategies as st

from shared.redaction import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Redis URLs
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:p%40ss@host:6380/1", "rediss://user:***@host:6380/1"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("unix:///run/redis.sock?db=2&password=pw", "unix:///run/redis.sock?db=2&password=***"),
        ("unix://u:pw@/run/redis.sock?db=2", "unix://u:***@/run/redis.sock?db=2"),
        ("redis://127.0.0.1:6379/9", "redis://127.0.0.1:6379/9"),
        # PostgreSQL DSNs
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("postgres://u:pw@h:5432/db?sslmode=require", "postgres://u:***@h:5432/db?sslmode=require"),
        ("postgresql://u@h/db?password=pw", "postgresql://u@h/db?password=***"),
        ("postgresql://u@h/db?password=pw&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
        ("postgresql:///db?host=/run/pg&password=pw", "postgresql:///db?host=/run/pg&password=***"),
        ("postgresql://h/db?sslpassword=k&password=pw", "postgresql://h/db?sslpassword=***&password=***"),
        ("postgresql://pricegate@127.0.0.1:5432/pricegate", "postgresql://pricegate@127.0.0.1:5432/pricegate"),
        ("host=h password=pw dbname=x", "host=h password=*** dbname=x"),
        ("host=h password = 'a b' dbname=x", "host=h password = *** dbname=x"),
        # Passwords a URL parser would cut short: the userinfo still ends at the last "@".
        ("redis://:ab/cd+ef=@host:6379/0", "redis://:***@host:6379/0"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p?w#x@h/db", "postgresql://u:***@h/db"),
        ("", ""),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


passwords = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=4, max_size=30).filter(
    lambda text: text.strip() == text and "***" not in text
)


@settings(max_examples=300, deadline=None)
@given(passwords, st.sampled_from(["redis", "rediss", "postgresql", "unix"]))
def test_no_userinfo_password_survives(password: str, scheme: str) -> None:
    url = f"{scheme}://user:{password}@host:1234/0?db=1"
    assume(password not in f"{scheme}://user:***@host:1234/0?db=1")
    assert password not in redact_url(url)
    assert redact_url(url).endswith("@host:1234/0?db=1")


@settings(max_examples=300, deadline=None)
@given(passwords.filter(lambda text: not any(c in text for c in "&'\\") and not any(c.isspace() for c in text)))
def test_no_password_argument_survives(password: str) -> None:
    assume(password not in "unix:///run/redis.sock?password=***&db=2 host=h dbname=x")
    assert password not in redact_url(f"unix:///run/redis.sock?password={password}&db=2")
    assert password not in redact_url(f"host=h password={password} dbname=x")
