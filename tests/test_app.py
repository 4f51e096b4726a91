"""The application factory: proxy trust decides whether forwarded HTTPS marks the session cookie Secure."""

from __future__ import annotations

import dataclasses

import pytest

from config import Settings
from service.app import create_app
from service.auth import create_user
from service.db import Database

FORWARDED_HTTPS = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}


@pytest.mark.parametrize(("trusted", "secure"), [(0, False), (1, True)])
def test_session_cookie_is_secure_only_behind_a_trusted_tls_proxy(settings: Settings, trusted: int,
                                                                   secure: bool) -> None:
    db = Database.from_settings(settings)
    with db.session() as session:
        create_user(session, "jdoe", "a long enough password")
    app = create_app(dataclasses.replace(settings, trusted_proxies=trusted), db=db)
    app.config["WTF_CSRF_ENABLED"] = False
    response = app.test_client().post("/login", data={"username": "jdoe", "password": "a long enough password"},
                                      headers=FORWARDED_HTTPS)
    assert response.status_code == 302
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert ("Secure" in cookie) is secure
    db.dispose()
