"""The Flask application factory."""

from __future__ import annotations

import logging
from typing import IO

from flask import Flask, Request, Response

from config import Settings
from dicom import receive
from service.db import Database
from service.errors import register_error_handlers
from service.extensions import current_settings
from service.ingest import UploadPart

log = logging.getLogger(__name__)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


class UploadRequest(Request):
    """Flask's request, with the multipart file parts Werkzeug parses written to the incoming folder of the store's
    file system (:class:`service.ingest.UploadPart`: in memory up to 500 kB, as by default, then an unnamed file
    there) instead of the system temporary folder, which may be a RAM-backed tmpfs. Every part is closed with the
    request, also those of a request whose parsing failed (a full disk: 503 ``storage_full``), which Werkzeug
    would leave to the garbage collector."""

    _parts: list[UploadPart] | None = None

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        part = UploadPart(current_settings())
        if self._parts is None:
            self._parts = []
        self._parts.append(part)
        return part

    def close(self) -> None:
        try:
            super().close()
        finally:
            for part in self._parts or ():
                part.close()


def create_app(settings: Settings | None = None, db: Database | None = None) -> Flask:
    """Build the web application. Tests pass their own ``settings`` (and may share a ``db``)."""
    settings = (settings or Settings.from_env()).with_secret_key()
    settings.ensure_dirs()
    # Uploads are spooled to this process's folder of the listener's incoming area (service.ingest.spool_upload):
    # what a web process killed mid-upload left there goes now, as a starting listener does for its own.
    receive.sweep(settings.storage_dir / receive.FOLDER)
    app = Flask(__name__)
    app.request_class = UploadRequest
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
