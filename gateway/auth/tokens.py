"""JWT connection tokens verified into a :class:`~gateway.auth.principal.Principal` (pure: the clock is passed in).

A browser cannot set headers on a WebSocket, so its own backend mints a short-lived token and the browser passes
it as ``?token=``. Accepted: HS256 with the UTF-8 bytes of ``PRICEGATE_JWT_SECRET`` (at least 32 bytes, RFC 7518
§3.2), RS256 or ES256 (P-256) with ``PRICEGATE_JWT_PUBLIC_KEY``. Each key is bound to its one algorithm here, so a
token's ``alg`` header only picks among configured pairs: ``none``, or HS256 signed with the public key as the
secret (the classic key-confusion attack), is refused. ``exp`` is required; expiry and ``nbf`` are checked here
against the caller's clock with :data:`LEEWAY_S` (PyJWT would read the real clock). An optional ``streams``
claim lists the stream-name globs the connection may have (``["*@ticker", "btcusdt@*"]``). ``aud`` and ``iss``
are not checked: use a secret or key pair for pricegate alone.

Every failure is an :class:`~gateway.auth.principal.AuthRefusal` with a short reason that never repeats the
token; nothing raises out of :meth:`TokenVerifier.verify` for any input.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.auth.principal import AuthRefusal, Principal, refused

MAX_TOKEN_BYTES = 4096  # a token is a few hundred bytes; anything longer is refused before it is parsed
LEEWAY_S = 10.0  # clock skew tolerated between the minting backend and the gateway (exp and nbf)
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key of at least the hash size
MAX_PATTERNS = 256  # entries of a streams claim
MAX_PATTERN_LENGTH = 128
_PUBLIC = "jwt_public_key"


class KeyConfigError(ValueError):
    """The configured secret or public key cannot verify tokens: ``setting`` names which, the message why."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting  # "jwt_secret" | "jwt_public_key"


def public_key_algorithm(pem: bytes) -> tuple[str, Any]:
    """(algorithm, key) for a PEM public key: RSA -> RS256, EC P-256 -> ES256; KeyConfigError otherwise."""
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as error:
        raise KeyConfigError(_PUBLIC, f"not a PEM public key ({type(error).__name__})") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise KeyConfigError(_PUBLIC, f"an RSA key of {key.key_size} bits is too short (at least 2048)")
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise KeyConfigError(_PUBLIC, "only RSA (RS256) and EC P-256 (ES256) public keys are supported")


def subject_of(sub: str) -> str:
    """The principal's subject for a token's ``sub``: a digest prefix, so no personal data reaches key names."""
    return hashlib.sha256(sub.encode("utf-8", "surrogatepass")).hexdigest()[:16]


VERIFIED_CACHE_SIZE = 10_000


class TokenVerifier:
    """Verifies connection tokens against the configured keys."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key_pem: bytes | None = None,
        leeway_s: float = LEEWAY_S,
        clock: Callable[[], float],
    ) -> None:
        self.keys: dict[str, Any] = {}
        if secret:
            secret_bytes = secret.encode()
            if len(secret_bytes) < MIN_SECRET_BYTES:
                raise KeyConfigError("jwt_secret", f"an HS256 secret needs at least {MIN_SECRET_BYTES} bytes")
            self.keys["HS256"] = secret_bytes
        if public_key_pem:
            algorithm, key = public_key_algorithm(public_key_pem)
            self.keys[algorithm] = key
        if not self.keys:
            raise KeyConfigError("jwt_secret", "no secret and no public key")
        self.leeway_s = leeway_s
        self.clock = clock
        # Claims of tokens whose signature already verified, by the token's digest: a reconnect storm of browsers
        # presents the same tokens again, and a signature check costs ~100 us where this costs ~1 us. Expiry and
        # the other time claims are still judged on every use; bounded, oldest first out.
        self._verified: OrderedDict[bytes, dict[str, Any]] = OrderedDict()

    def verify(self, token: str) -> Principal | AuthRefusal:
        if len(token) > MAX_TOKEN_BYTES:
            return refused("malformed", f"token too long (at most {MAX_TOKEN_BYTES} bytes)")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        claims = self._verified.get(digest)
        if claims is not None:
            self._verified.move_to_end(digest)
            return self._principal(claims)
        outcome = self._verify_signature(token)
        if isinstance(outcome, AuthRefusal):
            return outcome
        self._verified[digest] = outcome
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return self._principal(outcome)

    def _verify_signature(self, token: str) -> dict[str, Any] | AuthRefusal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return refused("malformed", "token malformed: not a JWT")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.keys:
            shown = algorithm if isinstance(algorithm, str) and len(algorithm) <= 16 else "?"
            accepted = ", ".join(sorted(self.keys))
            return refused("invalid", f"token algorithm {shown!r} not accepted (accepted: {accepted})")
        try:
            claims = jwt.decode(
                token,
                self.keys[algorithm],
                algorithms=[algorithm],
                # Time claims and sub are checked below (on our clock); no audience or issuer is configured.
                options={
                    "require": ["exp"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            return refused("invalid", "token signature invalid")
        except jwt.MissingRequiredClaimError:
            return refused("malformed", "token has no exp claim")
        except jwt.PyJWTError:
            return refused("malformed", "token malformed")
        return claims

    def _principal(self, claims: dict[str, Any]) -> Principal | AuthRefusal:
        now = self.clock()
        expires_at = _number(claims.get("exp"))
        if expires_at is None:
            return refused("malformed", "token exp claim is not a number")
        if expires_at + self.leeway_s <= now:
            return refused("expired", "token expired")
        if "nbf" in claims:
            not_before = _number(claims["nbf"])
            if not_before is None:
                return refused("malformed", "token nbf claim is not a number")
            if not_before - self.leeway_s > now:
                return refused("invalid", "token not valid yet (nbf)")
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            return refused("malformed", "token sub claim is not a string")
        patterns = claims.get("streams")
        if patterns is not None and not _valid_patterns(patterns):
            return refused(
                "malformed",
                f"token streams claim must be a list of at most {MAX_PATTERNS} stream patterns "
                f"(strings of 1-{MAX_PATTERN_LENGTH} characters)",
            )
        return Principal(
            "jwt",
            subject_of(sub) if sub else "",
            tuple(pattern.lower() for pattern in patterns) if patterns is not None else None,
            expires_at,
        )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) else None


def _valid_patterns(patterns: object) -> bool:
    return (
        isinstance(patterns, list)
        and len(patterns) <= MAX_PATTERNS
        and all(isinstance(pattern, str) and 0 < len(pattern) <= MAX_PATTERN_LENGTH for pattern in patterns)
    )
