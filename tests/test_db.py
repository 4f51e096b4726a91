"""Migrations up and down on both engines; the schema matches the models; the audit log is append-only."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import DatabaseError

from service.db import Database, current_revision, downgrade, upgrade
from service.models import AuditEntry, Base

DOMAIN_TABLES = {
    "users", "api_keys", "patients", "studies", "series", "instances", "jobs", "job_events",
    "analysis_results", "artifacts", "deliveries", "feedback", "idempotency_keys", "audit_log",
}


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    upgrade(database_url)
    assert current_revision(database_url) == "0001"
    db = Database(database_url)
    assert DOMAIN_TABLES <= set(inspect(db.engine).get_table_names())
    db.dispose()
    downgrade(database_url)
    assert current_revision(database_url) is None
    db = Database(database_url)
    assert not DOMAIN_TABLES & set(inspect(db.engine).get_table_names())
    db.dispose()
    upgrade(database_url)
    assert current_revision(database_url) == "0001"


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    upgrade(database_url)
    db = Database(database_url)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    db.dispose()
    assert diff == []


def test_audit_log_is_append_only(database_url: str) -> None:
    upgrade(database_url)
    db = Database(database_url)
    with db.session() as session:
        session.add(AuditEntry(actor_type="system", actor="test", action="study.view"))
    with pytest.raises(DatabaseError, match="append-only"), db.session() as session:
        session.execute(text("UPDATE audit_log SET actor = 'someone else'"))
    with pytest.raises(DatabaseError, match="append-only"), db.session() as session:
        session.execute(text("DELETE FROM audit_log"))
    with db.session() as session:
        assert session.execute(text("SELECT actor FROM audit_log")).scalar_one() == "test"
    db.dispose()
