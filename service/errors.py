"""The one place our exceptions become HTTP responses.

Every API error has the shape ``{"error": {"code", "message", "details"}}``. Every 503 (the database, the
storage or its disk unavailable or full: a client should retry) carries ``Retry-After: RETRY_AFTER_SECONDS``.

The exceptions need no web framework (the DICOM listener raises them through ``service.ingest`` too, and does
not import Flask for it: about 10 MB less resident, issue #9); Flask is imported where responses are made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask, Response

#: Seconds a 503 asks the client to wait before retrying (``Retry-After``, RFC 9110 10.2.3): an outage of the
#: database or the storage, or a full disk, is not the client's fault and may pass. One value for every 503.
RETRY_AFTER_SECONDS = 5


class ServiceError(Exception):
    """An error with an HTTP status and a machine-readable code, raised anywhere inside the service."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: Any = None, status: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ServiceError):
    status, code = 422, "unprocessable"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


def error_response(status: int, code: str, message: str, details: Any = None) -> Response:
    from flask import jsonify

    response = jsonify({"error": {"code": code, "message": message, "details": details}})
    response.status_code = status
    return response


def _wants_json() -> bool:
    from flask import request

    return request.path.startswith(("/api/", "/dicomweb/", "/healthz", "/readyz")) or (
        request.accept_mimetypes.best == "application/json"
    )


def register_error_handlers(app: Flask) -> None:
    from flask import current_app, request
    from sqlalchemy.exc import DBAPIError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout
    from werkzeug.exceptions import HTTPException, ServiceUnavailable

    @app.after_request
    def _retry_after(response: Response) -> Response:
        # Every 503, whichever handler or view made it (also those of Flask's own handling: after_request runs
        # for error responses too); a view that set its own value keeps it.
        if response.status_code == 503:
            response.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
        return response

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError) -> Any:
        if _wants_json():
            return error_response(exc.status, exc.code, exc.message, exc.details)
        return exc.message, exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        if _wants_json():
            code = (exc.name or "error").lower().replace(" ", "_")
            if exc.code == 413:  # the same code as service.ingest's size check
                code = "payload_too_large"
            response = error_response(exc.code or 500, code, exc.description or exc.name or "error")
            for name, value in exc.get_headers():
                if name.lower() != "content-type":
                    response.headers[name] = value
            return response
        return exc

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    def _database_unavailable(exc: Exception) -> Any:
        # A database that cannot be reached (or a pool that is exhausted) is not the client's fault: 503.
        # SQLite reports bad SQL as OperationalError too: that is our bug, a 500.
        if any(text in str(exc) for text in ("syntax error", "no such ", "ambiguous column")):
            return _unexpected(exc)
        current_app.logger.error("database unavailable: %s", str(exc).splitlines()[0] if str(exc) else exc)
        if _wants_json():
            return error_response(503, "database_unavailable", "the database is unavailable; retry later")
        return ServiceUnavailable()

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return _database_unavailable(exc)
        if not _wants_json():
            raise exc  # Flask's own handling (propagated in tests, a 500 page otherwise)
        current_app.logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "an unexpected error occurred")
