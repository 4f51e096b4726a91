import pytest

from config import Settings
from service.auth import (
    AuthError,
    create_api_key,
    create_user,
    revoke_api_key,
    verify_api_key,
    verify_password,
)
from service.db import Database


def test_passwords_are_argon2id_and_verify(settings: Settings) -> None:
    db = Database.from_settings(settings)
    with db.session() as session:
        user = create_user(session, "jdoe", "correct horse battery", role="clinician")
        assert user.password_hash is not None
        assert user.password_hash.startswith("$argon2id$")
        assert "m=65536" in user.password_hash
        assert verify_password(user.password_hash, "correct horse battery")
        assert not verify_password(user.password_hash, "wrong password!")
        with pytest.raises(AuthError, match="already exists"):
            create_user(session, "jdoe", "another password")
    with pytest.raises(AuthError, match="at least"), db.session() as session:
        create_user(session, "short", "abc")
    db.dispose()


def test_api_keys_are_hashed_scoped_and_revocable(settings: Settings) -> None:
    db = Database.from_settings(settings)
    with db.session() as session:
        user = create_user(session, "ris", None, role="service")
        key, plaintext = create_api_key(session, user, "RIS bridge")
        assert plaintext not in (key.key_hash, key.prefix)
        assert verify_api_key(session, plaintext) is key
        assert key.last_used_at is not None
        assert verify_api_key(session, plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
        assert verify_api_key(session, "not-a-key") is None
        revoke_api_key(session, key.prefix)
        assert verify_api_key(session, plaintext) is None
    db.dispose()
