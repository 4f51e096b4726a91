"""Per-application handles (settings, database), reachable from request code without globals."""

from __future__ import annotations

from flask import current_app

from config import Settings
from service.db import Database


def current_settings() -> Settings:
    settings: Settings = current_app.extensions["fracture.settings"]
    return settings


def current_db() -> Database:
    db: Database = current_app.extensions["fracture.db"]
    return db
