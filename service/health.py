"""Liveness (``/healthz``) and readiness (``/readyz``: database, storage, model bundles)."""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, jsonify

from service import __version__
from service.extensions import current_db, current_settings

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    return jsonify({"status": "ok", "version": __version__})


def _check_storage() -> str:
    settings = current_settings()
    settings.ensure_dirs()
    probe = settings.data_dir / "tmp" / f".ready-{os.getpid()}"
    probe.write_bytes(b"ok")
    probe.unlink()
    return "ok"


def _check_models() -> str:
    from pipeline.models.bundle import verify_model_dir  # imported lazily: the web process stays small

    verify_model_dir(current_settings().model_dir, cached=True)  # unchanged weights are not hashed again
    return "ok"


@bp.get("/readyz")
def readyz() -> Any:
    checks: dict[str, str] = {}
    for name, check in (("database", lambda: (current_db().ping(), "ok")[1]), ("storage", _check_storage),
                        ("models", _check_models)):
        try:
            checks[name] = check()
        except Exception as exc:  # noqa: BLE001 - readiness reports every failure
            checks[name] = f"error: {exc}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ready" if ready else "not_ready", "checks": checks}), 200 if ready else 503
