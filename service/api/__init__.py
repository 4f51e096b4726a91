"""The REST API for integrators, versioned under /api/v1.

``bp`` carries the ``/api/v1`` endpoints (:mod:`service.api.routes`) and the OpenAPI document and its
reference page (:mod:`service.api.openapi`). Registering it also registers ``root_bp`` for the routes that
live outside the version prefix: ``/metrics`` (:mod:`service.metrics`) and DICOMweb STOW-RS
(``POST /dicomweb/studies``, :mod:`service.api.dicomweb`).
"""

from typing import Any

from flask import Blueprint, Response, g

bp = Blueprint("api", __name__, url_prefix="/api/v1")
root_bp = Blueprint("api_root", __name__)


def _api_headers(response: Response) -> Response:
    if response.status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="FractureNode API"'
    retry_after = g.get("retry_after")
    if response.status_code == 429 and retry_after:
        response.headers["Retry-After"] = str(retry_after)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


bp.after_request(_api_headers)
root_bp.after_request(_api_headers)


def _register_root(state: Any) -> None:
    state.app.register_blueprint(root_bp)
    # Like ``bp``, the root routes authenticate with API keys, never cookies: no CSRF token applies.
    try:
        from service.portal import csrf
    except ImportError:  # pragma: no cover - the portal is optional for the API
        return
    csrf.exempt(root_bp)


bp.record_once(_register_root)

from service import metrics  # noqa: E402,F401,I001  (the modules' routes register themselves on import)
from service.api import dicomweb, openapi, routes  # noqa: E402,F401
