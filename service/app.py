"""The Flask application factory."""

from __future__ import annotations

import logging

from flask import Flask, Response

from config import Settings
from dicom import receive
from service.db import Database
from service.errors import register_error_handlers

log = logging.getLogger(__name__)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def create_app(settings: Settings | None = None, db: Database | None = None) -> Flask:
    """Build the web application. Tests pass their own ``settings`` (and may share a ``db``)."""
    settings = (settings or Settings.from_env()).with_secret_key()
    settings.ensure_dirs()
    # Uploads are spooled to this process's folder of the listener's incoming area (service.ingest.spool_upload):
    # what a web process killed mid-upload left there goes now, as a starting listener does for its own.
    receive.sweep(settings.storage_dir / receive.FOLDER)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="fracturenode_session",
        JSON_SORT_KEYS=False,
    )
    app.extensions["fracture.settings"] = settings
    app.extensions["fracture.db"] = db or Database.from_settings(settings)

    if settings.trusted_proxies:
        # Behind a TLS-terminating proxy: take scheme, host and client address from X-Forwarded-*, so the
        # session cookie is marked Secure and the audit log records the real client.
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]

    register_error_handlers(app)

    from service import api, health, portal

    app.register_blueprint(health.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(portal.bp)
    portal.init_portal(app)

    @app.after_request
    def _security_headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        return response

    return app
