"""API-key authentication and per-key rate limiting for the REST API.

Only ``Authorization: Bearer fn_...`` authorises the API: the portal's session cookie is never read here.
A key is valid when it exists, is not revoked and its user is active; each use records ``last_used_at``.
Failures are 401 with ``WWW-Authenticate: Bearer``.

Rate limiting is a token bucket per key, kept in this process (with N web processes a key gets N buckets):
``API_RATE_LIMIT_BURST`` requests at once, refilled at ``API_RATE_LIMIT_PER_SECOND`` (Flask config; defaults
60 and 10). An empty bucket is 429 with ``Retry-After``.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import current_app, g, request

from service.auth import verify_api_key
from service.errors import ServiceError
from service.extensions import current_db
from service.models import User

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_BURST = 60
DEFAULT_RATE = 10.0


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class TooManyRequests(ServiceError):
    status, code = 429, "rate_limited"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key (by its public prefix) and its user (detached, attributes loaded)."""

    key_id: int
    prefix: str
    user: User

    @property
    def actor(self) -> str:
        return self.prefix


class TokenBucket:
    """Thread-safe token buckets keyed by a string."""

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate = burst, rate
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token; return 0 when allowed, else the seconds until a token is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._state.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                return 0.0
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / self.rate if self.rate > 0 else 3600.0


def _bucket() -> TokenBucket:
    app = current_app
    bucket: TokenBucket | None = app.extensions.get("fracture.api_rate")
    if bucket is None:
        bucket = TokenBucket(int(app.config.get("API_RATE_LIMIT_BURST", DEFAULT_BURST)),
                             float(app.config.get("API_RATE_LIMIT_PER_SECOND", DEFAULT_RATE)))
        app.extensions["fracture.api_rate"] = bucket
    return bucket


def authenticate() -> Principal:
    """The caller's :class:`Principal` from the bearer token, or :class:`Unauthorized`."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    with current_db().session() as session:
        key = verify_api_key(session, token.strip(), touch=True)
        if key is None:
            raise Unauthorized("the API key is invalid, revoked, or its user is disabled")
        user = key.user
        principal = Principal(key_id=key.id, prefix=key.prefix, user=user)
        session.expunge(user)
    return principal


def require_api_key(view: F) -> F:
    """Authenticate the request (401), then rate-limit its key (429); sets ``g.principal``."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        principal = authenticate()
        wait = _bucket().take(principal.prefix)
        if wait > 0:
            g.retry_after = max(1, math.ceil(wait))
            raise TooManyRequests("too many requests for this API key; retry later",
                                  details={"retry_after_seconds": g.retry_after})
        g.principal = principal
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def principal() -> Principal:
    found: Principal = g.principal
    return found
