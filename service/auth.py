"""Users, password hashing (Argon2id, memory-hard) and API keys (random, stored as SHA-256)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import ApiKey, User, utcnow

ROLES = ("clinician", "admin", "service")
API_KEY_PREFIX = "fn_"
#: Argon2id with 64 MiB memory, 3 passes (RFC 9106's second recommended option).
_hasher = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=2)
MIN_PASSWORD_LENGTH = 10


class AuthError(ValueError):
    """A user or key operation that cannot be done; the message says why."""


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    if not password_hash:
        return False
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def password_needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


def create_user(session: Session, username: str, password: str | None, *, role: str = "clinician",
                display_name: str = "", referring_physician_name: str | None = None) -> User:
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}")
    if not username or len(username) > 64:
        raise AuthError("username must be 1-64 characters")
    if session.scalar(select(User).where(User.username == username)):
        raise AuthError(f"user {username!r} already exists")
    user = User(username=username, role=role, display_name=display_name or username,
                referring_physician_name=referring_physician_name,
                password_hash=hash_password(password) if password else None)
    session.add(user)
    session.flush()
    return user


def generate_password() -> str:
    return secrets.token_urlsafe(15)


def _key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_api_key(session: Session, user: User, name: str) -> tuple[ApiKey, str]:
    """Create a key for ``user``; returns the row and the plaintext key, which is shown only once."""
    prefix = secrets.token_hex(4)
    plaintext = f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(user_id=user.id, name=name, prefix=prefix, key_hash=_key_hash(plaintext))
    session.add(key)
    session.flush()
    return key, plaintext


def verify_api_key(session: Session, plaintext: str, *, touch: bool = True) -> ApiKey | None:
    """The active key matching ``plaintext``, or None. Records last use when ``touch``."""
    if not plaintext.startswith(API_KEY_PREFIX):
        return None
    prefix = plaintext[len(API_KEY_PREFIX):].split("_", 1)[0]
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None or key.revoked_at is not None or not key.user.is_active:
        return None
    if not hmac.compare_digest(key.key_hash, _key_hash(plaintext)):
        return None
    if touch:
        key.last_used_at = utcnow()
    return key


def revoke_api_key(session: Session, prefix: str) -> ApiKey:
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None:
        raise AuthError(f"no API key with prefix {prefix!r}")
    if key.revoked_at is None:
        key.revoked_at = dt.datetime.now(dt.UTC)
    return key
