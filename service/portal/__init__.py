"""The clinician web portal (server-rendered Flask + Jinja, a little plain JavaScript).

:func:`init_portal` wires the portal's security into an application: Flask-Login (sessions for
clinicians and admins), Flask-WTF's CSRF protection on every form and every state-changing fetch (the
REST API, authenticated by API keys, is exempt), and a session cookie marked ``Secure`` whenever the
request arrived over TLS. The views live in :mod:`.views` (history, study, images, upload, feedback),
:mod:`.auth_views` (login, logout), :mod:`.report` (HTML and PDF report, DICOM downloads) and
:mod:`.admin` (users, API keys, destinations, audit log, job queue).
"""

from __future__ import annotations

from flask import Blueprint, Flask, has_request_context, request
from flask.sessions import SecureCookieSessionInterface
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

bp = Blueprint("portal", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static/portal")

login_manager = LoginManager()
csrf = CSRFProtect()


class TLSAwareSessionInterface(SecureCookieSessionInterface):
    """The session cookie is ``Secure`` when ``SESSION_COOKIE_SECURE`` is set or the request came over TLS
    (``request.is_secure``; behind a TLS-terminating proxy that needs werkzeug's ``ProxyFix``)."""

    def get_cookie_secure(self, app: Flask) -> bool:  # type: ignore[override]
        if app.config.get("SESSION_COOKIE_SECURE"):
            return True
        return has_request_context() and request.is_secure


def init_portal(app: Flask) -> None:
    """Set up logins, CSRF protection and the session cookie for ``app`` (called by ``create_app``)."""
    from service.api import bp as api_bp
    from service.portal.auth_views import load_user, unauthorized

    app.config.setdefault("WTF_CSRF_TIME_LIMIT", None)  # the token lives as long as the session
    app.config.setdefault("WTF_CSRF_SSL_STRICT", True)
    app.session_interface = TLSAwareSessionInterface()
    login_manager.login_view = "portal.login"
    login_manager.login_message = "Please sign in to continue."
    login_manager.session_protection = "strong"
    login_manager.user_loader(load_user)
    login_manager.unauthorized_handler(unauthorized)
    login_manager.init_app(app)
    csrf.init_app(app)
    csrf.exempt(api_bp)  # integrators authenticate with API keys, not cookies


# The views register their routes on ``bp``; imported here so that they exist before ``bp`` is registered.
from service.portal import admin, auth_views, report, views  # noqa: E402,F401,I001
