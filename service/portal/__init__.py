"""The clinician web portal (server-rendered Flask + Jinja)."""

from flask import Blueprint

bp = Blueprint("portal", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static/portal")
